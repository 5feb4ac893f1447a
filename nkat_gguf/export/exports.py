"""Exports for the runtimes users already have: a LoRA adapter, an Ollama directory, a KoboldCpp config.

Ollama always applies an adapter at scale 1 and KoboldCpp releases before mid-2025 do too, so every
exported adapter has γ folded into B (alpha = 0, so scale 1 gives W x + γ·B·A·x on every weight,
whatever its rank). Every file written is
loaded back through llama.cpp before the export reports success. A model without theta still
exports (the plain model), with a note that there is no correction to carry. A calibrated temperature
in the file (`nkat.confidence.temperature`) becomes the default sampling temperature of the Modelfile
(`PARAMETER temperature`) and of the .kcpps (`gendefaults`), and the report says so.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from gguf.constants import GGUFValueType, Keys

from nkat_gguf.engine.llama.adapter import write_lora_adapter
from nkat_gguf.engine.measure.perplexity import perplexity, tokenize_text
from nkat_gguf.engine.llama.runtime import NkatRuntime, RuntimeOptions, check_loadable
from nkat_gguf.errors import InputError
from nkat_gguf.export.merge import write_merged
from nkat_gguf.export.targets import ADAPTER, KOBOLD, MODELFILE, OLLAMA, export_stem, kcpps_name, ollama_name
from nkat_gguf.format import nkat
from nkat_gguf.format.atomic import atomic_output, output_directory
from nkat_gguf.format.gguf_file import GGUFLayout, read_layout, typed_int, typed_value, write_with_metadata
from nkat_gguf.format.nkat import CalibratedTemperature, NkatTheta, check_gamma, read_temperature, read_theta
from nkat_gguf.texts import load_text

MAX_EXPORT_CTX = 8192  # num_ctx / contextsize: the model's training context, capped to what a laptop can hold
NO_THETA_NOTE = "{name} carries no theta: there is no correction to carry, so the export is the plain model"
_OLLAMA_NAME = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*/)?[A-Za-z0-9][A-Za-z0-9._-]*(:[A-Za-z0-9._-]+)?$")
_STOP_NAME = re.compile(r"end|eot|eos", re.IGNORECASE)
_CONTROL_TOKEN = 3  # tokenizer.ggml.token_type of control tokens (<|im_end|>, <|eot_id|>, ...)


@dataclass
class ExportReport:
    kind: str  # ADAPTER, OLLAMA or KOBOLD
    model: str
    gamma: float | None  # None: the model has no theta
    files: dict[str, str] = field(default_factory=dict)  # role -> path
    commands: list[str] = field(default_factory=list)  # what to run next, exactly
    notes: list[str] = field(default_factory=list)
    perplexity: dict | None = None  # --merged only: theta off / adapter / merged, measured

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class _Model:
    """The NKAT model an export reads: its layout, theta (None if it has none) and the γ to fold."""

    path: Path
    layout: GGUFLayout
    theta: NkatTheta | None
    gamma: float | None
    temperature: CalibratedTemperature | None  # the file's calibrated default sampling temperature

    @property
    def stem(self) -> str:
        return export_stem(self.path)


def _open(model: Path, gamma: float | None, report_notes: list[str]) -> _Model:
    layout = read_layout(model)
    theta = read_theta(layout)
    temperature = read_temperature(layout)
    if theta is None or not theta.tensors:
        report_notes.append(NO_THETA_NOTE.format(name=model.name))
        if gamma is not None:
            check_gamma(gamma)
            report_notes.append(f"--gamma {gamma:g} ignored: nothing to scale")
        return _Model(model, layout, None, None, temperature)
    gamma = check_gamma(theta.gamma if gamma is None else gamma)
    if temperature is not None and temperature.gamma is not None and abs(temperature.gamma - gamma) > 1e-6:
        report_notes.append(f"the calibrated temperature {temperature.temperature:.4g} was fitted at gamma "
                            f"{temperature.gamma:g}, the export folds gamma {gamma:g}")
    return _Model(model, layout, theta, gamma, temperature)


def _temperature_note(source: _Model, where: str) -> list[str]:
    if source.temperature is None:
        return []
    return [f"default sampling temperature {source.temperature.temperature:.4g} from {nkat.TEMPERATURE}, "
            f"written as {where}"]


def _target(model: _Model, path: Path) -> Path:
    if path.exists() and path.resolve() == model.path.resolve():
        raise InputError(f"{path} is the input model; choose another output")
    return path


# ---- loading back through llama.cpp -------------------------------------------------------------


def _write_adapter(model: _Model, staged: Path, base: Path, tensor_type: str = "F16") -> None:
    """theta with γ folded into B, written to `staged` (a temporary name), then loaded back on `base`,
    the model file the runtime will use; the caller renames it only after that check."""
    theta = model.theta or NkatTheta(gamma=0.0, tensors={})
    write_lora_adapter(staged, theta, model.layout.architecture,
                       scale_folded_into_b=model.gamma or 0.0, tensor_type=tensor_type,
                       name=f"{model.stem}-theta-gamma-{model.gamma or 0:g}")
    check_loadable(base, adapter=staged)


def _stage(outputs: contextlib.ExitStack, model: _Model, path: Path) -> Path:
    """A temporary name for `path`, renamed to it when `outputs` closes without an error (after every check)."""
    return outputs.enter_context(atomic_output(_target(model, path)))


def export_adapter(model: Path, output: Path, gamma: float | None = None, tensor_type: str = "F16") -> ExportReport:
    """theta as a standard llama.cpp LoRA GGUF that gives the engine's logits at γ when applied at scale 1.

    The output's directory is created if missing, as the other exports create theirs.
    """
    report = ExportReport(ADAPTER, str(model), None)
    source = _open(model, gamma, report.notes)
    report.gamma = source.gamma
    if output.is_dir():
        raise InputError(f"-o {output} is a directory; give a file name")
    with output_directory(output.parent), contextlib.ExitStack() as outputs:
        _write_adapter(source, _stage(outputs, source, output), source.path, tensor_type)
    report.files["adapter"] = str(output)
    if source.theta is None:
        report.notes.append("the adapter has no tensors: applying it changes nothing")
    else:
        report.notes.append(f"gamma {source.gamma:g} is folded into B: apply the adapter at scale 1 "
                            "(--lora, or --lora-scaled with scale 1)")
    report.commands.append(f"llama-cli -m {shlex.quote(str(model))} --lora {shlex.quote(str(output))}")
    return report


# ---- Ollama ---------------------------------------------------------------------------------------


def context_length(layout: GGUFLayout) -> int:
    """The model's training context, capped at MAX_EXPORT_CTX (a bigger KV cache rarely fits on a laptop)."""
    trained = typed_int(layout, Keys.LLM.CONTEXT_LENGTH.format(arch=layout.architecture), 1, 1 << 31)
    return min(trained, MAX_EXPORT_CTX) if trained else MAX_EXPORT_CTX


