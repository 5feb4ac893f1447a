"""Calibration statistics collected inside llama.cpp's own graph, the way `llama-imatrix` collects them.

llama.cpp calls the context's eval callback (`cb_eval`) for every graph node, first with ask=true
("do you want this node?"), then, for the nodes we want, with ask=false once the node is computed.
We want every MUL_MAT / MUL_MAT_ID whose src0 is a weight of the model: its src1 is the input x that
the weight multiplies, and per weight we accumulate Σx² per input column and the number of rows
(what llama.cpp's quantizer takes as the importance matrix), and, on request, Σxxᵀ per distinct input
(q/k/v and gate/up share theirs) for inputs at most `MAX_SECOND_MOMENT_WIDTH` wide.

So every architecture llama.cpp runs is calibrated by llama.cpp itself, with no model code here.
Windows are evaluated as llama-imatrix does: each its own sequence from position 0 with an empty
KV cache, logits for every position (so the last layer's FFN and the head see every token, as they
do in llama-imatrix); nkat_gguf.convert.calibrate cuts the windows (BOS first when the model adds one).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import time
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp
import numpy as np
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from nkat_gguf.engine.llama.native_log import captured_llama_log
from nkat_gguf.errors import InputError, NkatError
from nkat_gguf.format.atomic import atomic_output
from nkat_gguf.format.gguf_file import read_layout

from nkat_gguf.engine.llama.adapter import cache_root
from nkat_gguf.engine.calibrate.ggml_tensor import (
    GGML_OP_MUL_MAT,
    GGML_OP_MUL_MAT_ID,
    GGML_TYPE_F32,
    GgmlTensor,
    check_layout,
    ggml_lib,
    tensor_name,
)

WINDOW = 512
MAX_SECOND_MOMENT_WIDTH = 8192
CACHE_VERSION = 2  # bump when what is collected changes, so old cache entries are not read (2: float32 Σxxᵀ)


@dataclass
class GraphStatistics:
    """Raw sums over all windows: what an imatrix file stores, plus the second moments."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)  # weight -> Σx² (n_mat, in) float64
    counts: dict[str, np.ndarray] = field(default_factory=dict)  # weight -> rows seen per matrix (n_mat,)
    outer_sums: dict[str, np.ndarray] = field(default_factory=dict)  # owner weight -> Σxxᵀ (in, in) float32
    input_owner: dict[str, str] = field(default_factory=dict)  # weight -> the weight whose Σxxᵀ it shares
    tokens: int = 0

    def mean_squares(self) -> dict[str, np.ndarray]:
        """E[x²] per input column, float32, flattened over expert matrices; unseen experts get ones.

        Computed from float32 sums and counts, exactly as llama-quantize computes it from a saved file.
        """
        means = {}
        for name, sums in self.sums.items():
            s, c = sums.astype(np.float32), self.counts[name].astype(np.float32)[:, None]
            means[name] = np.where(c > 0, s / np.where(c > 0, c, 1), np.float32(1)).astype(np.float32).reshape(-1)
        return means

    def take_second_moments(self) -> dict[str, np.ndarray]:
        """E[xxᵀ] (in, in) float32 per weight; weights that share an input share the same array object.

        The sums are divided in place and handed over (the statistics keep none): a second copy of every
        Σxxᵀ is what would make memory grow with the model.
        """
        shared = {}
        for owner, total in self.outer_sums.items():
            total /= np.float32(self.counts[owner][0])
            shared[owner] = total
        self.outer_sums = {}
        return {name: shared[owner] for name, owner in self.input_owner.items() if owner in shared}


