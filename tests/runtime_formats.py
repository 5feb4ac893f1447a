"""The file formats Ollama and KoboldCpp read, as their own source defines them, to check what the exports write.

Written from the readers' source (versions and how they were read: docs/INTEGRATIONS.md, "What the
export tests check"), not from the exporter: a Modelfile or .kcpps that these rules refuse would be
refused, or misread, by the real program.

- Ollama `parser/parser.go` (`ParseFile`, `parseRuneForState`, `unquote`, `isValidCommand`) and
  `Modelfile.CreateRequest`, with `api.FormatParams` typing each PARAMETER by the `api.Options` field of
  that JSON name; `fs/gguf/gguf.go` and `fs/ggml/gguf.go` for the GGUF limits.
- KoboldCpp `koboldcpp.py`: `load_config_cli` sets every key of the JSON onto argparse's namespace as it
  is (no argparse conversion), so each value must already have the type argparse would give it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from gguf.constants import GGUFValueType

from nkat_gguf.format.gguf_file import GGUFLayout

# ---- Ollama Modelfile (parser/parser.go) -----------------------------------------------------------

OLLAMA_COMMANDS = {"from", "license", "template", "system", "adapter", "draft", "renderer", "parser", "parameter",
                   "message", "requires"}
MESSAGE_ROLES = {"system", "user", "assistant"}
# api.Options and api.Runner: JSON name -> the Go kind FormatParams parses the argument as
OLLAMA_PARAMETERS = {
    "num_keep": "int", "seed": "int", "num_predict": "int", "top_k": "int", "top_p": "float", "min_p": "float",
    "typical_p": "float", "repeat_last_n": "int", "temperature": "float", "repeat_penalty": "float",
    "presence_penalty": "float", "frequency_penalty": "float", "stop": "[]string",
    "num_ctx": "int", "num_batch": "int", "num_gpu": "int", "main_gpu": "*int", "use_mmap": "*bool",
    "num_thread": "int", "draft_num_predict": "int",
}
# CreateRequest only warns about these and drops them
OLLAMA_DEPRECATED = {"penalize_newline", "low_vram", "f16_kv", "logits_all", "vocab_only", "use_mlock", "mirostat",
                     "mirostat_tau", "mirostat_eta"}


class ModelfileError(ValueError):
    """What `ollama create` would answer."""


def _unquote(s: str) -> tuple[str, bool]:
    if s.startswith('"""'):
        return (s[3:-3], True) if len(s) >= 6 and s.endswith('"""') else ("", False)
    if s.startswith('"'):
        return (s[1:-1], True) if len(s) >= 2 and s.endswith('"') else ("", False)
    return s, True


def _is_alpha(r: str) -> bool:
    return "a" <= r <= "z" or "A" <= r <= "Z"


def _is_print(r: str) -> bool:
    """Go's strconv.IsPrint, for the characters a Modelfile can hold: printable, or an ASCII space."""
    return r == " " or r.isprintable()


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(command, argument) pairs exactly as Ollama's ParseFile yields them: FROM becomes "model", a
    PARAMETER its parameter's name, MESSAGE "message" with "role: content". Raises ModelfileError."""
    NIL, NAME, VALUE, PARAMETER, MESSAGE, COMMENT = range(6)
    commands: list[tuple[str, str]] = []
    state, buf, name, role, line = NIL, "", "", "", 1
    for r in text.removeprefix("\ufeff"):
        if r in "\r\n":
            line += 1
        nxt, keep = _next_state(r, state, line)
        if nxt != state:
            if state == NAME:
                if buf.lower() not in OLLAMA_COMMANDS:
                    raise ModelfileError(f"(line {line}): command must be one of {sorted(OLLAMA_COMMANDS)}")
                lowered = buf.lower()
                if lowered == "from":
                    name = "model"
                elif lowered == "parameter":
                    nxt = PARAMETER
                elif lowered == "message":
                    nxt, name = MESSAGE, lowered
                else:
                    name = lowered
            elif state == PARAMETER:
                name = buf
            elif state == MESSAGE:
                if buf not in MESSAGE_ROLES:
                    raise ModelfileError(f"(line {line}): message role must be one of {sorted(MESSAGE_ROLES)}")
                role = buf
            elif state == VALUE:
                value, ok = _unquote(buf.strip())
                if not ok or r in " \t":
                    buf += r  # inside an open quote, or a space: the value goes on
                    continue
                commands.append((name, f"{role}: {value}" if role else value))
                role = ""
            buf, state = "", nxt
        if keep and _is_print(r):
            buf += r
    if state == VALUE:
        value, ok = _unquote(buf.strip())
        if not ok:
            raise ModelfileError("unexpected EOF: an open quote")
        commands.append((name, f"{role}: {value}" if role else value))
    elif state not in (NIL, COMMENT):
        raise ModelfileError("unexpected EOF")
    if not any(c == "model" for c, _ in commands):
        raise ModelfileError("no FROM line")
    return commands


