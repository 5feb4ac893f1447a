"""Load a GGUF in a child process first, so that whatever llama.cpp does with it becomes one line.

llama.cpp loads models inside the calling process, and some of its checks are `GGML_ASSERT`s that
abort the process (SIGABRT, a gdb backtrace on stderr) instead of raising. The hyperparameters it
asserts on are checked up front (format/hparams.py); for anything else, a forked child loads the file
with the same loader and the parent reads how it ended: loaded, refused (llama.cpp's own log line),
or killed by a signal (the assertion message it printed). A fork shares the already imported
library, so the probe costs one memory-mapped load, not a new interpreter.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import llama_cpp

from nkat_gguf.engine.llama.native_log import captured_llama_log
from nkat_gguf.math.limits import MIN_N_CTX
from nkat_gguf.errors import InputError
from nkat_gguf.format.gguf_file import GGUFLayout, read_layout
from nkat_gguf.format.hparams import check_context, check_hparams

PROBE_SECONDS = 300.0  # a load that takes longer is reported, not waited for
_REFUSED = 3  # child exit code: llama.cpp returned an error (message on the pipe)


def _load(path: Path, adapter: Path | None) -> str:
    """In the child: load the model (and adapter) as the runtime would; '' on success, else the reason."""
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = 0
    params.use_mmap = True
    with captured_llama_log() as log:
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        lora = llama_cpp.llama_adapter_lora_init(model, str(adapter).encode()) if model and adapter else None
    if not model:
        return f"llama.cpp cannot load {path.name}: {log.reason('load failed')}"
    if adapter is not None and not lora:
        return f"llama.cpp rejects the adapter {adapter.name}: {log.reason('no reason given')}"
    return ""


def _assertion(stderr: str) -> str:
    """The line that says why llama.cpp aborted (GGML_ASSERT, an uncaught exception), else the last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in lines:
        if "GGML_ASSERT" in line or "terminate called" in line or "error" in line.lower():
            return line
    return lines[-1] if lines else "no message"


def probe_load(path: Path, adapter: Path | None = None) -> None:
    """Load `path` (and `adapter` on it) in a forked child; raise InputError with llama.cpp's reason if that fails."""
    sys.stdout.flush()
    sys.stderr.flush()
    read_fd, write_fd = os.pipe()
    with tempfile.TemporaryFile() as child_stderr:
        pid = os.fork()
        if pid == 0:  # the child: never returns into the caller's code
            code = 1
            try:
                os.close(read_fd)
                os.dup2(child_stderr.fileno(), 2)
                os.environ["GGML_NO_BACKTRACE"] = "1"  # ggml_abort would otherwise start gdb
                faulthandler.disable()  # an abort here is the expected news, not a Python crash to dump
                message = _load(path, adapter)
                os.write(write_fd, message.encode("utf-8", "replace")[:4096])
                code = _REFUSED if message else 0
            finally:
                os._exit(code)
        os.close(write_fd)
        status = _wait(pid, path)
        with os.fdopen(read_fd, "rb") as pipe:
            message = pipe.read().decode("utf-8", "replace")
        child_stderr.seek(0)
        stderr = child_stderr.read().decode("utf-8", "replace")
    if os.WIFSIGNALED(status):
        name = signal.Signals(os.WTERMSIG(status)).name
        raise InputError(f"llama.cpp aborts ({name}) loading {path.name}: {_assertion(stderr)}")
    code = os.WEXITSTATUS(status)
    if code == _REFUSED:
        raise InputError(message)
    if code != 0:
        raise InputError(f"llama.cpp failed loading {path.name} (exit {code}): {_assertion(stderr)}")


def _wait(pid: int, path: Path) -> int:
    deadline = time.monotonic() + PROBE_SECONDS
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise InputError(f"llama.cpp did not finish loading {path.name} in {PROBE_SECONDS:.0f} s")
        time.sleep(0.005)


def check_loadable(path: Path, adapter: Path | None = None) -> None:
    """Refuse, in one line, a GGUF that llama.cpp cannot load (unknown architecture, missing tensors,
    hyperparameters it asserts on...), or an adapter it rejects on that model (architecture, names, shapes)."""
    check_hparams(read_layout(path))
    probe_load(Path(path), Path(adapter) if adapter is not None else None)


def check_model(path: Path, n_ctx: int | None = None, option: str = "--ctx") -> GGUFLayout:
    """Everything about a model input that can be checked before work starts: it is a GGUF llama.cpp loads,
    and `n_ctx` (when given) is a perplexity chunk it can score, within its trained context."""
    path = Path(path)
    layout = read_layout(path)
    if n_ctx is not None:
        if n_ctx < MIN_N_CTX:
            raise InputError(f"{option} must be at least {MIN_N_CTX}, got {n_ctx}")
        check_context(layout, n_ctx, option)
    check_loadable(path)
    return layout
