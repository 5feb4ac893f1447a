"""Fixtures shared by the test modules: an isolated adapter cache and models built once per session."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from gguf.constants import GGMLQuantizationType

from nkat_gguf.convert import ConvertOptions, convert
from nkat_gguf.default_model import default_model_path
from nkat_gguf.engine.measure.type_speed import cache_path
from tools.synthetic_model import build_llama_gguf

# Fixtures that load the embedded default model: every test using one is `slow`, so `pytest -m "not slow"`
# runs without it (tests that load it directly carry the marker themselves).
DEFAULT_MODEL_FIXTURES = {"default_q4_0_rank8", "default_f32_path"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if DEFAULT_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Adapters written by tests go to a temporary cache, never the user's ~/.cache."""
    os.environ["NKAT_CACHE_DIR"] = str(tmp_path_factory.mktemp("nkat-cache"))


@pytest.fixture
def type_prices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Sets this machine's cached type speeds in the test's own cache: every type alike except `slower` (a factor
    each). Alike, speed prices nothing, so the types a convert chooses do not depend on how fast this CPU measured."""
    monkeypatch.setenv("NKAT_CACHE_DIR", str(tmp_path / "cache"))

    def set_prices(threads: int = 0, slower: dict[str, float] | None = None) -> None:
        path = cache_path(threads)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({t.name: 1e-9 * (slower or {}).get(t.name, 1.0) for t in GGMLQuantizationType}))

    return set_prices


@pytest.fixture(scope="session")
def tiny_f32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random llama (d=64, GQA 4/2, tied head) with the default model's tokenizer."""
    return build_llama_gguf(tmp_path_factory.mktemp("tiny") / "tiny-f32.gguf")


@pytest.fixture(scope="session")
def default_q4_0_rank8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded model converted as in the README: Q4_1 -> Q4_0, theta rank 8, activation calibration."""
    out = tmp_path_factory.mktemp("default-nkat") / "smollm2-q4_0-r8.nkat.gguf"
    convert(ConvertOptions(input=default_model_path(), output=out, outtype="Q4_0", theta_rank=8, progress=False))
    return out


@pytest.fixture(scope="session")
def tiny_nkat(tiny_f32: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_f32 converted to Q4_0 with theta rank 4 (gamma 0.97): a complete NKAT file in seconds."""
    out = tmp_path_factory.mktemp("tiny-nkat") / "tiny.nkat.gguf"
    convert(ConvertOptions(input=tiny_f32, output=out, outtype="Q4_0", theta_rank=4, progress=False))
    return out