def _next_state(r: str, state: int, line: int) -> tuple[int, bool]:
    """parseRuneForState: the next state, and whether the rune is kept (Go returns 0 to drop it)."""
    NIL, NAME, VALUE, PARAMETER, MESSAGE, COMMENT = range(6)
    space, newline = r in " \t", r in "\r\n"
    if state == NIL:
        return (COMMENT, False) if r == "#" else (NIL, False) if space or newline else (NAME, True)
    if state == NAME:
        if _is_alpha(r):
            return NAME, True
        if space:
            return VALUE, False
        raise ModelfileError(f"(line {line}): invalid command")
    if state == VALUE:
        return (NIL, True) if newline or space else (VALUE, True)
    if state in (PARAMETER, MESSAGE):
        if _is_alpha(r) or (state == PARAMETER and (r.isdigit() and r.isascii() or r == "_")):
            return state, True
        if space:
            return VALUE, False
        raise ModelfileError(f"(line {line}): unexpected EOF")
    return (NIL, False) if newline else (COMMENT, False)


def modelfile_request(commands: list[tuple[str, str]]) -> dict:
    """What Modelfile.CreateRequest builds from the commands: the files, and each PARAMETER typed as
    FormatParams types it (an unknown name or an unparsable value is an error there)."""
    request: dict = {"from": [], "adapters": [], "parameters": {}}
    for name, args in commands:
        if name == "model":
            request["from"].append(args)
        elif name == "adapter":
            request["adapters"].append(args)  # Ollama keeps only the last one (req.Adapters = digestMap)
        elif name in OLLAMA_COMMANDS - {"parameter"}:
            request[name] = args
        elif name in OLLAMA_DEPRECATED:
            continue
        elif name not in OLLAMA_PARAMETERS:
            raise ModelfileError(f"unknown parameter '{name}'")
        else:
            kind = OLLAMA_PARAMETERS[name]
            if kind == "[]string":
                request["parameters"].setdefault(name, []).append(args)
            else:
                request["parameters"][name] = _go_parse(kind.lstrip("*"), args)
    return request


def _go_parse(kind: str, text: str) -> object:
    """strconv.ParseInt(text, 10, 64) / ParseFloat(text, 32) / ParseBool(text), as FormatParams calls them."""
    parsers: dict[str, Callable[[str], object]] = {"int": _go_int, "float": _go_float, "bool": _go_bool}
    try:
        return parsers[kind](text)
    except ValueError:
        raise ModelfileError(f"invalid {kind} value [{text}]") from None


def _go_int(text: str) -> int:
    if not re.fullmatch(r"[+-]?[0-9]+", text):
        raise ValueError(text)
    return int(text, 10)


def _go_float(text: str) -> float:
    if text != text.strip() or "_" in text:
        raise ValueError(text)
    return float(text)


def _go_bool(text: str) -> bool:
    if text in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if text in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise ValueError(text)


# ---- Ollama's GGUF reader (fs/gguf/gguf.go, fs/ggml/gguf.go) ---------------------------------------

