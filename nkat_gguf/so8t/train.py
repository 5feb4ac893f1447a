"""`nkat-gguf so8t train`: learn SO8T rotations on a frozen llama GGUF, written as a gate checkpoint.

Every trained rotation is block-diagonal, R = diag(R_1 … R_{n/8}), R_k = exp(σ(α)·A_k) with A_k the
skew part of a free 8×8 parameter and σ(α) the **alpha gate**, one scalar per rotation, initialised at
α = −5 (σ ≈ 0.0067). A starts at zero, so training starts from exactly "no rotation". The base weights
are dequantized once and frozen; only A and α get gradients.

Objectives
- `quant` (default): the function-preserving rotations the bake supports, R1 on the residual stream
  (norms folded) and optionally R2 per layer on each value head. The loss is KL(p_ref ‖ p_q): p_ref the
  unrotated model in full precision, p_q the rotated model with every weight passed through the
  emulation of llama.cpp's quantizer for the target type (`fake_quant.py`, straight-through gradient).
- `lm`: one-sided gates on chosen weights (default: each attn_output, y = W_o·(R·h)), trained with the
  next-token loss on `--train-text`; this changes the model, baked as W' = W·R.

Regulariser: λ(t)·mean over blocks of ‖σ(α)·A_k‖²_F, with λ(t) = λ_max·min(1, t / warmup).
‖σ(α)·A_k‖_F is the size of log R_k, i.e. (√2 times) the rotation angle of block k away from the
identity, so the term is a prior towards "no rotation": a rotation must pay for itself in the objective.
λ ramps up from 0 so that the first steps can find a direction before the prior weighs in.

Memory is flat in depth: each layer runs under activation checkpointing (its rotated and fake-quantized
weights are recomputed in the backward pass instead of being kept). Training state (gates, optimizer,
history) is saved every `checkpoint_every` steps beside the output; the same command resumes from it.
"""

from __future__ import annotations

import json
import pickle
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from nkat_gguf.engine.forward.llama import BLOCK_MATRICES, LlamaConfig, llama_block, rms_norm, rope_rotations
from nkat_gguf.engine.llama.vocab import tokenize
from nkat_gguf.errors import InputError, UnsupportedModelError
from nkat_gguf.format.atomic import atomic_output, check_writable_dir
from nkat_gguf.format.tensors import TensorSource
from nkat_gguf.so8t.checkpoint import ALPHA, GENERATOR, HEADS, RESIDUAL
from nkat_gguf.so8t.fake_quant import APPROXIMATE, EXACT, fake_quantize
from nkat_gguf.so8t.rotations import BLOCK
from nkat_gguf.texts import load_text

OBJECTIVES = ("quant", "lm")
ALPHA_INIT = -5.0
OPEN_LEVEL = 0.5  # a gate "opened" at the first step where σ(α) ≥ this
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}
STATE_SUFFIX = ".train-state.pt"
_READS_RESIDUAL = {"attn_q": "attn_norm", "attn_k": "attn_norm", "attn_v": "attn_norm",
                   "ffn_gate": "ffn_norm", "ffn_up": "ffn_norm"}
_WRITES_RESIDUAL = ("attn_output", "ffn_down")


@dataclass(frozen=True)
class TrainOptions:
    model: Path
    output: Path
    objective: str = "quant"
    outtype: str = "Q4_0"  # quant: the llama.cpp type whose quantizer is emulated
    imatrix: bool = True  # quant: emulate quantizing with an importance matrix (E[x²] of each batch)
    heads: bool = False  # quant: also R2 per layer on the value heads
    quant_layers: int = 0  # quant: layers fake-quantized per step, drawn at random (0: all, and the head)
    gate_weights: tuple[str, ...] = ("attn_output",)  # lm: the weight roles whose inputs are gated
    train_text: Path | None = None  # default: the calibration split
    eval_text: Path | None = None  # default: the evaluation split
    steps: int = 40
    batch: int = 2  # sequences per micro-batch
    ctx: int = 128  # tokens per sequence
    accumulate: int = 1  # micro-batches per optimizer step
    lr: float = 0.02  # Adam, for A and α alike
    lambda_max: float = 1e-2
    warmup: int = 10
    device: str = "auto"
    dtype: str = "f32"  # the frozen weights' and activations' precision
    checkpoint_every: int = 10
    eval_every: int = 10
    eval_sequences: int = 2
    threads: int | None = None
    seed: int = 0
    progress: bool = True

    def fingerprint(self) -> dict[str, Any]:
        """What a resumed run must share with the saved one (the step count may grow)."""
        keys = ("objective", "outtype", "imatrix", "heads", "quant_layers", "gate_weights", "batch", "ctx", "accumulate", "lr",
                "lambda_max", "warmup", "dtype", "seed")
        out = {k: getattr(self, k) for k in keys}
        out["gate_weights"] = list(self.gate_weights)
        out["model"] = Path(self.model).name
        out["train_text"] = str(self.train_text)
        return out


