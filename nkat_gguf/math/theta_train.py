"""θ trained in the form it is stored and run: INT8 factors, one scale per rank component, γ as applied.

The forward rounds the factors exactly as `theta.quantize_int8` does (straight-through: the gradient passes
the rounding as the identity), so the loss a training step sees is the loss of the factors the file will
hold, and `TrainableTheta.stored()` returns them. Torch, like lowrank.py: only the convert step that trains
θ loads it. Shapes are numpy order: A (r, in), B (out, r), y = W x + γ·B·A·x.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from nkat_gguf.math.theta import LowRank, ThetaInt8, quantize_int8

INT8_PEAK = 127.0  # quantize_int8's symmetric range


def fake_int8(m: torch.Tensor, dim: int) -> torch.Tensor:
    """`quantize_int8(...).dequantize()` of m per component (the max over `dim`), value for value in float32,
    with the identity as the gradient of the rounding (the scale is held constant in the gradient)."""
    peak = m.detach().abs().amax(dim=dim, keepdim=True)
    scale = torch.where(peak > 0, peak / INT8_PEAK, torch.ones_like(peak))
    steps = m / scale
    rounded = torch.clamp(torch.round(steps.detach()), -INT8_PEAK, INT8_PEAK)  # round half to even, as np.rint
    return (rounded + (steps - steps.detach())) * scale  # the added term is 0 in value, the identity in gradient


class TrainableTheta:
    """One weight's θ as trainable float factors, started from stored INT8 factors.

    The parameters are the factors divided by each component's starting peak (entries in [-1, 1]), so one
    learning rate fits every component whatever its magnitude: an Adam step moves an entry by about `lr`
    of its component's largest starting entry (1/127 of it is one INT8 step).
    """

    def __init__(self, theta: ThetaInt8, gamma: float, device: torch.device):
        start = theta.dequantize()
        self.gamma = gamma
        self._a_peak = _peaks(torch.from_numpy(start.a).to(device), dim=1)  # (r, 1)
        self._b_peak = _peaks(torch.from_numpy(start.b).to(device), dim=0)  # (1, r)
        self.a = (torch.from_numpy(start.a).to(device) / self._a_peak).requires_grad_()
        self.b = (torch.from_numpy(start.b).to(device) / self._b_peak).requires_grad_()

    @property
    def parameters(self) -> list[torch.Tensor]:
        return [self.a, self.b]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) as stored: fake-quantized INT8 with per-component scales."""
        return fake_int8(self.a * self._a_peak, dim=1), fake_int8(self.b * self._b_peak, dim=0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """γ·B·(A·x) for x (N, in): the correction llama.cpp adds to W·x (an adapter with alpha 0, scale γ)."""
        a, b = self.factors()
        return self.gamma * ((x @ a.T) @ b.T)

    def stored(self) -> ThetaInt8:
        """The INT8 factors the forward computes with (quantize_int8 rounds the same floats the same way)."""
        with torch.no_grad():
            a = (self.a * self._a_peak).cpu().numpy()
            b = (self.b * self._b_peak).cpu().numpy()
        return quantize_int8(LowRank(b.astype(np.float32), a.astype(np.float32)))

    def snapshot(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a.detach().clone(), self.b.detach().clone()

    def restore(self, saved: tuple[torch.Tensor, torch.Tensor]) -> None:
        with torch.no_grad():
            self.a.copy_(saved[0])
            self.b.copy_(saved[1])


def _peaks(m: torch.Tensor, dim: int) -> torch.Tensor:
    peak = m.abs().amax(dim=dim, keepdim=True)
    return torch.where(peak > 0, peak, torch.ones_like(peak))


Evaluate = Callable[[bool], float]  # (with gradients) -> the loss; with True it also accumulates the θs' gradients


def minimize(evaluate: Evaluate, thetas: Sequence[TrainableTheta], steps: int, lr: float, desc: str,
             progress: bool = True) -> tuple[float, float]:
    """Adam on the θs for `steps` steps, the loss evaluated before each step and after the last; the θs are
    left at the lowest loss seen, so training never ends above its start. Returns (initial, best) loss."""
    optimizer = torch.optim.Adam([p for t in thetas for p in t.parameters], lr=lr)
    best, best_state, initial = float("inf"), None, None
    bar = tqdm(range(steps + 1), desc=desc, unit="step", disable=not progress, leave=False)
    for step in bar:
        optimizer.zero_grad(set_to_none=True)
        current = evaluate(step < steps)
        initial = current if initial is None else initial
        if current < best:
            best, best_state = current, [t.snapshot() for t in thetas]
        bar.set_postfix(loss=f"{current:.4g}", best=f"{best:.4g}")
        if step < steps:
            optimizer.step()
    if best_state is None:
        raise ValueError(f"{desc}: the training loss is not finite ({initial})")
    for t, saved in zip(thetas, best_state):
        t.restore(saved)
    return initial, best


def with_backward(loss: Callable[[], torch.Tensor]) -> Evaluate:
    """An `Evaluate` of a loss computed in one graph."""
    def evaluate(gradients: bool) -> float:
        if not gradients:
            with torch.no_grad():
                return float(loss())
        value = loss()
        value.backward()
        return float(value.detach())
    return evaluate