class _Collector:
    """The eval callback's state. Exceptions cannot cross the C boundary: kept, and raised after decode.

    Speed: the callback runs for every graph node, and every node it asks for splits llama.cpp's graph
    (one more threadpool dispatch and barrier). So the ask answers from a dict keyed by the weight's
    address (weights never move while the model is loaded), and a weight whose input was already read
    in this graph (k and v after q, up after gate) is not asked for: its sums are copied from the first.
    """

    def __init__(self, weights: set[str], outer: set[str]):
        self.weights = weights
        self.outer = outer  # weights whose input also gets Σxxᵀ (at most MAX_SECOND_MOMENT_WIDTH wide)
        self.stats = GraphStatistics()
        self.error: BaseException | None = None
        self._names: dict[int, str | None] = {}  # src0 address -> recorded weight name, or None
        self._inputs: dict[int, tuple[str, np.ndarray, int]] = {}  # src1 address -> (first weight, Σx², rows)
        self._observed = self._shared = 0  # nodes read / nodes served from an earlier read, in this graph
        self._per_graph: tuple[int, int] | None = None  # the first graph's counts; every window's graph is the same
        self._staging = np.empty(0, dtype=np.uint8)  # device-to-host copies
        self._products: dict[int, np.ndarray] = {}  # width -> float32 (in, in) buffer for one window's xᵀx
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._call)  # kept alive with the collector

    def release(self) -> None:
        """Free the buffers now: the callback refers back to the collector, so that cycle would hold them (4 MiB
        per 1,024-wide input) until Python's cycle collector ran, one more each calibration pass."""
        self._products.clear()
        self._staging = np.empty(0, dtype=np.uint8)
        self.callback = None

    def new_graph(self) -> None:
        """Tensor addresses of graph nodes identify shared inputs only within one graph."""
        self._inputs.clear()
        self._observed = self._shared = 0

    def end_graph(self) -> None:
        counts = (self._observed, self._shared)
        if self._per_graph is None:
            self._per_graph = counts
        elif counts != self._per_graph:
            raise NkatError(f"llama.cpp's graph multiplied {sum(counts)} recorded weights in one window and "
                            f"{sum(self._per_graph)} in the first; the windows were not evaluated alike")

    def _call(self, address: int, ask: bool, _user_data: int) -> bool:
        try:
            if ask:
                return self._wanted(address)
            self._collect(GgmlTensor.from_address(address))
            self._observed += 1
            # After the graph's last wanted node nothing more is needed: returning false stops the graph
            # there, which skips the head of a tied model (a vocabulary-wide matmul) in every window but the first.
            return self._per_graph is None or self._observed != self._per_graph[0]
        except BaseException as exc:  # noqa: BLE001 - re-raised by the driver
            self.error = exc
            return False  # stops this graph's computation

    def _wanted(self, address: int) -> bool:
        t = GgmlTensor.from_address(address)
        if t.op != GGML_OP_MUL_MAT and t.op != GGML_OP_MUL_MAT_ID:
            return False
        src0, src1 = t.src[0], t.src[1]
        if not src0 or not src1:
            return False
        name = self._names.get(src0, "")
        if name == "":
            found = tensor_name(GgmlTensor.from_address(src0))
            name = self._names[src0] = found if found in self.weights else None
        if name is None or ctypes.c_int.from_address(src1).value != GGML_TYPE_F32:  # type: the struct's first field
            return False
        if t.op == GGML_OP_MUL_MAT and src1 in self._inputs and _is_matrix(GgmlTensor.from_address(src0)):
            self._share(name, src1)  # the input was read at an earlier node of this graph, and is unchanged
            self._shared += 1
            return False
        return True

    def _share(self, name: str, input_address: int) -> None:
        owner, squares, rows = self._inputs[input_address]
        if name in self.outer and owner in self.stats.outer_sums \
                and self.stats.input_owner.setdefault(name, owner) != owner:
            raise NkatError(f"{name} shared its input with {self.stats.input_owner[name]} in one graph and "
                            f"with {owner} in another; llama.cpp's graph changed between windows")
        self._add(name, squares, np.array([rows]))

    def _collect(self, t: GgmlTensor) -> None:
        src0, src1 = GgmlTensor.from_address(t.src[0]), GgmlTensor.from_address(t.src[1])
        name = tensor_name(src0)
        x = self._array(src1, np.float32)  # (ne3, ne2, ne1, ne0)
        if t.op == GGML_OP_MUL_MAT_ID:
            self._collect_experts(name, src0, x, self._array(GgmlTensor.from_address(t.src[2]), np.int32))
        elif _is_matrix(src0):
            self._collect_dense(name, t.src[1], x.reshape(-1, x.shape[-1]))
        else:
            self._collect_batched(name, src0, x)

    def _collect_dense(self, name: str, input_address: int, x: np.ndarray) -> None:
        """x (rows, in): one 2-D weight, the first of this graph to read this input."""
        squares = np.einsum("ij,ij->j", x, x, dtype=np.float64)[None, :]  # (1, in)
        self._inputs[input_address] = name, squares, x.shape[0]
        if name in self.outer and x.shape[1] <= MAX_SECOND_MOMENT_WIDTH:
            self.stats.input_owner.setdefault(name, name)
            self._accumulate_outer(name, x)
        self._add(name, squares, np.array([x.shape[0]]))

    def _accumulate_outer(self, owner: str, x: np.ndarray) -> None:
        """Σxxᵀ += xᵀx in float32 (numpy's matmul runs BLAS syrk for xᵀx), into preallocated buffers: no
        fresh 10 MB page-faulted array per node. float32 sums of a few hundred windows stay within ~1e-6."""
        width = x.shape[1]
        product = self._products.get(width)
        if product is None:
            product = self._products[width] = np.empty((width, width), dtype=np.float32)
        np.matmul(x.T, x, out=product)
        total = self.stats.outer_sums.get(owner)
        if total is None:
            self.stats.outer_sums[owner] = product.copy()
        else:
            total += product

    def _collect_batched(self, name: str, src0: GgmlTensor, x: np.ndarray) -> None:
        """A 3-D/4-D weight in MUL_MAT: broadcast over its matrices as llama-imatrix does."""
        n2, n3 = src0.ne[2], src0.ne[3]
        sums = np.zeros((n2 * n3, x.shape[-1]))
        for i3 in range(x.shape[0]):
            for i2 in range(x.shape[1]):
                sums[(i3 % n3) * n2 + i2 % n2] += np.einsum("ij,ij->j", x[i3, i2], x[i3, i2], dtype=np.float64)
        rows = x.shape[0] * x.shape[1] * x.shape[2] // (n2 * n3)
        self._add(name, sums, np.full(1, rows))

    def _collect_experts(self, name: str, src0: GgmlTensor, x: np.ndarray, ids: np.ndarray) -> None:
        """MUL_MAT_ID: x (1, tokens, ne11, in), ids (1, 1, tokens, used) -> sums per chosen expert."""
        n_experts, ne11, width, chosen = src0.ne[2], x.shape[2], x.shape[3], ids[0, 0]  # chosen (tokens, used)
        rows = x[0][:, np.arange(chosen.shape[1]) % ne11]  # (tokens, used, in)
        sums = np.zeros((n_experts, width))
        np.add.at(sums, chosen.reshape(-1), np.square(rows.reshape(-1, width), dtype=np.float64))
        self._add(name, sums, np.bincount(chosen.reshape(-1), minlength=n_experts))

    def _add(self, name: str, sums: np.ndarray, counts: np.ndarray) -> None:
        if not np.isfinite(sums).all():
            raise NkatError(f"non-finite activations at the input of {name}: the model's outputs are not usable")
        if name not in self.stats.sums:
            self.stats.sums[name] = np.zeros_like(sums)
            self.stats.counts[name] = np.zeros(counts.shape, dtype=np.int64)
        if self.stats.sums[name].shape != sums.shape:
            raise NkatError(f"{name} multiplied inputs of shape {sums.shape} and {self.stats.sums[name].shape}")
        self.stats.sums[name] += sums
        self.stats.counts[name] += counts

    def _array(self, t: GgmlTensor, dtype: type) -> np.ndarray:
        """A (ne3, ne2, ne1, ne0) view of a node's data with its strides, copied to the host if needed."""
        item = np.dtype(dtype).itemsize
        if t.nb[0] != item:
            raise NkatError(f"{tensor_name(t)}: element stride {t.nb[0]} bytes, expected {item}")
        shape, strides = tuple(reversed(list(t.ne))), tuple(reversed(list(t.nb)))
        span = sum((n - 1) * s for n, s in zip(shape, strides)) + item
        lib = ggml_lib()
        if t.buffer and not lib.ggml_backend_buffer_is_host(t.buffer):
            if self._staging.size < span:
                self._staging = np.empty(span, dtype=np.uint8)
            lib.ggml_backend_tensor_get(ctypes.addressof(t), self._staging.ctypes.data, 0, span)
            buffer = self._staging
        else:
            buffer = (ctypes.c_char * span).from_address(t.data)
        return np.ndarray(shape, dtype=dtype, buffer=buffer, strides=strides)


