"""`nkat-gguf qc longtext`: entropy and max logit over a long teacher-forced window and greedy generations.

Teacher forcing: the first `tokens` tokens of the text in one sequence (decoded n_batch at a time, the
KV cache kept), logits at every position. Generation: each built-in prompt (nkat_gguf.texts.LONG_PROMPTS),
then up to `gen_tokens` greedy tokens, stopped early by an end-of-generation token. Indices are those
of nkat_gguf.math.confidence; their definitions are in docs/QC.md.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path

import llama_cpp
import numpy as np
from gguf.constants import Keys
from tqdm import tqdm

from nkat_gguf.engine.measure.perplexity import tokenize_text
from nkat_gguf.engine.llama.runtime import RuntimeOptions
from nkat_gguf.errors import InputError
from nkat_gguf.evaluate.configurations import measure_rows, report_head
from nkat_gguf.format.gguf_file import read_layout
from nkat_gguf.math.confidence import entropy_and_max_logit, repetition_share, series_indices
from nkat_gguf.math.limits import MIN_LONGTEXT_TOKENS
from nkat_gguf.texts import LONG_PROMPTS, Text


@dataclass(frozen=True)
class LongtextSettings:
    tokens: int = 2048  # teacher-forced window (capped at the model's training context, with a note)
    gen_tokens: int = 256  # greedy new tokens per prompt at most
    n_batch: int = 512
    progress: bool = True


def trained_context(model: Path) -> int | None:
    """The model's training context from its metadata, or None when the file does not say."""
    layout = read_layout(model)
    value = layout.get(Keys.LLM.CONTEXT_LENGTH.format(arch=layout.architecture))
    return int(value) if value else None


def plan_context(model: Path, settings: LongtextSettings) -> tuple[int, list[str]]:
    """The window actually used and the notes saying why it differs from --tokens."""
    if settings.tokens < MIN_LONGTEXT_TOKENS:
        raise InputError(f"--tokens must be at least {MIN_LONGTEXT_TOKENS}, got {settings.tokens}")
    trained = trained_context(model)
    if trained is not None and trained < settings.tokens:
        return trained, [f"{model.name} was trained on a context of {trained} tokens, shorter than --tokens "
                         f"{settings.tokens}: the window is capped at {trained}"]
    return settings.tokens, []


class _Decoder:
    """One llama_batch reused for every decode of one sequence (sequence id 0)."""

    def __init__(self, llm: llama_cpp.Llama, n_batch: int):
        self.llm, self.n_batch = llm, n_batch
        self.vocab = llama_cpp.llama_model_get_vocab(llm.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        for i in range(n_batch):
            self.batch.n_seq_id[i] = 1
            self.batch.seq_id[i][0] = 0

    def clear(self) -> None:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.llm.ctx), True)
        self.llm.reset()

    def decode(self, tokens: np.ndarray, start: int, all_logits: bool) -> np.ndarray:
        """Decode `tokens` at positions start…; the logits (all rows, or the last only) as a buffer view."""
        n = len(tokens)
        self.batch.n_tokens = n
        np.ctypeslib.as_array(self.batch.token, shape=(n,))[:] = tokens
        np.ctypeslib.as_array(self.batch.pos, shape=(n,))[:] = np.arange(start, start + n)
        wants = np.ctypeslib.as_array(self.batch.logits, shape=(n,))
        wants[:] = 1 if all_logits else 0
        wants[-1] = 1
        if (ret := llama_cpp.llama_decode(self.llm.ctx, self.batch)) != 0:
            raise RuntimeError(f"llama_decode failed with code {ret}")
        rows = n if all_logits else 1
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits(self.llm.ctx), shape=(rows, self.n_vocab))

    def close(self) -> None:
        llama_cpp.llama_batch_free(self.batch)
        self.clear()


