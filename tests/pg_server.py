"""A throwaway PostgreSQL server on 127.0.0.1 for the optimizer's multi-worker test.

tools/postgres_for_tests.sh installs Debian's postgresql when it is missing; the fixture here starts a
server in a temporary directory (as the postgres user when run as root: the server refuses root),
yields its URL and stops it. Without a server the test skips, except under CI=true, where it fails.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI") == "true":
        pytest.fail(f"PostgreSQL test server: {reason} (required under CI=true)")
    pytest.skip(f"PostgreSQL test server: {reason}; run tools/postgres_for_tests.sh")


def _server_programs() -> tuple[str, str]:
    """initdb and pg_ctl: Debian keeps them off the PATH, in /usr/lib/postgresql/VERSION/bin."""
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: p.parts[-3].zfill(4))
    if versions:
        return str(versions[-1].with_name("initdb")), str(versions[-1])
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if not (initdb and pg_ctl):
        _unavailable("initdb/pg_ctl not found")
    return initdb, pg_ctl


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """postgresql://postgres@127.0.0.1:PORT/postgres of a fresh server, trust authentication, loopback only."""
    initdb, pg_ctl = _server_programs()
    root = Path(tempfile.mkdtemp(prefix="nkat-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            _unavailable("no 'postgres' user to run the server as")
        os.chown(root, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]

    def run(*cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=120)

    data, port = root / "data", _free_port()
    try:
        for cmd in ([initdb, "-D", str(data), "-A", "trust", "-U", "postgres"],
                    [pg_ctl, "-D", str(data), "-o", f"-p {port} -k {root} -h 127.0.0.1", "-l", str(root / "log"),
                     "-w", "start"]):
            done = run(*cmd)
            if done.returncode != 0:
                _unavailable(f"{Path(cmd[0]).name} failed: {(done.stderr or done.stdout).strip()[-300:]}")
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        if (data / "postmaster.pid").exists():
            run(pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)
