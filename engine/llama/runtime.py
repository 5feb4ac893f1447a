"""Load an (NKAT) GGUF into llama.cpp and switch theta on, off, or to another γ without reloading."""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

import llama_cpp

from nkat_gguf.engine.llama.adapter import cached_adapter
from nkat_gguf.engine.llama.native_log import captured_llama_log
from nkat_gguf.engine.llama.probe import check_loadable  # noqa: F401  (callers import it from here)
from nkat_gguf.errors import InputError
from nkat_gguf.format.gguf_file import read_layout
from nkat_gguf.format.hparams import check_context
from nkat_gguf.format.nkat import CalibratedTemperature, NkatTheta, check_gamma, read_temperature, read_theta

N_UBATCH = 512  # llama.cpp's default physical batch (llama-bench, llama-perplexity)


def physical_cores() -> int:
    """llama.cpp's default thread count: one per physical core this process may run on.

    SMT siblings share a core's vector units, and ggml's threads meet at a barrier after every
    operation, so a second thread per core mostly waits (llama.cpp's `common_cpu_get_num_math`).
    """
    cpus = os.sched_getaffinity(0)
    cores = set()
    for cpu in cpus:
        try:
            cores.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip())
        except OSError:
            return len(cpus)  # no topology (not Linux, or a container hiding it): every CPU counts
    return max(1, len(cores))


@dataclass(frozen=True)
class RuntimeOptions:
    """The llama.cpp context. Defaults are llama-bench's / llama-perplexity's, so speeds compare with theirs."""

    n_ctx: int = 512
    n_batch: int = 512  # logical batch; llama.cpp splits it into physical batches of N_UBATCH
    n_threads: int | None = None  # None: one per physical core, as llama.cpp; prompt and generation alike
    n_gpu_layers: int = -1  # all layers on a GPU build; a CPU build ignores it
    # compare logits across models exactly (an F16 cache adds ~2e-2): an F32 cache and flash attention off,
    # the same attention a plain llama_cpp.Llama or the PyTorch forward computes (flash attention moves
    # logits by ~2e-3)
    f32_kv_cache: bool = False
    logits_all: bool = False
    # llama.cpp's tools default to flash attention "auto", which is on for CPU (and CUDA) builds;
    # llama-cpp-python's Llama defaults to off, which cost ~20 % of pp and tg on the default model.
    flash_attn: bool = True

    def llama_kwargs(self) -> dict:
        """Keyword arguments for llama_cpp.Llama: the same context llama-bench would create."""
        threads = self.n_threads or physical_cores()
        return {"n_ctx": self.n_ctx, "n_batch": self.n_batch, "n_ubatch": min(self.n_batch, N_UBATCH),
                "n_threads": threads, "n_threads_batch": threads, "n_gpu_layers": self.n_gpu_layers,
                "flash_attn": self.flash_attn and not self.f32_kv_cache, "logits_all": self.logits_all,
                "type_k": 0 if self.f32_kv_cache else None, "type_v": 0 if self.f32_kv_cache else None}


class NkatRuntime:
    """A llama.cpp context over a GGUF; theta (if the file has it) is a LoRA adapter whose scale is γ."""

    def __init__(self, model_path: str | Path, options: RuntimeOptions = RuntimeOptions(),
                 gamma: float | None = None, cache_dir: Path | None = None):
        self.path = Path(model_path)
        layout = read_layout(self.path)
        self.theta: NkatTheta | None = read_theta(layout)
        # the file's fitted sampling temperature (nkat.confidence.temperature), the engine's default
        self.temperature: CalibratedTemperature | None = read_temperature(layout)
        self.options = options
        check_context(layout, options.n_ctx, "n_ctx")  # the KV cache grows with it; past training is untrained
        check_loadable(self.path)  # an abort inside llama.cpp must not take this process down
        with captured_llama_log() as log:
            try:
                self.llm = llama_cpp.Llama(model_path=str(self.path), verbose=False, **options.llama_kwargs())
            except ValueError:
                self.llm = None
        if self.llm is None:
            raise InputError(f"llama.cpp cannot set up {self.path.name} with a context of {options.n_ctx} tokens: "
                             f"{log.reason('no reason given (out of memory?)')}")
        self._architecture, self._cache_dir = layout.architecture, cache_dir
        self._adapters: dict[str, object] = {}  # theta digest -> llama.cpp adapter, each loaded once
        self._adapter = None
        if self.theta is not None and self.theta.tensors:
            self._adapter = self._load_adapter(self.theta)
        self.gamma: float | None = None
        self.set_gamma(self.resolve_gamma(gamma))

    def _load_adapter(self, theta: NkatTheta) -> object:
        key = theta.digest()
        if key not in self._adapters:
            adapter_path = cached_adapter(theta, self._architecture, self._cache_dir)
            with captured_llama_log() as log:
                adapter = llama_cpp.llama_adapter_lora_init(self.llm.model, str(adapter_path).encode())
            if not adapter:
                raise InputError(f"llama.cpp rejected the theta adapter of {self.path.name}: {log.reason('')}")
            self._adapters[key] = adapter
        return self._adapters[key]

    def use_theta(self, theta: NkatTheta, gamma: float | None) -> None:
        """Apply another theta for the same model (another rank, say) at γ, without reloading the model.

        Each adapter is loaded once and kept, so a search over ranks switches adapters instead of models.
        """
        self._adapter = self._load_adapter(theta) if theta.tensors else None
        self.theta = theta
        self.set_gamma(gamma)

    @property
    def has_theta(self) -> bool:
        return self._adapter is not None

    def resolve_gamma(self, gamma: float | None = None) -> float | None:
        """`gamma` when one is asked for, else the γ stored with θ (NkatTheta.gamma); None: no θ to apply."""
        if gamma is not None:
            return gamma
        return self.theta.gamma if self.has_theta else None

    def set_gamma(self, gamma: float | None) -> None:
        """None removes the adapter (the plain quantized model); a number applies W x + γ·B·A·x.

        The KV cache is reset: states computed under the old γ would otherwise be reused.
        """
        if gamma is not None:
            gamma = check_gamma(gamma)
            if not self.has_theta:
                raise InputError(f"{self.path.name} carries no theta; gamma has nothing to scale")
        if gamma is None:
            status = llama_cpp.llama_set_adapters_lora(self.llm.ctx, None, 0, None)
        else:
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self._adapter)
            scales = (ctypes.c_float * 1)(gamma)
            status = llama_cpp.llama_set_adapters_lora(self.llm.ctx, adapters, 1, scales)
        if status != 0:
            raise RuntimeError(f"llama_set_adapters_lora failed with status {status}")
        self.llm.reset()
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.llm.ctx), True)
        self.gamma = gamma

    def close(self) -> None:
        if self.llm is not None:
            llama_cpp.llama_set_adapters_lora(self.llm.ctx, None, 0, None)
            for adapter in self._adapters.values():
                llama_cpp.llama_adapter_lora_free(adapter)
            self._adapters.clear()
            self._adapter = None
            self.llm.close()
            self.llm = None

    def __enter__(self) -> "NkatRuntime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
