"""θ's adapter tensors in F32 or F16: speed (interleaved, one process) and output difference, as JSON.

Both adapters of the same θ are loaded on one llama.cpp context over the model; θ off, F32 and F16 are
timed in alternation (nkat_gguf.engine.measure.speed.interleaved_rates), so the F16/F32 ratio is what to trust on a
shared machine. Quality: max |Δlogit| between F16 and F32 on the evaluation text with an F32 KV cache,
against θ's own effect, and perplexity with each.

    .venv/bin/python benchmarks/adapter_type.py --model model.nkat.gguf --threads 2
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import sys
import tempfile
from pathlib import Path

import llama_cpp
import numpy as np

from nkat_gguf.engine.llama.adapter import write_lora_adapter
from nkat_gguf.engine.measure.bench import device_name
from nkat_gguf.engine.measure.speed import Configuration, SpeedSettings, interleaved_rates
from nkat_gguf.engine.llama.native_log import captured_llama_log
from nkat_gguf.engine.measure.perplexity import perplexity, tokenize_text
from nkat_gguf.engine.llama.runtime import NkatRuntime, RuntimeOptions
from nkat_gguf.format.gguf_file import read_layout
from nkat_gguf.texts import load_text

TYPES = ("F32", "F16")


def apply(llm: llama_cpp.Llama, adapter: object | None, scale: float) -> None:
    """One adapter at `scale` (None: θ off), KV cache cleared: states from another adapter are stale."""
    if adapter is None:
        llama_cpp.llama_set_adapters_lora(llm.ctx, None, 0, None)
    else:
        llama_cpp.llama_set_adapters_lora(llm.ctx, (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter), 1,
                                          (ctypes.c_float * 1)(scale))
    llm.reset()
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="an NKAT GGUF with theta")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--chunks", type=int, default=4, help="perplexity chunks of 512 per adapter type")
    args = parser.parse_args()

    architecture = read_layout(args.model).architecture
    options = RuntimeOptions(n_ctx=512, n_batch=512, n_threads=args.threads, f32_kv_cache=True, logits_all=False)
    with NkatRuntime(args.model, options) as runtime, tempfile.TemporaryDirectory() as tmp:
        theta, llm = runtime.theta, runtime.llm
        runtime.set_gamma(None)
        adapters = {}
        for kind in TYPES:
            path = write_lora_adapter(Path(tmp) / f"{kind}.gguf", theta, architecture,
                                      tensor_type=kind)
            with captured_llama_log():
                adapters[kind] = llama_cpp.llama_adapter_lora_init(llm.model, str(path).encode())
        tokens = tokenize_text(llm, load_text(None, "evaluation").content)
        ppl, nll_tokens = {}, tokens[: 512 * args.chunks]
        for kind in (None, *TYPES):
            apply(llm, adapters.get(kind), theta.gamma)
            ppl[kind or "off"] = perplexity(llm, nll_tokens, 512, args.chunks, progress=False).ppl
        configs = {name: Configuration(llm, functools.partial(apply, llm, adapters.get(name), theta.gamma))
                   for name in ("off", *TYPES)}
        speed = interleaved_rates(configs, SpeedSettings(repetitions=args.repetitions, progress=sys.stderr.isatty()))
        logits = {}
        for kind in (None, *TYPES):
            apply(llm, adapters.get(kind), theta.gamma)
            llm.eval(tokens[:64])
            logits[kind or "off"] = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1),
                                                          shape=(llm.n_vocab(),)).copy()
        for adapter in adapters.values():
            llama_cpp.llama_adapter_lora_free(adapter)

    ratio = {f"{kind}_over_off": {m: speed[kind][f"{m}_tokens_per_second"] / speed["off"][f"{m}_tokens_per_second"]
                                  for m in ("pp", "tg")} for kind in TYPES}
    ratio["F16_over_F32"] = {m: speed["F16"][f"{m}_tokens_per_second"] / speed["F32"][f"{m}_tokens_per_second"]
                             for m in ("pp", "tg")}
    print(json.dumps({
        "model": str(args.model), "theta_weights": len(theta.tensors), "theta_max_rank": theta.rank,
        "gamma": theta.gamma, "threads": args.threads, "device": device_name(), "speed": speed, "ratio": ratio,
        "perplexity_evaluation": ppl, "chunks": args.chunks,
        "max_abs_dlogit_F16_vs_F32_last_token": float(np.abs(logits["F16"] - logits["F32"]).max()),
        "max_abs_dlogit_theta_effect_last_token": float(np.abs(logits["F32"] - logits["off"]).max()),
        "command": "python benchmarks/adapter_type.py " + " ".join(sys.argv[1:]),
    }, indent=1))


if __name__ == "__main__":
    main()
