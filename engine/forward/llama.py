"""PyTorch forward forward of the llama family (llama, qwen2), computed from the weights of a GGUF.

Read top to bottom like nanoGPT's model.py: the config, then one function per box of the
architecture diagram (RMSNorm, RoPE, attention, and the block with its MLP), then `LlamaForward`,
which runs them. `llama_block` is the one block forward of the project: so8t's trainer runs it too.
qwen2 is llama with q/k/v biases and llama.cpp's NEOX rope (pairs (i, i + hd/2)); `ARCHITECTURES`
holds those differences and everything else is shared.
It gives float32 logits and activations independent of llama.cpp: to check llama.cpp's numbers,
to collect the per-column input statistics that drive the activation-weighted SVD and llama.cpp's
quantizer importance matrix, and to run a model whose weight inputs are transformed online
(y = W·(R·x) through `input_hooks`).

Memory is flat in depth: the forward is layer-major. One layer's weights are dequantized, every
sequence goes through that layer, and the weights are dropped before the next layer is read.
The hidden states of all sequences are one (N, d) tensor, N the total token count, so each weight
is one big matmul; only attention is split by sequence (sequences of equal length share one call).

Shapes: N all tokens, T one sequence's tokens, d = embedding_length, nh/nkv query/kv heads,
hd = head_dim, ff = feed_forward_length, V = vocabulary. Weights are numpy order (out, in).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from gguf.constants import Keys

from nkat_gguf.errors import InputError, UnsupportedModelError
from nkat_gguf.format.gguf_file import GGUFLayout
from nkat_gguf.format.tensors import TensorSource

Hook = Callable[[torch.Tensor], torch.Tensor]
Layer = dict[str, torch.Tensor]  # one block's weights by part name ("attn_q", ...)
SECOND_MOMENT_MAX_WIDTH = 8192  # E[x xᵀ] is (in, in) float64: 512 MiB at this width, so no wider
_GRAM_CHUNK = 4096  # tokens per float32 Gram product; the sums over chunks are float64
LEGACY_ROPE_SCALE = "{arch}.rope.scale_linear"  # the older name of the linear factor; gguf.constants 0.19 has none


class InputStatistics:
    """Per-weight sums over tokens of x² (per column) and, optionally, of x xᵀ, of the input each weight multiplies.

    Weights handed the same tensor (q/k/v; gate/up) share one x xᵀ sum, so it is computed once and
    `second_moments()` returns the same array object for each of them.
    """

    def __init__(self, second_moments: bool, max_width: int = SECOND_MOMENT_MAX_WIDTH):
        self.squares: dict[str, torch.Tensor] = {}
        self.grams: dict[str, torch.Tensor] = {}
        self._want_grams, self._max_width = second_moments, max_width
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # (input, its Gram sum): kept alive, so `is` is safe

    def add(self, name: str, x: torch.Tensor) -> None:
        self.squares[name] = x.square().sum(0, dtype=torch.float64)  # (in,); all N tokens pass at once
        if not self._want_grams or x.shape[1] > self._max_width:
            return
        if self._last is None or self._last[0] is not x:
            gram = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
            for chunk in x.float().split(_GRAM_CHUNK):  # (≤ chunk, in)
                gram += (chunk.T @ chunk).double()
            self._last = (x, gram)
        self.grams[name] = self._last[1]

    def mean_squares(self, n_tokens: int) -> dict[str, np.ndarray]:
        return {name: (total / n_tokens).float().numpy() for name, total in self.squares.items()}

    def second_moments(self, n_tokens: int) -> dict[str, np.ndarray]:
        shared: dict[int, np.ndarray] = {}
        for gram in self.grams.values():
            if id(gram) not in shared:
                shared[id(gram)] = (gram / n_tokens).numpy()
        return {name: shared[id(gram)] for name, gram in self.grams.items()}


Sums = InputStatistics | None  # the statistics being collected, if any

# The 2-D weights of one block, in the order the block uses them.
BLOCK_MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


# ---- config -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Architecture:
    """What one llama-family architecture of llama.cpp changes in the shared forward.

    Read in llama.cpp's src/llama-model.cpp (tensor loading, `llama_model_rope_type`) and
    src/models/{llama,qwen2}.cpp (the graphs): qwen2 loads bq/bk/bv when the file has them (a qwen2
    file without them loads too: tested) and adds them after the matmuls, uses LLAMA_ROPE_TYPE_NEOX
    (convert_hf_to_gguf.py does not permute its q/k rows, so Hugging Face's half-split pairs stay as
    they are), and reads no rope_freqs tensor; the rest is llama's graph. llama's own optional biases
    are not covered: such a file is refused rather than computed without them.
    """

    biases: tuple[str, ...]  # block matrices that may have a bias, "blk.N.<part>.bias" (out,), added after W·x
    rope_neox: bool  # NEOX rope: pairs (i, i + hd/2); else NORMAL: adjacent pairs (2i, 2i + 1)
    rope_freqs: bool  # llama.cpp reads an optional rope_freqs.weight (Llama 3 factors)


ARCHITECTURES = {
    "llama": Architecture(biases=(), rope_neox=False, rope_freqs=True),
    "qwen2": Architecture(biases=("attn_q", "attn_k", "attn_v"), rope_neox=True, rope_freqs=False),
}


@dataclass(frozen=True)
class LlamaConfig:
    """Hyperparameters of a llama-family file; keys are `{arch}.*` ("llama.block_count", "qwen2.block_count")."""

    n_layer: int  # {arch}.block_count
    n_embd: int  # {arch}.embedding_length (d)
    n_ff: int  # {arch}.feed_forward_length (ff)
    n_head: int  # {arch}.attention.head_count (nh)
    n_head_kv: int  # {arch}.attention.head_count_kv (nkv), defaults to nh
    head_dim: int  # {arch}.attention.key_length, defaults to d / nh (hd)
    rope_dim: int  # {arch}.rope.dimension_count; llama.cpp requires it to equal hd for llama
    rope_base: float  # {arch}.rope.freq_base, defaults to 10000
    rope_freq_scale: float  # 1 / {arch}.rope.scaling.factor for linear scaling, else 1
    norm_eps: float  # {arch}.attention.layer_norm_rms_epsilon
    vocab_size: int  # rows of token_embd.weight (V)
    tied_embeddings: bool  # no output.weight: the head is token_embd.weight
    rope_freq_factors: bool  # a rope_freqs.weight tensor (Llama 3) divides each theta_i
    architecture: str  # general.architecture, a key of ARCHITECTURES
    biases: tuple[str, ...]  # the block matrices with a bias in this file, in every layer (qwen2: attn_q/k/v)

    @property
    def arch(self) -> Architecture:
        return ARCHITECTURES[self.architecture]

    @classmethod
    def from_layout(cls, layout: GGUFLayout) -> LlamaConfig:
        """Read the hyperparameters the way llama.cpp does; raise UnsupportedModelError if this
        forward would not compute what llama.cpp computes for the file."""
        name = layout.path.name
        arch = layout.get(Keys.General.ARCHITECTURE)
        if arch not in ARCHITECTURES:
            supported = " and ".join(repr(a) for a in ARCHITECTURES)
            raise UnsupportedModelError(f"{name}: architecture {arch!r}; the PyTorch forward supports {supported}")

        def key(template: str) -> str:  # a gguf.constants template ("{arch}.block_count") for this file
            return template.format(arch=arch)

        n_embd, n_head = _int(layout, key(Keys.LLM.EMBEDDING_LENGTH)), _int(layout, key(Keys.Attention.HEAD_COUNT))
        head_dim = _int(layout, key(Keys.Attention.KEY_LENGTH), n_embd // n_head)
        if _int(layout, key(Keys.Attention.VALUE_LENGTH), head_dim) != head_dim:
            raise UnsupportedModelError(f"{name}: key and value head sizes differ")
        rope_dim = _int(layout, key(Keys.Rope.DIMENSION_COUNT), head_dim)
        if rope_dim != head_dim:
            raise UnsupportedModelError(f"{name}: rope dimension {rope_dim} differs from head size {head_dim}")
        scaling = layout.get(key(Keys.Rope.SCALING_TYPE), "linear")
        if scaling not in ("linear", "none"):
            raise UnsupportedModelError(f"{name}: rope scaling {scaling!r} is not supported (only linear)")
        factor = _float(layout, key(Keys.Rope.SCALING_FACTOR), _float(layout, key(LEGACY_ROPE_SCALE), 0.0))
        tensors = {t.name: t for t in layout.tensors}
        if "token_embd.weight" not in tensors:
            raise UnsupportedModelError(f"{name}: no token_embd.weight tensor")
        config = cls(
            n_layer=_int(layout, key(Keys.LLM.BLOCK_COUNT)),
            n_embd=n_embd,
            n_ff=_int(layout, key(Keys.LLM.FEED_FORWARD_LENGTH)),
            n_head=n_head,
            n_head_kv=_int(layout, key(Keys.Attention.HEAD_COUNT_KV), n_head),
            head_dim=head_dim,
            rope_dim=rope_dim,
            rope_base=_float(layout, key(Keys.Rope.FREQ_BASE), 10000.0),
            rope_freq_scale=1.0 if scaling == "none" or factor == 0.0 else 1.0 / factor,
            norm_eps=_float(layout, key(Keys.Attention.LAYERNORM_RMS_EPS)),
            vocab_size=tensors["token_embd.weight"].shape[1],
            tied_embeddings="output.weight" not in tensors,
            rope_freq_factors=ARCHITECTURES[arch].rope_freqs and "rope_freqs.weight" in tensors,
            architecture=arch,
            biases=tuple(part for part in ARCHITECTURES[arch].biases if f"blk.0.{part}.bias" in tensors),
        )
        if config.n_head % config.n_head_kv:
            raise UnsupportedModelError(f"{name}: {n_head} heads are not a multiple of {config.n_head_kv} kv heads")
        expected = config.tensor_shapes()
        for tensor in layout.tensors:
            shape = tuple(reversed(tensor.shape))
            if tensor.name not in expected:
                raise UnsupportedModelError(f"{name}: tensor {tensor.name} is not part of a plain {arch} model")
            if shape != expected[tensor.name]:
                want = expected[tensor.name]
                raise UnsupportedModelError(f"{name}: {tensor.name} has shape {shape}, expected {want}")
        missing = sorted(expected.keys() - tensors.keys())
        if missing:
            raise UnsupportedModelError(f"{name}: missing tensor {missing[0]}")
        return config

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor this config implies, numpy-order shapes; exactly llama.cpp's tensor set for the architecture."""
        d, ff, q, kv = self.n_embd, self.n_ff, self.n_head * self.head_dim, self.n_head_kv * self.head_dim
        shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (self.vocab_size, d), "output_norm.weight": (d,)}
        if not self.tied_embeddings:
            shapes["output.weight"] = (self.vocab_size, d)
        if self.rope_freq_factors:
            shapes["rope_freqs.weight"] = (self.rope_dim // 2,)
        block = {
            "attn_norm": (d,), "attn_q": (q, d), "attn_k": (kv, d), "attn_v": (kv, d), "attn_output": (d, q),
            "ffn_norm": (d,), "ffn_gate": (ff, d), "ffn_up": (ff, d), "ffn_down": (d, ff),
        }
        for i in range(self.n_layer):
            shapes.update({f"blk.{i}.{part}.weight": shape for part, shape in block.items()})
            shapes.update({f"blk.{i}.{part}.bias": block[part][:1] for part in self.biases})
        return shapes

    @property
    def head_weight(self) -> str:
        """The head's weight: output.weight, or token_embd.weight in a tied model."""
        return "token_embd.weight" if self.tied_embeddings else "output.weight"


def _int(layout: GGUFLayout, key: str, default: int | None = None) -> int:
    value = layout.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise UnsupportedModelError(f"{layout.path.name}: metadata {key} is {value!r}, expected one integer")
    return value


def _float(layout: GGUFLayout, key: str, default: float | None = None) -> float:
    value = layout.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UnsupportedModelError(f"{layout.path.name}: metadata {key} is {value!r}, expected a number")
    return float(value)


def supports_forward(layout: GGUFLayout) -> bool:
    """True when `LlamaForward` computes what llama.cpp computes for this file."""
    try:
        LlamaConfig.from_layout(layout)
    except UnsupportedModelError:
        return False
    return True


# ---- the boxes of the diagram -------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * w over the last dimension (llama.cpp's RMS_NORM then MUL)."""
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * weight


def rope_rotations(
    config: LlamaConfig, positions: torch.Tensor, freq_factors: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """e^(i * pos * theta_i), theta_i = base^(-2i/rope_dim), complex (N, 1, hd/2).

    Angles are computed in float64: llama.cpp computes them in float32, and the difference is
    far below the float32 rounding of the matmuls around them.
    """
    i = torch.arange(config.rope_dim // 2, dtype=torch.float64)
    theta = config.rope_base ** (-2.0 * i / config.rope_dim)  # (hd/2,)
    if freq_factors is not None:
        theta = theta / freq_factors.double()  # Llama 3 long-context factors (rope_freqs.weight)
    angles = positions.double()[:, None] * (theta * config.rope_freq_scale)[None, :]  # (N, hd/2)
    return torch.polar(torch.ones_like(angles), angles).to(dtype.to_complex())[:, None, :]  # (N, 1, hd/2)


def apply_rope(x: torch.Tensor, rotations: torch.Tensor, neox: bool) -> torch.Tensor:
    """Rotate pair i of every head by pos * theta_i: (x[2i], x[2i+1]), or (x[i], x[i + hd/2]) if `neox`.

    llama.cpp's convert permutes the rows of llama's attn_q/attn_k so that the pairs Hugging Face
    rotates, (i, i + hd/2), become adjacent (Meta's original layout); llama.cpp then applies its
    "normal" rope mode to LLM_ARCH_LLAMA. qwen2's rows are not permuted, and llama.cpp rotates them
    in NEOX mode: the half-split pairs. Read as a complex number x_a + i*x_b, a pair is rotated by one
    complex multiplication. The wrong pairing for an architecture would be wrong for every file of it.
    """
    if neox:
        half = x.shape[-1] // 2
        pairs = torch.complex(x[..., :half].contiguous(), x[..., half:].contiguous())  # (N, heads, hd/2)
        turned = pairs * rotations
        return torch.cat((turned.real, turned.imag), dim=-1)  # (N, heads, hd)
    pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))  # (N, heads, hd/2) complex
    return torch.view_as_real(pairs * rotations).flatten(-2)  # (N, heads, hd)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd) + causal mask) v for B sequences of equal length T.

    q, k, v (B, T, nh, hd) -> (B, T, nh, hd): position t attends to positions 0..t of its own sequence.
    """
    y = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=1.0 / math.sqrt(q.shape[-1])
    )  # (B, nh, T, hd)
    return y.transpose(1, 2)  # (B, T, nh, hd)


# (part, x) -> y: the block's 2-D weight `part` ("attn_q", ...) applied to x (N, in), giving (N, out)
Linear = Callable[[str, torch.Tensor], torch.Tensor]


def llama_block(config: LlamaConfig, h: torch.Tensor, attn_norm: torch.Tensor, ffn_norm: torch.Tensor,
                linear: Linear, rotations: torch.Tensor, groups: Sequence[torch.Tensor],
                biases: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """One transformer block: h + attention(norm(h)), then + MLP(norm(·)); (N, d) -> (N, d).

    `linear` applies the weights, so a caller can hook inputs, collect statistics or train through them;
    attn_q/k/v (and ffn_gate/up) are handed the same x object. `biases[part]` (out,) is added to that
    weight's output, as llama.cpp adds qwen2's bq/bk/bv after the matmul; exactly the config's
    `biases` must be given. `groups` holds the (B, T) token indices of each set of
    equal-length sequences (one attention call each). RoPE runs in the precision of `rotations`
    (float32 for a bfloat16 model), then returns to h's dtype.
    """
    cfg, n, biases = config, h.shape[0], biases or {}
    if set(biases) != set(cfg.biases):
        raise ValueError(f"this {cfg.architecture} model's block takes biases for {cfg.biases}, got {tuple(biases)}")

    def project(part: str, x: torch.Tensor) -> torch.Tensor:  # W·x (+ b): (N, in) -> (N, out)
        y = linear(part, x)
        return y + biases[part] if part in biases else y

    x = rms_norm(h, attn_norm, cfg.norm_eps)  # (N, d)
    q = project("attn_q", x).view(n, cfg.n_head, cfg.head_dim)  # (N, nh, hd)
    k = project("attn_k", x).view(n, cfg.n_head_kv, cfg.head_dim)  # (N, nkv, hd)
    v = project("attn_v", x).view(n, cfg.n_head_kv, cfg.head_dim)  # (N, nkv, hd)
    rope_dtype = rotations.real.dtype
    q = apply_rope(q.to(rope_dtype), rotations, cfg.arch.rope_neox).to(h.dtype)
    k = apply_rope(k.to(rope_dtype), rotations, cfg.arch.rope_neox).to(h.dtype)
    # GQA: query head h reads kv head h // (nh / nkv), i.e. each kv head serves a run of adjacent query heads
    k = k.repeat_interleave(cfg.n_head // cfg.n_head_kv, dim=1)  # (N, nh, hd)
    v = v.repeat_interleave(cfg.n_head // cfg.n_head_kv, dim=1)  # (N, nh, hd)
    heads = torch.empty_like(q)  # (N, nh, hd)
    for index in groups:  # (B, T)
        heads[index] = causal_attention(q[index], k[index], v[index])  # (B, T, nh, hd)
    heads = heads.view(n, cfg.n_head * cfg.head_dim)  # (N, nh*hd): head h in columns h*hd .. (h+1)*hd
    h = h + project("attn_output", heads)  # (N, d)
    x = rms_norm(h, ffn_norm, cfg.norm_eps)  # (N, d)
    return h + project("ffn_down", F.silu(project("ffn_gate", x)) * project("ffn_up", x))  # (N, ff) -> (N, d)


# ---- the model ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    """The sequences of one forward, flattened into N tokens."""

    tokens: torch.Tensor  # (N,)
    lengths: list[int]
    rotations: torch.Tensor  # (N, 1, hd/2) complex: RoPE at each token's position in its sequence
    groups: list[torch.Tensor]  # (B, T) token indices of the B sequences of length T, one attention call each


class LlamaForward:
    """The llama-family forward over a GGUF's weights, layer-major, with optional input hooks per weight.

    `weights(name)` replaces `source.dequantize` (reference weights from another file, or modified
    ones); it must return numpy-order arrays of the source's shapes. `input_hooks[name]` maps the
    input x (N, in) of the 2-D weight `name` before its matmul: y = W · hook(x). Hook keys are GGUF
    weight names; the head is "output.weight", or "token_embd.weight" in a tied model. A hook
    returns a new tensor and leaves x alone: attn_q/k/v (and ffn_gate/up) are handed the same x.
    """

    def __init__(
        self,
        source: TensorSource | str | Path,
        weights: Callable[[str], np.ndarray] | None = None,
        input_hooks: Mapping[str, Hook] | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, not {dtype}")
        self.source = source if isinstance(source, TensorSource) else TensorSource(source)
        self.config = LlamaConfig.from_layout(self.source.layout)
        self.dtype, self.device = dtype, torch.device(device)
        self._weights = weights or self.source.dequantize
        self._hooks = dict(input_hooks or {})
        matrices = {name for name, shape in self.config.tensor_shapes().items() if len(shape) == 2}
        unknown = sorted(self._hooks.keys() - matrices)
        if unknown:
            raise InputError(f"input hook for {unknown[0]}, which is not a 2-D weight of {self.source.path.name}")

    @torch.inference_mode()
    def logits(self, token_sequences: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Logits at every position of every sequence, each (T, V) float32; full causal attention."""
        batch = self._batch(token_sequences)
        logits = self.head(self._forward(batch, sums=None)).float()  # (N, V)
        return [chunk.numpy() for chunk in logits.split(batch.lengths)]

    @torch.inference_mode()
    def input_mean_squares(self, token_sequences: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
        """mean over all tokens of x^2, per input column, of the input each 2-D weight multiplies.

        Keys: every blk.*.{attn_q,attn_k,attn_v,attn_output,ffn_gate,ffn_up,ffn_down}.weight and,
        if the model has one, output.weight (a tied head shares token_embd.weight with the
        embedding, so it gets no entry). x is taken after the weight's input hook, because that is
        what the weight multiplies. Sums are float64; values float32 of length in_features.
        """
        return self.input_statistics(token_sequences, second_moments=False)[0]

    @torch.inference_mode()
    def input_statistics(self, token_sequences: Sequence[Sequence[int]], second_moments: bool = True
                         ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(E[x²] per column as `input_mean_squares` gives it, E[x xᵀ] per weight).

        E[x xᵀ] is (in, in) float64, only for inputs at most SECOND_MOMENT_MAX_WIDTH wide, and one
        array object for all weights that share an input (attn_q/k/v, ffn_gate/up); empty when
        `second_moments` is False.
        """
        batch = self._batch(token_sequences)
        stats = InputStatistics(second_moments)
        hidden = self._forward(batch, stats)  # (N, d)
        if not self.config.tied_embeddings:
            self._input("output.weight", self._final_norm(hidden), stats)
        n = len(batch.tokens)
        return stats.mean_squares(n), stats.second_moments(n)

    # -- internals --

    # -- one step at a time: for callers that train through the forward (convert/theta_train.py) --

    def batch(self, token_sequences: Sequence[Sequence[int]]) -> Batch:
        """The sequences flattened into N tokens, with their RoPE rotations and attention groups."""
        return self._batch(token_sequences)

    def embed(self, batch: Batch) -> torch.Tensor:
        """The hidden states (N, d) entering block 0."""
        return self._weight("token_embd.weight")[batch.tokens.to(self.device)]  # neither llama nor qwen2 scales embeddings

    def layer(self, i: int) -> Layer:
        """Block i's weights, norms included, and its biases (qwen2's q/k/v) under "PART.bias"."""
        w = {part: self._weight(f"blk.{i}.{part}.weight") for part in ("attn_norm", "ffn_norm", *BLOCK_MATRICES)}
        return w | {f"{part}.bias": self._weight(f"blk.{i}.{part}.bias") for part in self.config.biases}

    def block(self, i: int, w: Layer, h: torch.Tensor, batch: Batch,
              corrections: Mapping[str, Hook] | None = None, sums: Sums = None) -> torch.Tensor:
        """Block i with weights `w` on h (N, d); `corrections[name](x)` is added to weight `name`'s output."""
        linear = self._layer_linear(i, w, sums)
        if corrections:
            base = linear

            def linear(part: str, x: torch.Tensor) -> torch.Tensor:
                name = f"blk.{i}.{part}.weight"
                y = base(part, x)
                return y + corrections[name](x) if name in corrections else y

        biases = {part: w[f"{part}.bias"] for part in self.config.biases}
        return llama_block(self.config, h, w["attn_norm"], w["ffn_norm"], linear, batch.rotations, batch.groups,
                           biases)

    def head_layer(self) -> Layer:
        """The final norm's and the head's weights, for callers that apply the head many times."""
        return {"output_norm": self._weight("output_norm.weight"), "head": self._weight(self.config.head_weight)}

    def head(self, h: torch.Tensor, w: Layer | None = None) -> torch.Tensor:
        """Logits (N, V) of the hidden states leaving the last block: the final norm, then the head (tied: x @
        token_embd^T); `w`: `head_layer()`, read from the file when None."""
        w = w or self.head_layer()
        x = self._input(self.config.head_weight, self._final_norm(h, w["output_norm"]), None)
        return F.linear(x, w["head"])

    def _final_norm(self, h: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        return rms_norm(h, self._weight("output_norm.weight") if weight is None else weight, self.config.norm_eps)

    def _forward(self, batch: Batch, sums: Sums) -> torch.Tensor:
        """Hidden states (N, d) of all tokens leaving the last block, one layer at a time."""
        h = self.embed(batch)  # (N, d)
        for i in range(self.config.n_layer):
            w = self.layer(i)
            h = self.block(i, w, h, batch, sums=sums)  # (N, d)
            del w  # this layer's weights go before the next layer's are read
        return h

    def _layer_linear(self, i: int, w: Layer, sums: Sums) -> Linear:
        """Layer i's weights `w` as the block's `linear`, through the input hooks and statistics."""
        return lambda part, x: self._linear(f"blk.{i}.{part}.weight", x, w[part], sums)

    def _linear(self, name: str, x: torch.Tensor, weight: torch.Tensor, sums: Sums) -> torch.Tensor:
        """y = W · hook(x): (N, in) -> (N, out)."""
        return F.linear(self._input(name, x, sums), weight)

    def _input(self, name: str, x: torch.Tensor, sums: Sums) -> torch.Tensor:
        """The input weight `name` multiplies, hook(x); its statistics go to `sums`."""
        hook = self._hooks.get(name)
        if hook is not None:
            x = hook(x)
        if sums is not None:
            sums.add(name, x)
        return x

    def _weight(self, name: str) -> torch.Tensor:
        array = self._weights(name)
        expected = self.source.numpy_shape(name)
        if tuple(array.shape) != expected:
            raise InputError(f"weights for {name} have shape {tuple(array.shape)}, expected {expected}")
        # np.array copies: a source may hand out read-only views of its memory map
        return torch.from_numpy(np.array(array, dtype=np.float32)).to(self.device, self.dtype)

    def _batch(self, token_sequences: Sequence[Sequence[int]]) -> Batch:
        if not token_sequences or any(len(seq) == 0 for seq in token_sequences):
            raise InputError("token sequences must be a non-empty list of non-empty sequences")
        tokens = torch.tensor([t for seq in token_sequences for t in seq], dtype=torch.long)  # (N,)
        if tokens.min() < 0 or tokens.max() >= self.config.vocab_size:
            raise InputError(f"token ids must lie in [0, {self.config.vocab_size})")
        lengths = [len(seq) for seq in token_sequences]
        positions = torch.cat([torch.arange(n) for n in lengths])  # (N,): each sequence starts at 0
        freq_factors = self._weight("rope_freqs.weight") if self.config.rope_freq_factors else None
        starts: dict[int, list[int]] = {}  # sequence length -> where those sequences start in N
        for start, n in zip(accumulate(lengths, initial=0), lengths):
            starts.setdefault(n, []).append(start)
        groups = [torch.tensor(s)[:, None] + torch.arange(n)[None, :] for n, s in starts.items()]  # (B, T) each
        rotations = rope_rotations(self.config, positions, freq_factors.cpu() if freq_factors is not None else None,
                                   self.dtype)
        return Batch(tokens, lengths, rotations.to(self.device), [g.to(self.device) for g in groups])