def _is_matrix(t: GgmlTensor) -> bool:
    return t.ne[2] * t.ne[3] == 1


def collect_statistics(model_path: Path, windows: list[list[int]], weights: set[str] | None = None,
                       second_moments: bool | set[str] = False, threads: int = 0,
                       progress: bool = True) -> GraphStatistics:
    """Evaluate `windows` (token lists of equal length) in llama.cpp and return the input statistics.

    `weights`: the names to record (default: every tensor of the file); nodes of other tensors are
    declined at ask time, so the callback costs one Python call per node and nothing more.
    `second_moments`: Σxxᵀ for every recorded weight (True), none (False), or those named (a layer group's).
    """
    check_layout()
    if weights is None:
        weights = {t.name for t in read_layout(model_path).tensors}
    outer = set(weights) if second_moments is True else set(second_moments or ())
    collector = _Collector(weights, outer)
    try:
        _evaluate(model_path, windows, threads, progress, collector)
    finally:
        collector.release()
    if not collector.stats.sums:
        raise NkatError(f"llama.cpp evaluated {model_path.name} but multiplied none of its weights in a way the "
                        "calibration can read")
    return collector.stats


def plain_forward_seconds(model_path: Path, windows: list[list[int]], threads: int = 0) -> float:
    """The same evaluation with no callback: the baseline the calibration's cost is measured against."""
    start = time.perf_counter()
    _evaluate(model_path, windows, threads, False, None)
    return time.perf_counter() - start


