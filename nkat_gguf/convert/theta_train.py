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

`block` is resumable: each finished block's θ goes to a checkpoint in the cache (`Checkpoint`), keyed by
everything the training depends on, so a rerun after an interrupt trains only the blocks not yet finished
and ends exactly where an uninterrupted run ends. The checkpoint is removed when the training finishes.
"""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from gguf.constants import Keys

from nkat_gguf.convert.calibrate import calibration_windows
from nkat_gguf.convert.options import ConvertOptions
from nkat_gguf.convert.theta_fit import WeightFit
from nkat_gguf.engine.calibrate.calibration import WINDOW
from nkat_gguf.engine.forward.llama import LlamaForward, supports_forward
from nkat_gguf.engine.llama.adapter import cache_root
from nkat_gguf.errors import InputError
from nkat_gguf.format.atomic import atomic_output
from nkat_gguf.format.gguf_file import GGUFLayout
from nkat_gguf.format.hashing import sha256_file
from nkat_gguf.format.nkat import NkatTheta
from nkat_gguf.format.tensors import TensorSource
from nkat_gguf.math.limits import THETA_TRAINS, TRAIN_LR_RANGE, TRAIN_STEPS_RANGE, TRAIN_TOKENS_RANGE, ThetaTrain
from nkat_gguf.math.theta_train import TrainableTheta, minimize, with_backward
from nkat_gguf.texts import Text

LOGIT_CHUNK = 512  # tokens whose (chunk, V) logits the model loss holds at once
CHECKPOINT_VERSION = 1  # part of the checkpoint key: a change of what a checkpoint holds starts afresh


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
    if not supports_forward(layout):
        raise InputError(f"--theta-train needs the PyTorch forward, which does not cover this "
                         f"{layout.get(Keys.General.ARCHITECTURE)!r} model; use --theta-train none")


def train_theta(train: TrainSettings, reference: TensorSource, quantized: Path, fits: dict[str, WeightFit],
                gamma: float, text: Text, progress: bool = True, block_limit: int | None = None) -> Trained:
    """`fits` trained with `train.mode` on the first `train.tokens` calibration tokens of `text`.

    With `block`, finished blocks are checkpointed and a checkpoint a previous run left is resumed.
    `block_limit`: stop after that many blocks with θ, as an interrupt would, leaving the checkpoint for the
    next run; the θs of the blocks not reached come back untrained (None: train them all)."""
    windows = calibration_windows(reference.path, text)[:train.tokens // WINDOW]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    resumed = 0
    with _deterministic(train.seed, device):
        ref = LlamaForward(reference, device=device)
        model = LlamaForward(TensorSource(quantized), device=device)
        thetas = {name: TrainableTheta(fit.theta, gamma, device) for name, fit in fits.items()}
        if train.mode == "block":
            checkpoint = Checkpoint.of(train, reference.path, quantized, text, len(windows), fits, gamma, device)
            losses, resumed = _train_blocks(ref, model, windows, thetas, train, progress, checkpoint, block_limit)
        else:
            losses = _train_model(ref, model, windows, thetas, train, progress)
    summary = {"mode": train.mode, "device": device.type, "steps": train.steps, "lr": train.lr,
               "tokens": len(windows) * WINDOW, "seed": train.seed, "seconds": round(time.perf_counter() - start, 3),
               "initial_loss": sum(i for i, _ in losses.values()), "final_loss": sum(f for _, f in losses.values()),
               "losses": {k: {"initial": i, "final": f} for k, (i, f) in losses.items()},
               "resumed_blocks": resumed,  # blocks whose θ came from an interrupted run's checkpoint
               # the process's peak resident memory after training, and whether training raised it
               "peak_resident_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    summary["raised_peak"] = summary["peak_resident_bytes"] > before
    if device.type == "cuda":
        summary["peak_device_bytes"] = torch.cuda.max_memory_allocated(device)
    trained = {name: replace(fits[name], theta=t.stored(), error=None) for name, t in thetas.items()}
    return Trained(trained, summary)


def loss_scope(name: str, mode: ThetaTrain) -> str:
    """The key of the loss weight `name`'s θ was trained on in `Trained.summary["losses"]`."""
    return "model" if mode == "model" else f"blk.{_block_of(name)}"


def trained_figures(name: str, summary: dict) -> dict:
    """What a report can state of a trained weight: the loss its θ was trained on, before and after. The
    closed form's captured energy and expected output error describe the factors training started from."""
    scope = loss_scope(name, summary["mode"])
    return {"captured_energy": None, "expected_output_error": None,
            "training_loss": {"scope": scope, **summary["losses"][scope]}}