def stop_tokens(layout: GGUFLayout) -> list[str]:
    """End-of-turn strings: the EOS/EOT tokens, and control tokens in the chat template named end/eot/eos."""
    tokens = typed_value(layout, Keys.Tokenizer.LIST, (GGUFValueType.ARRAY,)) or []
    if not isinstance(tokens, list):
        raise InputError(f"{layout.path}: {Keys.Tokenizer.LIST} must be an array of strings")
    found: list[str] = []
    for key in (Keys.Tokenizer.EOT_ID, Keys.Tokenizer.EOS_ID):
        token_id = typed_int(layout, key, 0, 1 << 31)
        if token_id is not None and token_id < len(tokens):
            found.append(tokens[token_id])
    template = typed_value(layout, Keys.Tokenizer.CHAT_TEMPLATE, (GGUFValueType.STRING,))
    types = typed_value(layout, Keys.Tokenizer.TOKEN_TYPE, (GGUFValueType.ARRAY,))
    if isinstance(template, str) and isinstance(types, np.ndarray):
        found += [t for t, kind in zip(tokens, types) if kind == _CONTROL_TOKEN and t in template and _STOP_NAME.search(t)]
    return list(dict.fromkeys(t for t in found if t))


def modelfile_quote(value: str) -> str | None:
    """`value` as an argument Ollama's Modelfile parser (parser/parser.go) reads back unchanged, or None.

    The parser strips one pair of double quotes (or of triple double quotes) and does no escape processing (a JSON-escaped `\\u00e9` would
    reach Ollama as six characters); it drops every non-printable character except space, tab and newline,
    and trims surrounding whitespace outside quotes.
    """
    if not value or any(not (c.isprintable() or c in " \t\n\r") for c in value):
        return None
    return f'"{value}"' if '"' not in value else f'"""{value}"""'