def _evaluate(model_path: Path, windows: list[list[int]], threads: int, progress: bool,
              collector: _Collector | None) -> None:
    if not windows or len({len(w) for w in windows}) != 1:
        raise InputError("calibration needs at least one window, all of the same length")
    n = len(windows[0])
    callback = collector.callback if collector else ctypes.cast(None, llama_cpp.ggml_backend_sched_eval_callback)
    model, ctx = _load(model_path, n, threads or os.cpu_count() or 1, callback)
    batch = llama_cpp.llama_batch_init(n, 0, 1)
    try:
        tokens = _prepare(batch, n)
        memory = llama_cpp.llama_get_memory(ctx)
        bar = tqdm(total=n * len(windows), desc="calibrating in llama.cpp", unit="tok", unit_scale=True,
                   disable=not progress, leave=False)
        # numpy's BLAS on one thread: llama.cpp's idle workers spin while the callback runs, and a second
        # BLAS thread fighting them (then spinning itself while llama.cpp computes) doubled the callback's CPU time.
        with bar, threadpool_limits(limits=1, user_api="blas"):
            for window in windows:
                llama_cpp.llama_memory_clear(memory, True)
                tokens[:] = window
                if collector:
                    collector.new_graph()
                status = llama_cpp.llama_decode(ctx, batch)
                if collector and collector.error is not None:
                    raise collector.error
                if status != 0:
                    raise NkatError(f"llama.cpp could not evaluate a calibration window of {model_path.name} "
                                    f"(llama_decode returned {status})")
                if collector:
                    collector.end_graph()
                    collector.stats.tokens += n
                bar.update(n)
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)


def _load(model_path: Path, n: int, threads: int, callback: object) -> tuple[object, object]:
    params = llama_cpp.llama_model_default_params()
    with captured_llama_log() as log:
        model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), params)
    if not model:
        raise InputError(f"llama.cpp cannot load {model_path.name}: {log.reason('load failed')}")
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = n
    cparams.n_seq_max = 1
    cparams.n_threads = cparams.n_threads_batch = threads
    cparams.cb_eval = callback
    cparams.cb_eval_user_data = None
    with captured_llama_log() as log:
        ctx = llama_cpp.llama_init_from_model(model, cparams)
    if not ctx:
        llama_cpp.llama_model_free(model)
        raise InputError(f"llama.cpp cannot create a context for {model_path.name}: {log.reason('init failed')}")
    return model, ctx


def _prepare(batch: object, n: int) -> np.ndarray:
    """One sequence from position 0 with logits everywhere; returns the token slots to fill per window."""
    batch.n_tokens = n
    np.ctypeslib.as_array(batch.pos, shape=(n,))[:] = np.arange(n)
    np.ctypeslib.as_array(batch.n_seq_id, shape=(n,))[:] = 1
    np.ctypeslib.as_array(batch.logits, shape=(n,))[:] = 1
    for i in range(n):
        batch.seq_id[i][0] = 0
    return np.ctypeslib.as_array(batch.token, shape=(n,))