class Checkpoint:
    """The trained θ of each finished block, on disk until the training finishes (`block` mode).

    One directory per training, named by a digest of all it depends on: the quantized and reference files'
    contents, the text, the training options and seed, γ, the device kind, and the starting θ (weights,
    ranks, factors). Each block is one .npz, written atomically, holding its θs' parameters exactly (float32)
    and the block's losses, so a resumed run computes what an uninterrupted one computes.
    """

    def __init__(self, directory: Path):
        self.directory = directory

    @classmethod
    def of(cls, train: TrainSettings, reference: Path, quantized: Path, text: Text, n_windows: int,
           fits: dict[str, WeightFit], gamma: float, device: torch.device) -> Checkpoint:
        start = NkatTheta(gamma, {n: f.theta for n, f in fits.items()}).digest()
        raw = (f"v{CHECKPOINT_VERSION}|{sha256_file(quantized)}|{sha256_file(reference)}|{text.sha256}|"
               f"{train.mode}|{train.steps}|{train.lr!r}|{n_windows}x{WINDOW}|{train.seed}|{gamma!r}|"
               f"{device.type}|{start}")
        return cls(cache_root() / "theta-train" / hashlib.sha256(raw.encode()).hexdigest()[:32])

    def _path(self, block: int) -> Path:
        return self.directory / f"blk.{block}.npz"

    def load(self, block: int, thetas: dict[str, TrainableTheta]) -> tuple[float, float] | None:
        """Block `block`'s losses with its θs restored, or None (not finished, or unreadable)."""
        try:
            with np.load(self._path(block), allow_pickle=False) as data:
                saved = {n: (data[f"{n}/a"], data[f"{n}/b"]) for n in thetas}
                losses = float(data["initial"]), float(data["final"])
        except (OSError, KeyError, ValueError, zipfile.BadZipFile):
            return None
        for name, (a, b) in saved.items():
            thetas[name].restore((torch.from_numpy(a), torch.from_numpy(b)))
        return losses

    def save(self, block: int, thetas: dict[str, TrainableTheta], losses: tuple[float, float]) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"cannot create the training checkpoint {self.directory}: {exc.strerror} "
                             "(set NKAT_CACHE_DIR)") from None
        arrays = {"initial": np.array(losses[0]), "final": np.array(losses[1])}
        for name, t in thetas.items():
            a, b = t.snapshot()
            arrays |= {f"{name}/a": a.cpu().numpy(), f"{name}/b": b.cpu().numpy()}
        with atomic_output(self._path(block), suffix=".npz") as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


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


def _train_blocks(ref: LlamaForward, model: LlamaForward, windows: list[list[int]],
                  thetas: dict[str, TrainableTheta], train: TrainSettings, progress: bool, checkpoint: Checkpoint,
                  block_limit: int | None) -> tuple[dict[str, tuple[float, float]], int]:
    """Each block with θ trained on ‖y − y_ref‖² / ‖y_ref‖² of its output, the finished blocks of an earlier
    run taken from `checkpoint`; ((initial, final) per block, blocks resumed)."""
    ref_batch, batch = ref.batch(windows), model.batch(windows)
    with torch.no_grad():
        h_ref, h = ref.embed(ref_batch), model.embed(batch)
    losses: dict[str, tuple[float, float]] = {}
    resuming, resumed = True, 0
    blocks = sorted({_block_of(n) for n in thetas})
    last = blocks[-1] if block_limit is None else blocks[min(block_limit, len(blocks)) - 1]
    for i in range(last + 1):
        with torch.no_grad():
            target = ref.block(i, ref.layer(i), h_ref, ref_batch)  # (N, d)
        w = model.layer(i)
        mine = {n: t for n, t in thetas.items() if _block_of(n) == i}
        if mine:
            found = checkpoint.load(i, mine) if resuming else None
            resuming = found is not None  # a missing block ends the resume: later ones start from its result
            if found is None:
                energy = float(target.square().sum())

                def loss() -> torch.Tensor:
                    return (model.block(i, w, h, batch, mine) - target).square().sum() / energy

                found = minimize(with_backward(loss), list(mine.values()), train.steps, train.lr,
                                 f"theta training blk.{i}", progress)
                checkpoint.save(i, mine, found)
            else:
                resumed += 1
            losses[f"blk.{i}"] = found
        with torch.no_grad():
            h, h_ref = model.block(i, w, h, batch, mine), target
        del w
    if last == blocks[-1]:
        checkpoint.remove()
    return losses, resumed


def _train_model(ref: LlamaForward, model: LlamaForward, windows: list[list[int]],
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