def modelfile_text(model_file: str, adapter_file: str | None, num_ctx: int, stops: list[str],
                   temperature: float | None = None) -> str:
    """Ollama's Modelfile syntax: one instruction per line, FROM first, paths relative to the Modelfile.

    A stop string the Modelfile cannot carry unchanged (see modelfile_quote) is left out.
    """
    lines = [f"FROM ./{model_file}"]
    if adapter_file:
        lines.append(f"ADAPTER ./{adapter_file}")
    lines.append(f"PARAMETER num_ctx {num_ctx}")
    if temperature is not None:
        lines.append(f"PARAMETER temperature {temperature:.4f}")
    quoted = (modelfile_quote(s) for s in stops)
    lines += [f"PARAMETER stop {q}" for q in quoted if q is not None]
    return "\n".join(lines) + "\n"


def _ollama_name(name: str | None, source: _Model) -> str:
    if name is None:
        return ollama_name(source.path)
    if not _OLLAMA_NAME.match(name):
        raise InputError(f"--name {name!r} is not an Ollama model name (letters, digits, '.', '_', '-', "
                         "optionally 'namespace/' and ':tag')")
    return name


def export_ollama(model: Path, output_dir: Path, gamma: float | None = None, name: str | None = None,
                  merged: bool = False, outtype: str | None = None, ppl_chunks: int = 4, ppl_ctx: int = 512,
                  threads: int | None = None) -> ExportReport:
    """DIR with the model, the γ-folded adapter and a Modelfile; `merged` puts theta into one GGUF instead."""
    if outtype is not None and not merged:
        raise InputError("--outtype applies to --merged only (the adapter form keeps the model as it is)")
    report = ExportReport(OLLAMA, str(model), None)
    source = _open(model, gamma, report.notes)
    report.gamma = source.gamma
    name = _ollama_name(name, source)
    modelfile_lines = (context_length(source.layout), stop_tokens(source.layout))
    adapter_file = None
    # every file is written under a temporary name and renamed only once all of them passed their checks
    with output_directory(output_dir) as directory, contextlib.ExitStack() as outputs:
        if merged:
            model_file = f"{source.stem}.merged.gguf"
            staged = _stage(outputs, source, directory / model_file)
            if source.theta is None:
                write_with_metadata(source.path, staged, {}, drop_prefixes=(nkat.PREFIX,))
            else:
                write_merged(source.path, staged, source.theta, source.gamma, outtype, threads or 0)
            report.perplexity = _measure_merged(source, staged, ppl_chunks, ppl_ctx, threads)
            report.notes.append(_merged_summary(report.perplexity))
            report.notes += _merged_caveats(source, outtype)
        else:
            model_file = f"{source.stem}.gguf"
            staged = _stage(outputs, source, directory / model_file)
            # theta lives in the adapter now; the model file is the plain quantized model, tensors byte for byte
            write_with_metadata(source.path, staged, {}, drop_prefixes=(nkat.PREFIX,))
            if source.theta is not None:
                adapter_file = f"{source.stem}.theta.gguf"
                _write_adapter(source, _stage(outputs, source, directory / adapter_file), staged)
                report.files["adapter"] = str(directory / adapter_file)
            else:
                check_loadable(staged)
        report.files["model"] = str(directory / model_file)
        modelfile = directory / MODELFILE
        temperature = source.temperature.temperature if source.temperature else None
        _stage(outputs, source, modelfile).write_text(
            modelfile_text(model_file, adapter_file, *modelfile_lines, temperature), encoding="utf-8")
    report.files["modelfile"] = str(modelfile)
    report.notes += _temperature_note(source, "PARAMETER temperature in the Modelfile")
    report.commands += [f"ollama create {name} -f {shlex.quote(str(modelfile))}", f"ollama run {name}"]
    return report


