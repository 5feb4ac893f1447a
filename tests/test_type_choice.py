"""Types chosen, not fixed: every weight's candidates include types of the same and fewer bytes than the base,
the bytes a downgrade frees pay for upgrades, the budget holds, and a type priced slower is chosen less."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from nkat_gguf.convert import ConvertOptions, convert
from nkat_gguf.engine.llama.quantize import outtypes, quantize_model
from nkat_gguf.format.gguf_file import read_layout
from nkat_gguf.math.allocation import Choice, TypeStep, WeightSteps, allocate_mix, mix_bytes
from tools.synthetic_model import LlamaShape, build_llama_gguf

NONE = np.zeros(0)


def weight(name: str, *steps: tuple[str, int, float, float]) -> WeightSteps:
    """steps: (type, bytes over the base, error, seconds); the first is the base."""
    return WeightSteps(name, tuple(TypeStep(t, b, e, NONE, s) for t, b, e, s in steps), 90, 150)


ONE = {"ffn_up": 1.0}


def test_a_same_bytes_type_with_lower_error_is_taken_at_no_budget() -> None:
    w = weight("blk.0.ffn_up.weight", ("IQ4_NL", 0, 10.0, 0.0), ("Q4_K", 0, 4.0, 0.0), ("Q4_0", 0, 12.0, 0.0))
    assert allocate_mix([w], ONE, 0, 0) == {w.name: Choice("Q4_K", 0)}


def test_a_downgrade_pays_for_an_upgrade() -> None:
    quiet = weight("blk.0.ffn_up.weight", ("IQ4_NL", 0, 1.0, 0.0), ("Q3_K", -100, 1.2, 0.0))
    loud = weight("blk.1.ffn_up.weight", ("IQ4_NL", 0, 50.0, 0.0), ("Q6_K", 100, 5.0, 0.0), ("Q8_0", 300, 1.0, 0.0))
    choices = allocate_mix([quiet, loud], ONE, 0, 0)
    assert choices == {quiet.name: Choice("Q3_K", 0), loud.name: Choice("Q6_K", 0)}
    assert mix_bytes([quiet, loud], choices) == 0
    # a budget of exactly Q8_0's extra bytes buys it, one byte less does not
    assert allocate_mix([quiet, loud], ONE, 200, 0)[loud.name].type == "Q8_0"
    assert allocate_mix([quiet, loud], ONE, 199, 0)[loud.name].type == "Q6_K"


def test_nothing_to_free_keeps_the_base() -> None:
    w = weight("blk.0.ffn_up.weight", ("IQ4_NL", 0, 10.0, 0.0), ("Q3_K", -100, 30.0, 0.0), ("Q6_K", 100, 2.0, 0.0))
    assert allocate_mix([w], ONE, 0, 0) == {w.name: Choice("IQ4_NL", 0)}


def test_a_kind_whose_theta_measured_nothing_is_not_free_to_downgrade() -> None:
    """θ's sensitivity 0 on a kind (its θ did not lower the NLL) must not price that kind's type error at 0: it was
    sent to its cheapest type and the budget it freed stayed unspent (Qwen2.5-Coder-1.5B, 82 MB)."""
    mute = weight("blk.0.ffn_down.weight", ("IQ4_NL", 0, 10.0, 0.0), ("Q3_K", -100, 30.0, 0.0),
                  ("Q6_K", 100, 2.0, 0.0))
    copy = weight("blk.0.ffn_up.weight", ("IQ4_NL", 0, 10.0, 0.0), ("Q4_K", 0, 0.0, 0.0))
    choices = allocate_mix([mute, copy], {"ffn_down": 0.0, "ffn_up": 1.0}, 100, 0)
    assert choices == {mute.name: Choice("Q6_K", 0), copy.name: Choice("Q4_K", 0)}
    assert mix_bytes([mute, copy], choices) == 100


def test_theta_is_dropped_where_the_type_copies_the_reference() -> None:
    """A copy of the reference leaves no residual: the θ a weight bought at the base (cheaper per benefit than
    the copy's bytes) is dropped when it moves to the copy, and the bytes it frees go to another weight's θ."""
    energy = np.array([4.0, 2.0, 1.0])
    copied = WeightSteps("blk.0.ffn_up.weight", (TypeStep("IQ4_NL", 0, 10.0, energy),
                                                 TypeStep("Q6_K", 1_000, 0.0, np.zeros(3))), 90, 150)
    other = WeightSteps("blk.1.ffn_up.weight", (TypeStep("IQ4_NL", 0, 10.0, energy),), 90, 150)
    theta = 150 + 3 * 90
    choices = allocate_mix([copied, other], ONE, 1_000 + theta, None)
    assert choices == {copied.name: Choice("Q6_K", 0), other.name: Choice("IQ4_NL", 3)}
    assert mix_bytes([copied, other], choices) == 1_000 + theta


@pytest.mark.parametrize("budget", [0, 500, 3_000])
@pytest.mark.parametrize("max_weights", [0, 2, None])
def test_budget_holds_with_cheaper_types_and_theta(budget: int, max_weights: int | None) -> None:
    rng = np.random.default_rng(budget)
    weights = []
    for i in range(10):
        steps = []
        for j, (b, e) in enumerate([(0, 1.0), (-int(rng.integers(50, 400)), rng.uniform(1.0, 3.0)),
                                    (int(rng.integers(0, 50)), rng.uniform(0.5, 1.0)),
                                    (int(rng.integers(200, 900)), rng.uniform(0.1, 0.5))]):
            error = 10 * e
            steps.append(TypeStep(f"T{j}", b, error, np.sort(rng.uniform(0, error / 10, 4))[::-1]))
        weights.append(WeightSteps(f"blk.{i}.ffn_up.weight", tuple(steps), 40, 60))
    choices = allocate_mix(weights, ONE, budget, max_weights)
    assert mix_bytes(weights, choices) <= budget
    assert sum(c.rank > 0 for c in choices.values()) <= (len(weights) if max_weights is None else max_weights)
    left = budget - mix_bytes(weights, choices)
    for w in weights:  # maximal: no type of lower error is affordable with what is left
        at = next(s for s in w.steps if s.type == choices[w.name].type)
        assert all(s.bytes - at.bytes > left for s in w.steps if s.error < at.error), (w.name, choices[w.name])


def test_a_type_priced_slower_must_buy_more_error_reduction() -> None:
    fast = weight("blk.0.ffn_up.weight", ("IQ4_NL", 0, 10.0, 1.0), ("Q4_1", 0, 9.0, 1.0))
    slow = weight("blk.0.ffn_up.weight", ("IQ4_NL", 0, 10.0, 1.0), ("Q4_1", 0, 9.0, 1.5))
    assert allocate_mix([fast], ONE, 0, 0, speed_price=1.0)[fast.name].type == "Q4_1"
    assert allocate_mix([slow], ONE, 0, 0, speed_price=0.0)[slow.name].type == "Q4_1"
    # 50 % slower must buy 50 % less error at κ = 1: 10 % is not enough, 60 % is
    assert allocate_mix([slow], ONE, 0, 0, speed_price=1.0)[slow.name].type == "IQ4_NL"
    better = weight("blk.0.ffn_up.weight", ("IQ4_NL", 0, 10.0, 1.0), ("Q4_1", 0, 4.0, 1.5))
    assert allocate_mix([better], ONE, 0, 0, speed_price=1.0)[better.name].type == "Q4_1"


# ---- on a real model whose rows fit K-quants ----

WIDE = LlamaShape(d_model=256, n_ff=512, n_layers=1, n_head=4, n_head_kv=2)
THREADS = 2


@pytest.fixture(scope="module")
def wide_q4_k(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model whose rows fit K-quants (256 wide), as people download it: quantized by llama.cpp to Q4_K_S."""
    d = tmp_path_factory.mktemp("wide")
    f32 = build_llama_gguf(d / "wide-f32.gguf", WIDE)
    quantize_model(f32, d / "wide-q4_k_s.gguf", outtypes()["Q4_K_S"], None, THREADS)
    return d / "wide-q4_k_s.gguf"


def _types(model: Path, out: Path, speed_price: float = 1.0) -> dict[str, str]:
    convert(ConvertOptions(input=model, output=out, outtype="IQ4_NL", theta_rank=0, byte_budget="0.05%",
                           threads=THREADS, progress=False, speed_price=speed_price))
    return {t.name: t.type.name for t in read_layout(out).tensors if t.name.endswith("weight") and t.type.name != "F32"}


def test_q4_k_is_kept_on_a_q4_k_input_and_less_when_priced_slower(wide_q4_k: Path, tmp_path: Path,
                                                                   type_prices: Callable[..., None]) -> None:
    """On a Q4_K_S input, re-quantizing a Q4_K weight to Q4_K is a copy: at IQ4_NL's bytes and far lower
    error, the allocator keeps it so under a budget that buys no upgrade; marked 20× slower, it must buy far
    more error reduction than that, and no weight takes it."""
    given = {t.name: t.type.name for t in read_layout(wide_q4_k).tensors}
    type_prices(THREADS)
    alike = _types(wide_q4_k, tmp_path / "alike.gguf")
    kept = [n for n, t in alike.items() if n.startswith("blk.") and given[n] == "Q4_K"]
    assert kept and all(alike[n] == "Q4_K" for n in kept), (given, alike)
    type_prices(THREADS, {"Q4_K": 20.0})
    slow = _types(wide_q4_k, tmp_path / "slow.gguf")
    assert not [n for n, t in slow.items() if n.startswith("blk.") and t == "Q4_K"], slow


def test_every_weight_kept_as_the_input_wrote_it_when_affordable_and_no_theta_on_copies(
        wide_q4_k: Path, tmp_path: Path) -> None:
    """On a Q4_K_S input at +3 %, keeping every weight at the input's type is affordable (Q4_K costs IQ4_NL's
    bytes, the one Q5_K less than 3 %) and leaves no error: every weight is kept and no θ is stored on a copy.
    Before, the kinds whose θ lowered no NLL were priced 0, sent to Q3_K and the bytes they freed left unspent,
    and θ went to copies with nothing to correct (both on Qwen2.5-Coder-1.5B, and here)."""
    from nkat_gguf.format.nkat import read_theta

    out = tmp_path / "kept.gguf"
    report = convert(ConvertOptions(input=wide_q4_k, output=out, outtype="IQ4_NL", byte_budget="3%",
                                    threads=THREADS, progress=False))
    given = {t.name: t.type.name for t in read_layout(wide_q4_k).tensors if t.name.startswith("blk.")}
    written = {t.name: t.type.name for t in read_layout(out).tensors if t.name.startswith("blk.")}
    assert written == given
    assert report.allocation["spent_bytes"] >= 0
    assert not read_theta(out).tensors