OLLAMA_MAX_STRING = 16 << 20  # MaxStringLength: keys, string values and tensor names
OLLAMA_MAX_ARRAY = 64 << 20  # MaxArraySize: elements of one metadata array
OLLAMA_MAX_TENSOR_DIMS = 4  # MaxTensorDims
OLLAMA_MIN_GGUF_VERSION = 2  # fs/gguf refuses version < 2


def ollama_gguf_problems(layout: GGUFLayout) -> list[str]:
    """Every limit of Ollama's GGUF readers that the file breaks (empty: Ollama reads it)."""
    problems = []
    if layout.version < OLLAMA_MIN_GGUF_VERSION:
        problems.append(f"GGUF version {layout.version}")
    for key, value in layout.metadata.items():
        strings = [key] + ([value.data] if value.type == GGUFValueType.STRING else [])
        if value.type == GGUFValueType.ARRAY:
            if len(value.data) > OLLAMA_MAX_ARRAY:
                problems.append(f"{key}: array of {len(value.data)} elements")
            if value.sub_type == GGUFValueType.STRING:
                strings += value.data
        problems += [f"{key}: string of {len(s.encode())} bytes" for s in strings if len(s.encode()) > OLLAMA_MAX_STRING]
    for t in layout.tensors:
        if len(t.shape) > OLLAMA_MAX_TENSOR_DIMS or len(t.name.encode()) > OLLAMA_MAX_STRING:
            problems.append(f"tensor {t.name}: {len(t.shape)} dimensions")
    return problems


# ---- KoboldCpp .kcpps (koboldcpp.py) ---------------------------------------------------------------


@dataclass(frozen=True)
class KcppsKey:
    """One argparse destination: the JSON type its value must have, the range argparse would check, and the
    KoboldCpp releases (of those read) that define it."""

    types: tuple[type, ...]
    versions: frozenset[str]
    check: Callable[[object], bool] = lambda value: True


BOTH = frozenset({"1.76", "1.102"})
KCPPS_KEYS = {
    "model_param": KcppsKey((str,), BOTH),  # positional, nargs="?"
    "lora": KcppsKey((list,), BOTH, lambda v: len(v) >= 1 and all(isinstance(p, str) for p in v)),  # nargs='+'
    "loramult": KcppsKey((float, int), frozenset({"1.102"})),  # type=float, default 1.0
    "contextsize": KcppsKey((int,), BOTH, lambda v: 256 <= v <= 262144),  # type=check_range(int, 256, 262144)
    "threads": KcppsKey((int,), BOTH, lambda v: v >= 1),  # type=int
    "host": KcppsKey((str,), BOTH),
    "port": KcppsKey((int,), BOTH, lambda v: 1 <= v <= 65535),  # type=int
    "launch": KcppsKey((bool,), BOTH),  # store_true
    "gendefaults": KcppsKey((str,), frozenset()),  # in neither release read (docs/INTEGRATIONS.md)
}
# Keys a release does not define, which load_config_cli still sets on the namespace where nothing reads them,
# and why ignoring them is harmless for an export: 1.76 applies the adapter at scale 1, which is what
# loramult 1.0 says (γ is folded into B); without gendefaults only the default temperature is lost.
HARMLESS_WHEN_IGNORED = {"loramult", "gendefaults"}


def kcpps_problems(config: dict, version: str) -> list[str]:
    """What the .kcpps gets wrong for KoboldCpp `version` (1.76 or 1.102)."""
    problems = []
    for key, value in config.items():
        spec = KCPPS_KEYS.get(key)
        if spec is None or (version not in spec.versions and key not in HARMLESS_WHEN_IGNORED):
            problems.append(f"{key}: not an argument of KoboldCpp {version}")
        elif value is None:  # argparse's own default for an absent optional argument
            continue
        elif isinstance(value, bool) and bool not in spec.types or not isinstance(value, spec.types):
            problems.append(f"{key}: {type(value).__name__} where KoboldCpp's argparse gives {spec.types[0].__name__}")
        elif not spec.check(value):
            problems.append(f"{key}: {value!r} outside what KoboldCpp's argparse accepts")
    return problems
