"""llama-perplexity's KL-divergence base file (`--kl-divergence-base FILE`), read and written byte for byte.

Reading and writing stock's own format lets a user compare our KLD with `llama-perplexity --kl-divergence`
on either side's file (tools/perplexity/perplexity.cpp of the llama.cpp that llama-cpp-python 0.3.36
vendors). Little-endian, no padding, top to bottom:

    char[8]   "_logits_"
    int32     n_ctx                      tokens per chunk
    int32     n_vocab
    int32     n_chunk
    int32     tokens[n_chunk * n_ctx]    the text's tokens as tokenized (never with a chunk's BOS swap)
    then per chunk, per scored position j = n_ctx/2 ... n_ctx-2 (n_ctx - 1 - n_ctx/2 rows):
      uint16  row[nv]                    nv = 2 * ((n_vocab + 1) / 2) + 4
        row[0:2]  float32 scale          (max_logit - min_logit) / 65535
        row[2:4]  float32 min_log_prob   min_logit - max_logit - log(sum exp(logit - max_logit))
        row[4:4+n_vocab]                 q = round((logit - min_logit) / scale), 0 at or below min_logit
        (one zero uint16 of padding when n_vocab is odd)

min_logit is clamped to max_logit - 16, so log-probabilities more than 16 below the top are stored as
min_log_prob; a stored log-probability is scale * q + min_log_prob (float32), within scale / 2 of the
true one (scale <= 16 / 65535 ≈ 2.4e-4). Every float operation below is float32 where stock's is, so the
rows we write are stock's rows up to the summation order of one float64 sum.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from nkat_gguf.errors import InputError
from nkat_gguf.format.atomic import atomic_output

MAGIC = b"_logits_"
HEADER_BYTES = len(MAGIC) + 3 * 4
LOG_PROB_RANGE = 16.0  # stock stores log-probabilities down to max - 16 and clamps the rest
_LEVELS = np.float32(65535.0)


def row_width(n_vocab: int) -> int:
    """uint16 values per stored row: two float32 (scale, min_log_prob), the vocabulary, padding to even."""
    return 2 * ((n_vocab + 1) // 2) + 4


def scored_rows(n_ctx: int) -> int:
    """Rows stored per chunk: positions n_ctx/2 ... n_ctx-2, as llama-perplexity scores them."""
    return n_ctx - 1 - n_ctx // 2


@dataclass(frozen=True)
class Header:
    n_ctx: int
    n_vocab: int
    n_chunk: int

    @property
    def file_bytes(self) -> int:
        return (HEADER_BYTES + 4 * self.n_chunk * self.n_ctx
                + 2 * self.n_chunk * scored_rows(self.n_ctx) * row_width(self.n_vocab))


def encode_rows(logits: np.ndarray) -> np.ndarray:
    """Stock's `log_softmax(n_vocab, logits, log_prob, tok)`: float32 logits (rows, n_vocab) -> uint16 rows."""
    logits = np.asarray(logits, dtype=np.float32)
    n_rows, n_vocab = logits.shape
    out = np.zeros((n_rows, row_width(n_vocab)), dtype=np.uint16)
    max_logit = logits.max(axis=1)
    min_logit = np.maximum(logits.min(axis=1), max_logit - np.float32(LOG_PROB_RANGE))
    sum_exp = np.exp(logits - max_logit[:, None]).sum(axis=1, dtype=np.float64)
    log_sum_exp = np.log(sum_exp).astype(np.float32)
    scale = (max_logit - min_logit) / _LEVELS
    header = np.stack([scale, min_logit - max_logit - log_sum_exp], axis=1).astype("<f4")
    out[:, :4] = header.view("<u2")  # two float32 per row, in the row's own first 8 bytes
    nonzero = scale != 0  # a row of equal logits keeps q = 0, as stock's memset
    with np.errstate(divide="ignore"):
        inv_scale = np.where(nonzero, np.float32(1) / scale, np.float32(0))
    shifted = logits - min_logit[:, None]
    q = np.rint(inv_scale[:, None] * shifted).astype(np.int64)  # stock's nearest_int: round half to even
    q[shifted <= 0] = 0
    out[:, 4:4 + n_vocab] = q.astype(np.uint16)  # C's int -> uint16_t conversion: modulo 2^16, as stock
    return out


def decode_rows(rows: np.ndarray, n_vocab: int) -> np.ndarray:
    """Stored rows -> float32 log-probabilities (rows, n_vocab): scale * q + min_log_prob, as stock reads them."""
    header = np.ascontiguousarray(rows[:, :4]).view("<f4")
    return header[:, :1] * rows[:, 4:4 + n_vocab].astype(np.float32) + header[:, 1:2]


