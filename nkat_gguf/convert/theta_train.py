"""Learned θ, the step after the closed-form fit: train the chosen weights' θ against the reference's outputs.

The closed form is the best correction of each layer alone; these losses see what the layer's error does
downstream. The quantized weights stay frozen as llama.cpp dequantizes them (gguf-py's dequantize of the
quantized file), θ is trained as stored (INT8, per-component scales, γ; nkat_gguf/math/theta_train.py),
on the first calibration windows only.

- `block`: block by block, each block's output with θ against the reference block's. The reference block
  reads the reference's own hidden states, the quantized block the quantized model's with the θ trained so
  far, so a block also corrects what earlier blocks left. Memory: one block's weights and the hidden
  states of the training tokens.
- `model`: all θs together on KL(p_ref ‖ p) of the next-token distributions. Memory: the quantized model's
  float32 weights from the first block with θ on, the hidden states entering each of those blocks, and the
  logits of one chunk of tokens; each block's graph is rebuilt in the backward pass (checkpointing).
"""

from __future__ import annotations

import os
import resource
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from gguf.constants import Keys

from nkat_gguf.convert.calibrate import calibration_windows
from nkat_gguf.convert.options import ConvertOptions
from nkat_gguf.convert.theta_fit import WeightFit
from nkat_gguf.engine.calibrate.calibration import WINDOW
from nkat_gguf.engine.forward.llama import Batch, LlamaReference, supports_reference
from nkat_gguf.errors import InputError
from nkat_gguf.format.gguf_file import GGUFLayout
from nkat_gguf.format.tensors import TensorSource
from nkat_gguf.math.limits import THETA_TRAINS, TRAIN_LR_RANGE, TRAIN_STEPS_RANGE, TRAIN_TOKENS_RANGE, ThetaTrain
from nkat_gguf.math.theta_train import TrainableTheta, minimize, with_backward
from nkat_gguf.texts import Text

LOGIT_CHUNK = 512  # tokens whose (chunk, V) logits the model loss holds at once


@dataclass(frozen=True)
class TrainSettings:
    """convert's --theta-train options (ConvertOptions.theta_train*), as the training reads them."""

    mode: ThetaTrain
    steps: int
    lr: float
    tokens: int
    seed: int = 0

    @classmethod
    def of(cls, opts: ConvertOptions) -> TrainSettings:
        return cls(opts.theta_train, opts.theta_train_steps, opts.theta_train_lr, opts.theta_train_tokens,
                   opts.theta_train_seed)


@dataclass(frozen=True)
class Trained:
    fits: dict[str, WeightFit]  # the trained θ as stored (error None: the closed form's figure no longer applies)
    summary: dict  # for ConvertReport.theta_train


def check_train_options(train: TrainSettings, layout: GGUFLayout, wants_theta: bool) -> None:
    """Each bad training option refused in one line, before any work."""
    if train.mode not in THETA_TRAINS:
        raise InputError(f"--theta-train must be one of {', '.join(THETA_TRAINS)}, got {train.mode!r}")
    for option, value, (low, high), kind in (("--theta-train-steps", train.steps, TRAIN_STEPS_RANGE, int),
                                              ("--theta-train-lr", train.lr, TRAIN_LR_RANGE, float),
                                              ("--theta-train-tokens", train.tokens, TRAIN_TOKENS_RANGE, int)):
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
            raise InputError(f"{option} must be {'a number' if kind is float else 'a whole number'}, got {value!r}")
        if not low <= value <= high:
            raise InputError(f"{option} must lie in [{low:g}, {high:g}], got {value:g}")
    if train.mode == "none":
        return
    if not wants_theta:
        raise InputError(f"--theta-train {train.mode} trains theta, but the options ask for none (--theta-rank 0 "
                         "or --op-budget 0)")
    if not supports_reference(layout):
        raise InputError(f"--theta-train needs the PyTorch forward, which does not cover this "
                         f"{layout.get(Keys.General.ARCHITECTURE)!r} model; use --theta-train none")