# ---- cache: the same model, text and token count give the same statistics ---------------------------


def calibration_cache_dir() -> Path:
    """$NKAT_CACHE_DIR/calibrations, else ~/.cache/nkat-gguf/calibrations (beside the adapters)."""
    return cache_root() / "calibrations"


def cache_key(model_sha256: str, text_sha256: str, n_windows: int, window: int, group: str = "") -> str:
    """`group`: what names one pass of several (a layer group's second moments); empty for the whole model."""
    raw = f"v{CACHE_VERSION}|{model_sha256}|{text_sha256}|{n_windows}x{window}" + (f"|{group}" if group else "")
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


def cache_path(key: str, cache_dir: Path | None = None) -> Path:
    return (cache_dir or calibration_cache_dir()) / f"{key}.npz"


def load_cached(key: str, second_moments: bool, cache_dir: Path | None = None) -> GraphStatistics | None:
    """The stored statistics for `key` without their second moments (`CachedMoments` reads those), or None
    (also when second moments are wanted but were not kept)."""
    path = cache_path(key, cache_dir)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if second_moments and not bool(data["has_second_moments"]):
                return None
            stats = GraphStatistics(tokens=int(data["tokens"]))
            for name in data["names"].tolist():
                stats.sums[name], stats.counts[name] = data[f"sums/{name}"], data[f"counts/{name}"]
            for name, owner in zip(data["shared"].tolist(), data["owners"].tolist()):
                stats.input_owner[name] = owner  # the Σxxᵀ stay on disk: CachedMoments reads them one at a time
            return stats
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None  # a damaged entry is recomputed and replaced


def store_cached(key: str, stats: GraphStatistics, second_moments: bool, cache_dir: Path | None = None) -> Path:
    """Write the statistics atomically (concurrent optimizer workers may store the same key)."""
    directory = cache_dir or calibration_cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create calibration cache {directory}: {exc.strerror} (set NKAT_CACHE_DIR)") from None
    arrays = {"tokens": np.array(stats.tokens), "has_second_moments": np.array(second_moments),
              "names": np.array(sorted(stats.sums)), "shared": np.array(list(stats.input_owner), dtype=str),
              "owners": np.array(list(stats.input_owner.values()), dtype=str)}
    arrays |= {f"sums/{n}": v for n, v in stats.sums.items()} | {f"counts/{n}": v for n, v in stats.counts.items()}
    arrays |= {f"outer/{n}": v for n, v in stats.outer_sums.items()}
    path = cache_path(key, directory)
    with atomic_output(path, suffix=".npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    return path


class CachedMoments(Mapping[str, np.ndarray]):
    """E[xxᵀ] per weight read from a cache entry when asked for, one distinct input held at a time.

    Every Σxxᵀ of a model at once is L·S_layer bytes (2.5 GB on a 0.5B qwen2, whose file is 491 MB); θ is
    fitted weight by weight in layer order and needs one input's at a time, so the statistics stay on disk.
    Weights that share an input (q/k/v, gate/up) get the same array object while it is held. Each array is
    divided in place exactly as `GraphStatistics.take_second_moments` divides it: the same float32 values.
    """

    def __init__(self, path: Path, stats: GraphStatistics):
        self.path = path
        self._owner = dict(stats.input_owner)
        self._counts = {owner: np.float32(stats.counts[owner][0]) for owner in set(self._owner.values())}
        self._held: tuple[str, np.ndarray] | None = None

    def __getitem__(self, name: str) -> np.ndarray:
        owner = self._owner[name]
        if self._held is None or self._held[0] != owner:
            self._held = None  # freed before the next is read
            try:
                with np.load(self.path, allow_pickle=False) as data:
                    total = data[f"outer/{owner}"]
            except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
                raise NkatError(f"the calibration cache entry {self.path} went missing or changed during the "
                                f"run ({exc}); run convert again") from None
            total /= self._counts[owner]
            self._held = owner, total
        return self._held[1]

    def __contains__(self, name: object) -> bool:
        return name in self._owner

    def __iter__(self) -> Iterator[str]:
        return iter(self._owner)

    def __len__(self) -> int:
        return len(self._owner)