class BaseWriter:
    """Writes a base file to an open binary stream: the header and tokens now, then one chunk at a time."""

    def __init__(self, stream: BinaryIO, n_ctx: int, n_vocab: int, tokens: np.ndarray):
        tokens = np.asarray(tokens, dtype="<i4")
        if tokens.size == 0 or tokens.size % n_ctx:
            raise InputError(f"a base file holds whole chunks: {tokens.size} tokens is not a multiple of n_ctx={n_ctx}")
        self.stream, self.n_vocab = stream, n_vocab
        self.header = Header(n_ctx, n_vocab, tokens.size // n_ctx)
        stream.write(MAGIC + np.array([n_ctx, n_vocab, self.header.n_chunk], dtype="<i4").tobytes())
        stream.write(tokens.tobytes())
        self.chunks_written = 0

    def write_chunk(self, logits: np.ndarray) -> None:
        """The scored positions' logits (scored_rows(n_ctx), n_vocab) of the next chunk."""
        self.write_encoded(encode_rows(logits))

    def write_encoded(self, rows: np.ndarray) -> None:
        """The next chunk's rows, already encoded (`encode_rows`, e.g. block by block in threads)."""
        expected = (scored_rows(self.header.n_ctx), row_width(self.n_vocab))
        if rows.shape != expected:
            raise ValueError(f"chunk rows of shape {rows.shape}, expected {expected}")
        self.stream.write(rows.astype("<u2", copy=False).tobytes())
        self.chunks_written += 1


class BaseFile:
    """A base file opened for reading: the header and tokens checked, the chunks memory-mapped (read lazily)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(HEADER_BYTES)
        if len(head) < HEADER_BYTES or head[:len(MAGIC)] != MAGIC:
            raise InputError(f"{self.path} is not a llama-perplexity KL-divergence base file (no '_logits_' header)")
        n_ctx, n_vocab, n_chunk = (int(v) for v in np.frombuffer(head, dtype="<i4", offset=len(MAGIC)))
        if n_ctx < 2 or n_vocab < 1 or n_chunk < 1:
            raise InputError(f"{self.path}: impossible header (n_ctx={n_ctx}, n_vocab={n_vocab}, n_chunk={n_chunk})")
        self.header = Header(n_ctx, n_vocab, n_chunk)
        if size != self.header.file_bytes:
            what = "truncated" if size < self.header.file_bytes else "longer than its header says"
            raise InputError(f"{self.path} is {what}: {size} bytes, its header (n_ctx={n_ctx}, n_vocab={n_vocab}, "
                             f"n_chunk={n_chunk}) needs {self.header.file_bytes}")
        self.tokens = np.fromfile(self.path, dtype="<i4", count=n_chunk * n_ctx, offset=HEADER_BYTES).astype(np.int32)
        if self.tokens.min() < 0 or self.tokens.max() >= n_vocab:
            raise InputError(f"{self.path}: token ids outside the vocabulary of {n_vocab}")
        self._rows = np.memmap(self.path, dtype="<u2", mode="r", offset=HEADER_BYTES + 4 * self.tokens.size,
                               shape=(n_chunk, scored_rows(n_ctx), row_width(n_vocab)))

    def chunk_rows(self, chunk: int) -> np.ndarray:
        """The stored uint16 rows of one chunk (scored_rows(n_ctx), row_width(n_vocab)), a read-only view."""
        return self._rows[chunk]

    def log_probs(self, chunk: int) -> np.ndarray:
        """One chunk's stored log-probabilities, float32 (scored_rows(n_ctx), n_vocab)."""
        return decode_rows(self._rows[chunk], self.header.n_vocab)

    def close(self) -> None:
        mm = getattr(self._rows, "_mmap", None)
        del self._rows
        if mm is not None:
            mm.close()

    def __enter__(self) -> BaseFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def base_writer(path: Path, n_ctx: int, n_vocab: int, tokens: np.ndarray) -> Iterator[BaseWriter]:
    """A BaseWriter on `path`, written atomically: the file gets its name only once every chunk is in."""
    with atomic_output(Path(path), suffix=".bin") as tmp, open(tmp, "wb") as stream:
        writer = BaseWriter(stream, n_ctx, n_vocab, tokens)
        yield writer
        if writer.chunks_written != writer.header.n_chunk:
            raise ValueError(f"base file {path}: {writer.chunks_written} of {writer.header.n_chunk} chunks written")