def teacher_forced(decoder: _Decoder, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Entropy and max logit at every position of one sequence (the distribution of the next token)."""
    decoder.clear()
    entropy, top = [], []
    for start in range(0, len(tokens), decoder.n_batch):
        h, m = entropy_and_max_logit(decoder.decode(tokens[start:start + decoder.n_batch], start, True))
        entropy.append(h)
        top.append(m)
    return np.concatenate(entropy), np.concatenate(top)


def greedy(decoder: _Decoder, prompt: np.ndarray, n_new: int) -> dict:
    """Up to n_new argmax tokens after `prompt`, stopping at an end-of-generation token."""
    decoder.clear()
    for start in range(0, len(prompt), decoder.n_batch):
        logits = decoder.decode(prompt[start:start + decoder.n_batch], start, False)
    generated: list[int] = []
    entropy, top = [], []
    stop = "max_tokens"
    while True:
        h, m = entropy_and_max_logit(logits)
        entropy.append(float(h[0]))
        top.append(float(m[0]))
        token = int(logits[0].argmax())
        if llama_cpp.llama_vocab_is_eog(decoder.vocab, token):
            stop = "end_of_generation"
            break
        generated.append(token)
        if len(generated) == n_new:
            break
        logits = decoder.decode(np.array([token], dtype=np.int32), len(prompt) + len(generated) - 1, False)
    text = decoder.llm.detokenize(generated).decode("utf-8", errors="replace")
    return {"tokens": len(generated), "stop": stop, "repetition_share": repetition_share(generated),
            "entropy": np.array(entropy), "max_logit": np.array(top), "text": text}


def measure_llm(llm: llama_cpp.Llama, window: np.ndarray, settings: LongtextSettings) -> dict:
    """Indices of the teacher-forced window and of each prompt's generation, with the series for plots."""
    decoder = _Decoder(llm, settings.n_batch)
    bar = tqdm(total=1 + len(LONG_PROMPTS), desc="longtext", unit="series", file=sys.stderr,
               disable=not settings.progress)
    try:
        entropy, top = teacher_forced(decoder, window)
        bar.update()
        result = {"teacher_forced": {**series_indices(entropy, top).as_dict(),
                                     "series": _series(entropy, top)}, "generation": {}}
        for name, prompt in LONG_PROMPTS.items():
            out = greedy(decoder, np.asarray(tokenize_text(llm, prompt), dtype=np.int32), settings.gen_tokens)
            entropy, top = out.pop("entropy"), out.pop("max_logit")
            indices = series_indices(entropy, top).as_dict() if len(entropy) >= 3 else None
            result["generation"][name] = {**out, "indices": indices, "series": _series(entropy, top)}
            bar.update()
    finally:
        bar.close()
        decoder.close()
    return result


def _series(entropy: np.ndarray, top: np.ndarray) -> dict[str, list[float]]:
    return {"entropy": entropy.round(5).tolist(), "max_logit": top.round(5).tolist(),
            "max_logit_d1": np.diff(top).round(5).tolist(), "max_logit_d2": np.diff(top, 2).round(5).tolist()}


def _window(llm: llama_cpp.Llama, text: Text, n: int) -> np.ndarray:
    tokens = tokenize_text(llm, text.content)
    if len(tokens) < n:
        raise InputError(f"text too short: {text.source} has {len(tokens)} tokens, the window needs {n} "
                         "(pass a longer --text or a smaller --tokens)")
    return np.asarray(tokens[:n], dtype=np.int32)


def longtext_report(model: Path, text: Text, runtime_options: RuntimeOptions, settings: LongtextSettings,
                    gamma: float | None = None, reference: Path | None = None,
                    with_reference: bool = True) -> dict:
    """Long-text indices of the model (theta at γ and off, or the plain model) and of its reference."""
    window_size, notes = plan_context(model, settings)
    longest_prompt = max(len(p) for p in LONG_PROMPTS.values())  # characters ≥ tokens
    n_ctx = max(window_size, longest_prompt + settings.gen_tokens)
    options = replace(runtime_options, n_ctx=n_ctx, n_batch=settings.n_batch)
    windows: dict[str, np.ndarray] = {}  # per model file: the model's rows share one window

    def measure(llm: llama_cpp.Llama, gamma: float | None) -> dict:
        if llm.model_path not in windows:
            windows[llm.model_path] = _window(llm, text, window_size)
        return {"gamma": gamma, **measure_llm(llm, windows[llm.model_path], settings)}

    configurations, reference = measure_rows(model, options, measure, gamma, reference, with_reference)
    return {
        **report_head(model, reference, text),
        "tokens_requested": settings.tokens,
        "window_tokens": window_size,
        "n_ctx": n_ctx,
        "gen_tokens": settings.gen_tokens,
        "notes": notes,
        "main": next(iter(configurations)),
        "configurations": configurations,
    }


def without_series(report: dict) -> dict:
    """The report minus the per-position series (for --json on stdout; the report files keep them)."""
    out = {**report, "configurations": {}}
    for name, config in report["configurations"].items():
        tf = {k: v for k, v in config["teacher_forced"].items() if k != "series"}
        gen = {p: {k: v for k, v in g.items() if k != "series"} for p, g in config["generation"].items()}
        out["configurations"][name] = {**config, "teacher_forced": tf, "generation": gen}
    return out