def _measure_merged(source: _Model, merged_path: Path, chunks: int, ctx: int, threads: int | None) -> dict:
    """Perplexity (evaluation split) of theta off, the adapter form at γ, and the merged file; loads each."""
    text = load_text(None, "evaluation")
    options = RuntimeOptions(n_ctx=ctx, n_batch=ctx, n_threads=threads)
    results = {}
    with NkatRuntime(source.path, options) as runtime:
        tokens = tokenize_text(runtime.llm, text.content)
        configs = {"theta_off": None} if source.theta is None else {"theta_off": None, "adapter": source.gamma}
        for label, gamma in configs.items():
            runtime.set_gamma(gamma)
            results[label] = perplexity(runtime.llm, tokens, ctx, chunks, progress=False).as_dict()
    with NkatRuntime(merged_path, options) as runtime:
        results["merged"] = perplexity(runtime.llm, tokens, ctx, chunks, progress=False).as_dict()
    results["text"] = text.source
    return results


def _merged_summary(ppl: dict) -> str:
    """One line users must read: how much of the adapter's improvement survived requantization."""
    parts = [f"{label} {ppl[label]['ppl']:.4f}" for label in ("theta_off", "adapter", "merged") if label in ppl]
    line = f"perplexity ({ppl['merged']['n_chunks']} chunks of {ppl['merged']['n_ctx']}): " + ", ".join(parts)
    if "adapter" in ppl:
        gain = ppl["theta_off"]["ppl"] - ppl["adapter"]["ppl"]
        if gain > 0:
            kept = (ppl["theta_off"]["ppl"] - ppl["merged"]["ppl"]) / gain
            line += f"; the merged file keeps {100 * kept:.0f} % of the adapter's improvement"
        else:
            line += "; the adapter does not improve perplexity on this text"
    return line


def _merged_caveats(source: _Model, outtype: str | None) -> list[str]:
    if source.theta is None:
        return []
    notes = []
    imatrix = str(source.theta.provenance.get(nkat.IMATRIX, "none"))
    if not imatrix.startswith("none"):
        notes.append(f"the merged weights are requantized without an importance matrix (the file was quantized "
                     f"with one: {imatrix}), which at 2-5 bits alone can cost more than theta gains")
    if outtype is None:
        notes.append("a finer --outtype (e.g. Q8_0) keeps more of the correction, at a larger file")
    return notes


# ---- KoboldCpp ------------------------------------------------------------------------------------


def kcpps_config(model_path: Path, adapter_path: Path | None, contextsize: int, threads: int,
                 temperature: float | None = None) -> dict:
    """KoboldCpp's `.kcpps`: the JSON of its command-line arguments, bound to loopback.

    A temperature goes into `gendefaults` as a JSON string: a key of KoboldCpp releases newer than 1.102
    (1.76 and 1.102, whose argparse was read, do not define it and set it aside unused; docs/INTEGRATIONS.md).
    """
    config = {
        "model_param": str(model_path),
        "lora": [str(adapter_path)] if adapter_path else None,  # KoboldCpp uses only the first file
        "loramult": 1.0,  # γ is folded into the adapter; releases before mid-2025 ignore this key
        "contextsize": contextsize,
        "threads": threads,
        "host": "127.0.0.1",
        "port": 5001,
        "launch": False,
    }
    if temperature is not None:
        config["gendefaults"] = json.dumps({"temperature": round(temperature, 4)})
    return config


def export_kobold(model: Path, output_dir: Path, gamma: float | None = None, threads: int | None = None) -> ExportReport:
    """DIR with the γ-folded adapter and a `.kcpps` that runs the NKAT model with it."""
    report = ExportReport(KOBOLD, str(model), None)
    source = _open(model, gamma, report.notes)
    report.gamma = source.gamma
    model_path = source.path.resolve()
    contextsize = context_length(source.layout)
    with output_directory(output_dir) as directory, contextlib.ExitStack() as outputs:
        adapter = None
        if source.theta is not None:
            adapter = directory / f"{source.stem}.theta.gguf"
            _write_adapter(source, _stage(outputs, source, adapter), model_path)
            report.files["adapter"] = str(adapter)
        else:
            check_loadable(model_path)
        config = kcpps_config(model_path, adapter, contextsize, threads or os.cpu_count() or 1,
                              source.temperature.temperature if source.temperature else None)
        report.notes += _temperature_note(source, "gendefaults in the .kcpps (KoboldCpp newer than 1.102; older releases ignore it)")
        kcpps = directory / kcpps_name(source.path)
        _stage(outputs, source, kcpps).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    report.files["kcpps"] = str(kcpps)
    report.commands.append(f"koboldcpp --config {shlex.quote(str(kcpps))}")
    return report