def train_theta(train: TrainSettings, reference: TensorSource, quantized: Path, fits: dict[str, WeightFit],
                gamma: float, text: Text, progress: bool = True) -> Trained:
    """`fits` trained with `train.mode` on the first `train.tokens` calibration tokens of `text`."""
    windows = calibration_windows(reference.path, text)[:train.tokens // WINDOW]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    with _deterministic(train.seed, device):
        ref = LlamaReference(reference, device=device)
        model = LlamaReference(TensorSource(quantized), device=device)
        thetas = {name: TrainableTheta(fit.theta, gamma, device) for name, fit in fits.items()}
        run = _train_blocks if train.mode == "block" else _train_model
        losses = run(ref, model, windows, thetas, train, progress)
    summary = {"mode": train.mode, "device": device.type, "steps": train.steps, "lr": train.lr,
               "tokens": len(windows) * WINDOW, "seconds": round(time.perf_counter() - start, 3),
               "initial_loss": sum(i for i, _ in losses.values()), "final_loss": sum(f for _, f in losses.values()),
               "losses": {k: {"initial": i, "final": f} for k, (i, f) in losses.items()},
               # the process's peak resident memory after training, and whether training raised it
               "peak_resident_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    summary["raised_peak"] = summary["peak_resident_bytes"] > before
    if device.type == "cuda":
        summary["peak_device_bytes"] = torch.cuda.max_memory_allocated(device)
    trained = {name: replace(fits[name], theta=t.stored(), error=None) for name, t in thetas.items()}
    return Trained(trained, summary)


@contextmanager
def _deterministic(seed: int, device: torch.device) -> Iterator[None]:
    """Seeded, and on a GPU deterministic kernels, for the training only; the caller's torch settings come back
    after. The CPU kernels the training uses are deterministic already (and switching costs seconds of imports)."""
    was = torch.are_deterministic_algorithms_enabled()
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what deterministic cuBLAS needs
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        if device.type == "cuda":
            torch.use_deterministic_algorithms(was)


def _block_of(name: str) -> int:
    return int(name.split(".")[1])  # blk.<i>.<part>.weight: θ's weights are all inside blocks


def _train_blocks(ref: LlamaReference, model: LlamaReference, windows: list[list[int]],
                  thetas: dict[str, TrainableTheta], train: TrainSettings,
                  progress: bool) -> dict[str, tuple[float, float]]:
    """Each block with θ trained on ‖y − y_ref‖² / ‖y_ref‖² of its output; (initial, final) per block."""
    ref_batch, batch = ref.batch(windows), model.batch(windows)
    with torch.no_grad():
        h_ref, h = ref.embed(ref_batch), model.embed(batch)
    losses: dict[str, tuple[float, float]] = {}
    last = max(_block_of(n) for n in thetas)
    for i in range(last + 1):
        with torch.no_grad():
            target = ref.block(i, ref.layer(i), h_ref, ref_batch)  # (N, d)
        w = model.layer(i)
        mine = {n: t for n, t in thetas.items() if _block_of(n) == i}
        if mine:
            energy = float(target.square().sum())

            def loss() -> torch.Tensor:
                return (model.block(i, w, h, batch, mine) - target).square().sum() / energy

            losses[f"blk.{i}"] = minimize(with_backward(loss), list(mine.values()), train.steps, train.lr,
                                          f"theta training blk.{i}", progress)
        with torch.no_grad():
            h, h_ref = model.block(i, w, h, batch, mine), target
        del w
    return losses


def _train_model(ref: LlamaReference, model: LlamaReference, windows: list[list[int]],
                 thetas: dict[str, TrainableTheta], train: TrainSettings,
                 progress: bool) -> dict[str, tuple[float, float]]:
    """All θs on mean KL(p_ref ‖ p) over the training tokens; {"model": (initial, final)}."""
    ref_batch, batch = ref.batch(windows), model.batch(windows)
    first = min(_block_of(n) for n in thetas)
    with torch.no_grad():
        h_ref, h = ref.embed(ref_batch), model.embed(batch)
        for i in range(ref.config.n_layer):
            h_ref = ref.block(i, ref.layer(i), h_ref, ref_batch)
            if i < first:
                h = model.block(i, model.layer(i), h, batch)  # no θ before `first`: its input is fixed
    layers = {i: model.layer(i) for i in range(first, model.config.n_layer)}
    by_block = {i: {n: t for n, t in thetas.items() if _block_of(n) == i} for i in layers}
    n_tokens, ref_head, head = h.shape[0], ref.head_layer(), model.head_layer()

    def evaluate(gradients: bool) -> float:
        inputs = []
        x = h
        with torch.no_grad():
            for i, w in layers.items():
                inputs.append(x)
                x = model.block(i, w, x, batch, by_block[i])
        out = x.requires_grad_(gradients)
        total = 0.0
        for chunk in range(0, n_tokens, LOGIT_CHUNK):  # (chunk, V) logits at a time
            part = slice(chunk, chunk + LOGIT_CHUNK)
            with torch.no_grad():
                target = F.log_softmax(ref.head(h_ref[part], ref_head), dim=-1)
            with torch.set_grad_enabled(gradients):
                log_p = F.log_softmax(model.head(out[part], head), dim=-1)
                kl = F.kl_div(log_p, target, log_target=True, reduction="sum") / n_tokens
                if gradients:
                    kl.backward()
            total += float(kl.detach())
        if gradients:
            grad = out.grad
            for (i, w), x_in in zip(reversed(layers.items()), reversed(inputs)):  # checkpointed backward
                x_in = x_in.detach().requires_grad_()
                model.block(i, w, x_in, batch, by_block[i]).backward(grad)
                grad = x_in.grad
        return total

    return {"model": minimize(evaluate, list(thetas.values()), train.steps, train.lr, "theta training (model)",
                              progress)}