# ---- gates --------------------------------------------------------------------------------------


class Gate(torch.nn.Module):
    """One rotation R = exp(σ(α)·A) of width n = 8·blocks; A = (P − Pᵀ)/2 of a free parameter P."""

    def __init__(self, width: int):
        super().__init__()
        if width % BLOCK:
            raise UnsupportedModelError(f"width {width} is not a multiple of {BLOCK}; SO(8) gates need one")
        self.raw = torch.nn.Parameter(torch.zeros(width // BLOCK, BLOCK, BLOCK))
        self.alpha = torch.nn.Parameter(torch.tensor(ALPHA_INIT))

    def skew(self) -> torch.Tensor:
        return (self.raw - self.raw.mT) / 2

    def sigma(self) -> torch.Tensor:
        return torch.sigmoid(self.alpha)

    def rotation(self) -> torch.Tensor:
        """(n/8, 8, 8) float32 blocks R_k."""
        return torch.linalg.matrix_exp(self.sigma() * self.skew())

    def penalty(self) -> torch.Tensor:
        """mean over blocks of ‖σ(α)·A_k‖²_F: how far R is from the identity."""
        return (self.sigma() * self.skew()).square().sum((1, 2)).mean()


def rotate_columns(w: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """W·R over the last axis: (W·R)[:, 8k+j] = Σ_i W[:, 8k+i] R_k[i, j]."""
    m = blocks.shape[0]
    return torch.einsum("rmi,mij->rmj", w.reshape(-1, m, BLOCK), blocks.to(w.dtype)).reshape(w.shape)


def rotate_rows_transposed(blocks: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Rᵀ·W over the first axis."""
    m = blocks.shape[0]
    return torch.einsum("mij,mic->mjc", blocks.to(w.dtype), w.reshape(m, BLOCK, -1)).reshape(w.shape)


def block_figures(blocks: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(‖R_kᵀR_k − I‖_F, det R_k) per block, in float64."""
    b = blocks.detach().double()
    eye = torch.eye(BLOCK, dtype=torch.float64)
    return (torch.linalg.matrix_norm(b.mT @ b - eye).numpy(), torch.linalg.det(b).numpy())


# ---- the model ----------------------------------------------------------------------------------

WeightFn = Callable[[str, torch.Tensor | None], torch.Tensor]  # (name, input x or None) -> effective weight


class FrozenLlama:
    """The llama forward of `engine/forward/llama.py` (its `llama_block`) with autograd and per-layer checkpointing.

    `fold_norms`: RMSNorm weights are folded into the matrices they feed (W·diag(g)) and the norms
    become ones, as the residual bake writes them; the function is unchanged. A tied model keeps its
    embedding and gets its own (folded) head, "output.weight".
    """

    def __init__(self, source: TensorSource, dtype: torch.dtype, device: torch.device, fold_norms: bool,
                 progress: bool):
        arch = source.layout.architecture
        if arch != "llama":
            raise UnsupportedModelError(f"so8t train supports the llama architecture (the PyTorch forward "
                                        f"forward); {source.path.name} is {arch!r}")
        self.config = cfg = LlamaConfig.from_layout(source.layout)
        self.device, self.dtype, self.folded = device, dtype, fold_norms
        self.weights: dict[str, torch.Tensor] = {}

        def load(name: str) -> torch.Tensor:
            return torch.from_numpy(np.array(source.dequantize(name), dtype=np.float32))

        self.weights["token_embd.weight"] = load("token_embd.weight")
        out_norm = load("output_norm.weight")
        head = load(cfg.head_weight)
        self.weights["output.weight"] = head * out_norm if fold_norms else head
        self.weights["output_norm.weight"] = torch.ones_like(out_norm) if fold_norms else out_norm
        if cfg.rope_freq_factors:
            self.weights["rope_freqs.weight"] = load("rope_freqs.weight")
        for i in tqdm(range(cfg.n_layer), desc="loading weights", unit="layer", disable=not progress, leave=False):
            norms = {part: load(f"blk.{i}.{part}.weight") for part in ("attn_norm", "ffn_norm")}
            for part in BLOCK_MATRICES:
                w = load(f"blk.{i}.{part}.weight")
                if fold_norms and part in _READS_RESIDUAL:
                    w = w * norms[_READS_RESIDUAL[part]][None, :]
                self.weights[f"blk.{i}.{part}.weight"] = w
            for part, g in norms.items():
                self.weights[f"blk.{i}.{part}.weight"] = torch.ones_like(g) if fold_norms else g
        for name, w in self.weights.items():
            self.weights[name] = w.to(device=device, dtype=dtype).requires_grad_(False)

    def logits(self, tokens: torch.Tensor, weight: WeightFn, checkpointed: bool) -> torch.Tensor:
        """tokens (B, T) -> logits (B·T, V) float32."""
        cfg = self.config
        b, t = tokens.shape
        flat = tokens.reshape(-1).to(self.device)
        h = weight("token_embd.weight", flat)  # (N, d): the embedding WeightFn gets the token ids, returns rows
        positions = torch.arange(t).repeat(b)
        freq = self.weights.get("rope_freqs.weight")
        rope = rope_rotations(cfg, positions, freq, torch.float32).to(self.device)
        groups = [torch.arange(b * t, device=self.device).view(b, t)]  # (B, T): all sequences are T long
        for i in range(cfg.n_layer):
            if checkpointed:
                h = checkpoint(self._layer, h, i, rope, groups, weight, use_reentrant=False)
            else:
                h = self._layer(h, i, rope, groups, weight)
        x = rms_norm(h, self.weights["output_norm.weight"], cfg.norm_eps)
        return F.linear(x, weight("output.weight", x)).float()

    def _layer(self, h: torch.Tensor, i: int, rope: torch.Tensor, groups: list[torch.Tensor],
               weight: WeightFn) -> torch.Tensor:
        p = f"blk.{i}."
        return llama_block(self.config, h, self.weights[p + "attn_norm.weight"], self.weights[p + "ffn_norm.weight"],
                           lambda part, x: F.linear(x, weight(p + part + ".weight", x)), rope, groups)


def _embedding_rows(model: FrozenLlama, tokens: torch.Tensor) -> torch.Tensor:
    return model.weights["token_embd.weight"][tokens]


# ---- objectives ---------------------------------------------------------------------------------


class QuantObjective:
    """R1 (and R2) rotations of the fake-quantized model, against the unrotated full-precision model."""

    def __init__(self, model: FrozenLlama, opts: TrainOptions):
        cfg = model.config
        self.model, self.opts = model, opts
        self.gates = {RESIDUAL: Gate(cfg.n_embd)}
        if opts.heads:
            self.gates |= {HEADS.format(i): Gate(cfg.head_dim) for i in range(cfg.n_layer)}
        self.types = self._types()

    def _types(self) -> dict[str, str]:
        """The type llama.cpp's quantizer gives each weight of the rotated (untied) model for this target.

        The head: Q6_K, which falls back to Q8_0 when rows are not a multiple of 256 (SmolLM2: 576);
        for Q4_0 with an importance matrix the first n_layer/8 ffn_down become Q4_1 (llama-quant.cpp).
        """
        cfg, target = self.model.config, self.opts.outtype
        types = {name: target for name in self.model.weights if name.endswith(".weight")}
        types["output.weight"] = "Q8_0" if cfg.n_embd % 256 else "Q6_K"
        if target == "Q4_0" and self.opts.imatrix:
            for i in range(cfg.n_layer // 8):
                types[f"blk.{i}.ffn_down.weight"] = "Q4_1"
        if types["output.weight"] == "Q6_K":
            raise InputError("the head of this model would be Q6_K, which is not emulated")
        return types

    def sampled_layers(self, step: int | None) -> set[int]:
        """The layers fake-quantized at `step` (all, or `quant_layers` drawn from (seed, step)); None: the evaluation draw."""
        n, k = self.model.config.n_layer, self.opts.quant_layers
        if not k or k >= n:
            return set(range(n))
        rng = np.random.default_rng([self.opts.seed, 0 if step is None else step])  # training steps count from 1
        return {int(i) for i in rng.choice(n, size=k, replace=False)}

    def weight_fn(self, step: int | None = None) -> WeightFn:
        """Effective weights of the rotated, fake-quantized model, written in the unrotated basis.

        The rotated model computes y' = fq(W·Q)·x' with x' = Qᵀx; that is y = (fq(W·Q)·Qᵀ)·x, and for a
        weight writing the residual stream y = (Q·fq(Qᵀ·W))·x. So the forward runs unrotated and only the
        fake-quantized weights see the rotation: a weight left unquantized (a layer not drawn this step)
        is the base weight itself, since the rotation is function-preserving there.
        """
        model, cfg = self.model, self.model.config
        q = self.gates[RESIDUAL].rotation()
        qt = q.mT
        layers = self.sampled_layers(step)
        everything = len(layers) == cfg.n_layer
        r2 = {i: self.gates[HEADS.format(i)].rotation() for i in layers} if self.opts.heads else {}

        def quantized(w: torch.Tensor, name: str, x_rot: torch.Tensor | None) -> torch.Tensor:
            imatrix = x_rot.detach().float().square().mean(0) if (self.opts.imatrix and x_rot is not None) else None
            return fake_quantize(w.float(), self.types[name], imatrix).to(w.dtype)

        def weight(name: str, x: torch.Tensor | None) -> torch.Tensor:
            if name == "token_embd.weight":  # x holds token ids: rotate and quantize only the rows used
                rows = model.weights[name][x]
                return rotate_columns(quantized(rotate_columns(rows, q), name, None), qt)
            layer = int(name.split(".")[1]) if name.startswith("blk.") else None
            if not (everything if layer is None else layer in layers):
                return model.weights[name]
            w, role = model.weights[name], name.split(".")[-2]
            if role == "ffn_down":
                return rotate_rows_transposed(qt, quantized(rotate_rows_transposed(q, w), name, x))
            if role == "attn_output":
                heads = r2[layer].repeat(cfg.n_head, 1, 1) if layer in r2 else None
                w = rotate_rows_transposed(q, w)
                if heads is None:
                    return rotate_rows_transposed(qt, quantized(w, name, x))
                w_rot = quantized(rotate_columns(w, heads), name, rotate_columns(x, heads))
                return rotate_columns(rotate_rows_transposed(qt, w_rot), heads.mT)
            x_rot = rotate_columns(x, q)  # the rotated model's input of this weight, x·Q per row
            w = rotate_columns(w, q)
            if role == "attn_v" and layer in r2:
                heads = r2[layer].repeat(cfg.n_head_kv, 1, 1)
                w_rot = quantized(rotate_rows_transposed(heads, w), name, x_rot)
                return rotate_columns(rotate_rows_transposed(heads.mT, w_rot), qt)
            return rotate_columns(quantized(w, name, x_rot), qt)

        return weight

    def reference_fn(self) -> WeightFn:
        model = self.model

        def weight(name: str, x: torch.Tensor | None) -> torch.Tensor:
            return _embedding_rows(model, x) if name == "token_embd.weight" else model.weights[name]

        return weight

    def loss(self, logits: torch.Tensor, tokens: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        """mean over tokens of KL(p_ref ‖ p_q); `target` is the reference's log-probabilities."""
        log_q = torch.log_softmax(logits, -1)
        ref = target.float()
        return (ref.exp() * (ref - log_q)).sum(-1).mean()

    def needs_target(self) -> bool:
        return True

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return _gate_tensors(self.gates)


class LmObjective:
    """One-sided gates y = W·(R·x) on the chosen weights, next-token loss."""

    def __init__(self, model: FrozenLlama, opts: TrainOptions):
        cfg = model.config
        roles = set(opts.gate_weights)
        unknown = sorted(roles - set(BLOCK_MATRICES))
        if unknown or not roles:
            raise InputError(f"--gate {unknown[0] if unknown else '(none)'}: choose among {', '.join(BLOCK_MATRICES)}")
        self.model, self.opts = model, opts
        self.gates = {f"blk.{i}.{role}.weight": Gate(model.weights[f"blk.{i}.{role}.weight"].shape[1])
                      for i in range(cfg.n_layer) for role in BLOCK_MATRICES if role in roles}

    def weight_fn(self, step: int | None = None) -> WeightFn:
        model = self.model
        rotations = {name: gate.rotation() for name, gate in self.gates.items()}

        def weight(name: str, x: torch.Tensor | None) -> torch.Tensor:
            if name == "token_embd.weight":
                return _embedding_rows(model, x)
            w = model.weights[name]
            return rotate_columns(w, rotations[name]) if name in rotations else w

        return weight

    def loss(self, logits: torch.Tensor, tokens: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        b, t = tokens.shape
        z = logits.view(b, t, -1)[:, :-1].reshape(-1, logits.shape[-1])
        return F.cross_entropy(z, tokens[:, 1:].reshape(-1).to(z.device))

    def needs_target(self) -> bool:
        return False

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return _gate_tensors(self.gates)


def _gate_tensors(gates: dict[str, Gate]) -> dict[str, torch.Tensor]:
    """The checkpoint of docs/SO8T_CHECKPOINT.md: the skew generator A and α per gated name."""
    out = {}
    for name, gate in gates.items():
        out[f"{name}.{GENERATOR}"] = gate.skew().detach().float().cpu().contiguous()
        out[f"{name}.{ALPHA}"] = gate.alpha.detach().float().cpu().reshape(())
    return out


# ---- data ---------------------------------------------------------------------------------------


def windows(tokens: list[int], ctx: int, needed: int, what: str) -> torch.Tensor:
    """Consecutive windows (n, ctx) of a token list; at least `needed` of them, or one clear line."""
    n = len(tokens) // ctx
    if n < needed:
        raise InputError(f"{what} has {len(tokens)} tokens: {needed} sequences of {ctx} need {needed * ctx}; "
                         "give a longer text or a smaller --batch/--ctx")
    return torch.tensor(tokens[: n * ctx], dtype=torch.long).view(n, ctx)


# ---- training -----------------------------------------------------------------------------------


@dataclass
class TrainResult:
    output: str
    objective: str
    steps: int
    resumed_from: int
    seconds: float
    tokens_per_second: float
    gates: dict[str, dict[str, float]]  # name -> sigma, opened_step, ...
    history: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    block_figures: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: torch sees no CUDA GPU (use auto or cpu)")
    if choice not in ("cpu", "cuda"):
        raise InputError(f"unknown --device {choice!r}: expected auto, cpu or cuda")
    return torch.device(choice)


def check_options(opts: TrainOptions) -> None:
    """One-line refusals before any long work."""
    if opts.objective not in OBJECTIVES:
        raise InputError(f"unknown objective {opts.objective!r}: expected {' or '.join(OBJECTIVES)}")
    for value, flag in ((opts.steps, "--steps"), (opts.batch, "--batch"), (opts.ctx, "--ctx"),
                        (opts.accumulate, "--accumulate"), (opts.checkpoint_every, "--checkpoint-every"),
                        (opts.eval_every, "--eval-every"), (opts.eval_sequences, "--eval-sequences")):
        if value < 1:
            raise InputError(f"{flag} must be at least 1, got {value}")
    if opts.quant_layers < 0:
        raise InputError(f"--quant-layers must be >= 0 (0: all), got {opts.quant_layers}")
    if opts.ctx < 2:
        raise InputError(f"--ctx must be at least 2, got {opts.ctx}")
    if opts.warmup < 0 or opts.lambda_max < 0 or not opts.lr > 0:
        raise InputError("--warmup and --lambda-max must be >= 0 and --lr > 0")
    if opts.objective == "quant":
        if not (opts.outtype in EXACT or opts.outtype in APPROXIMATE):
            raise InputError(f"--outtype {opts.outtype}: its quantizer is not emulated; choose one of "
                             f"{', '.join(EXACT)} (exact) or {', '.join(APPROXIMATE)}")
        if opts.outtype == "IQ4_NL" and not opts.imatrix:
            raise InputError("IQ4_NL without an importance matrix puts the first layers' ffn_down in Q5_K, "
                             "which is not emulated; keep the importance matrix")
    if opts.dtype not in DTYPES:
        raise InputError(f"unknown --dtype {opts.dtype!r}: expected {' or '.join(DTYPES)}")
    if not Path(opts.model).is_file():
        raise InputError(f"no such model: {opts.model}")
    out = Path(opts.output)
    if out.is_dir():
        raise InputError(f"--output {out} is a directory; give a file name")
    check_writable_dir(out.parent.resolve())
    resolve_device(opts.device)


def lambda_at(step: int, opts: TrainOptions) -> float:
    """λ(t) = λ_max·min(1, t / warmup); t counts from 1."""
    return opts.lambda_max * (1.0 if opts.warmup == 0 else min(1.0, step / opts.warmup))


def train(opts: TrainOptions) -> TrainResult:
    """Train, checkpointing every `checkpoint_every` steps; resumes from `<output>.train-state.pt`."""
    check_options(opts)
    device = resolve_device(opts.device)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    source = TensorSource(opts.model)
    if source.layout.architecture != "llama":
        raise UnsupportedModelError(f"so8t train supports the llama architecture (the PyTorch forward); "
                                    f"{Path(opts.model).name} is {source.layout.architecture!r}")
    train_tokens = tokenize(Path(opts.model), load_text(opts.train_text, "calibration").content)
    eval_tokens = tokenize(Path(opts.model), load_text(opts.eval_text, "evaluation").content)
    train_seqs = windows(train_tokens, opts.ctx, opts.batch, "the training text")
    eval_seqs = windows(eval_tokens, opts.ctx, opts.eval_sequences, "the evaluation text")[: opts.eval_sequences]

    model = FrozenLlama(source, DTYPES[opts.dtype], device, opts.objective == "quant", opts.progress)
    objective = QuantObjective(model, opts) if opts.objective == "quant" else LmObjective(model, opts)
    params = [p for gate in objective.gates.values() for p in gate.parameters()]
    for gate in objective.gates.values():
        gate.to(device)
    optimizer = torch.optim.Adam(params, lr=opts.lr)
    state_path = Path(str(opts.output) + STATE_SUFFIX)
    history, evals, start = _resume(state_path, opts, objective, optimizer)
    targets: dict[tuple[str, int], torch.Tensor] = {}

    def target(kind: str, index: int, seqs: torch.Tensor) -> torch.Tensor | None:
        """The reference's log-probabilities for one sequence (computed once, kept in bf16)."""
        if not objective.needs_target():
            return None
        key = (kind, index)
        if key not in targets:
            with torch.no_grad():
                z = model.logits(seqs[index : index + 1], objective.reference_fn(), checkpointed=False)
                targets[key] = torch.log_softmax(z, -1).to(torch.bfloat16)
        return targets[key]

    def batch_loss(kind: str, seqs: torch.Tensor, indices: list[int], grad: bool, step: int | None) -> torch.Tensor:
        tokens = seqs[indices]
        goal = None
        if objective.needs_target():
            goal = torch.cat([target(kind, i, seqs) for i in indices])
        with torch.set_grad_enabled(grad):
            logits = model.logits(tokens, objective.weight_fn(step), checkpointed=grad)
            return objective.loss(logits, tokens, goal)

    def evaluate(step: int) -> None:
        with torch.no_grad():
            value = float(batch_loss("eval", eval_seqs, list(range(len(eval_seqs))), grad=False, step=None))
        evals.append({"step": step, "eval_loss": value})

    if start == 0 and not evals:
        evaluate(0)
    t0 = time.perf_counter()
    tokens_done = 0
    bar = tqdm(total=opts.steps, initial=min(start, opts.steps), desc=f"so8t train ({opts.objective})",
               unit="step", disable=not opts.progress)
    for step in range(start + 1, opts.steps + 1):
        t_step = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        lam = lambda_at(step, opts)
        total_obj = 0.0
        for micro in range(opts.accumulate):
            first = ((step - 1) * opts.accumulate + micro) * opts.batch
            indices = [(first + j) % len(train_seqs) for j in range(opts.batch)]
            loss = batch_loss("train", train_seqs, indices, grad=True, step=step)
            (loss / opts.accumulate).backward()
            total_obj += float(loss.detach()) / opts.accumulate
        penalty = torch.stack([gate.penalty() for gate in objective.gates.values()]).mean()
        (lam * penalty).backward()
        optimizer.step()
        n_tokens = opts.batch * opts.accumulate * opts.ctx
        tokens_done += n_tokens
        rate = n_tokens / (time.perf_counter() - t_step)
        history.append(_record(step, total_obj, float(penalty.detach()), lam, rate, objective.gates))
        if step % opts.eval_every == 0 or step == opts.steps:
            evaluate(step)
        if step % opts.checkpoint_every == 0 or step == opts.steps:
            _save_state(state_path, opts, objective, optimizer, history, evals, step)
        sigmas = [h for h in history[-1]["sigma"].values()]
        bar.set_postfix(loss=f"{total_obj:.4g}", sigma=f"{min(sigmas):.3g}-{max(sigmas):.3g}", tok_s=f"{rate:.0f}")
        bar.update(1)
    bar.close()
    seconds = time.perf_counter() - t0
    _write_checkpoint(Path(opts.output), objective.checkpoint_tensors())
    figures = {}
    for name, gate in objective.gates.items():
        err, det = block_figures(gate.rotation())
        figures[name] = {"orthogonality_error": err.tolist(), "det": det.tolist()}
    return TrainResult(str(opts.output), opts.objective, opts.steps, start, round(seconds, 3),
                       tokens_done / seconds if seconds > 0 and tokens_done else 0.0,
                       gate_summary(history, objective.gates), history, evals, figures,
                       {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()})


def _record(step: int, loss: float, penalty: float, lam: float, rate: float, gates: dict[str, Gate]) -> dict[str, Any]:
    with torch.no_grad():
        figures = {name: block_figures(gate.rotation()) for name, gate in gates.items()}
        return {"step": step, "loss": loss, "penalty": penalty, "lambda": lam, "tokens_per_second": rate,
                "sigma": {name: float(gate.sigma()) for name, gate in gates.items()},
                "max_orthogonality_error": {name: float(f[0].max()) for name, f in figures.items()},
                "min_det": {name: float(f[1].min()) for name, f in figures.items()}}


def gate_summary(history: list[dict[str, Any]], gates: dict[str, Gate]) -> dict[str, dict[str, Any]]:
    """Per gate: final σ, the step it opened (first σ ≥ OPEN_LEVEL; None: stayed closed), the step of
    the steepest rise of σ (max Δσ between consecutive steps), and the rotation's final angle size."""
    out = {}
    for name, gate in gates.items():
        sig = np.array([ALPHA_SIGMA] + [h["sigma"][name] for h in history])
        steps = [0] + [h["step"] for h in history]
        opened = next((s for s, v in zip(steps, sig) if v >= OPEN_LEVEL), None)
        steepest = steps[int(np.argmax(np.diff(sig))) + 1] if len(sig) > 1 else None
        with torch.no_grad():
            angle = float(torch.linalg.matrix_norm(gate.sigma() * gate.skew()).max())
        out[name] = {"sigma": float(sig[-1]), "opened_step": opened, "steepest_step": steepest,
                     "max_generator_norm": angle}
    return out


ALPHA_SIGMA = float(1.0 / (1.0 + np.exp(-ALPHA_INIT)))


def _state_fingerprint(opts: TrainOptions) -> str:
    return json.dumps(opts.fingerprint(), sort_keys=True)


def _save_state(path: Path, opts: TrainOptions, objective: Any, optimizer: torch.optim.Optimizer,
                history: list, evals: list, step: int) -> None:
    state = {"step": step, "fingerprint": _state_fingerprint(opts),
             "gates": {name: gate.state_dict() for name, gate in objective.gates.items()},
             "optimizer": optimizer.state_dict(), "history": json.dumps(history), "evals": json.dumps(evals)}
    with atomic_output(path) as tmp:
        torch.save(state, tmp)


def _resume(path: Path, opts: TrainOptions, objective: Any, optimizer: torch.optim.Optimizer) -> tuple[
        list, list, int]:
    """(history, evals, step) from a saved state, or empty and 0 when there is none."""
    if not path.is_file():
        return [], [], 0
    try:
        state = torch.load(path, weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as exc:  # truncated or foreign
        raise InputError(f"cannot read the training state {path} ({exc}); delete it to start afresh") from None
    if state.get("fingerprint") != _state_fingerprint(opts):
        raise InputError(f"{path} was saved by a run with other options; rerun with those, or delete it to "
                         "start afresh")
    for name, gate in objective.gates.items():
        gate.load_state_dict(state["gates"][name])
    optimizer.load_state_dict(state["optimizer"])
    return json.loads(state["history"]), json.loads(state["evals"]), int(state["step"])


def _write_checkpoint(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    with atomic_output(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "nkat-so8t-gates"})

