"""Latency and throughput of the OpenAI-compatible server (`nkat-gguf serve`) under concurrent loopback
clients, printed as JSON.

    .venv/bin/python benchmarks/server_load.py --model default --clients 1,8,32 --requests 64 \
        --max-tokens 32 > server_load.json

For each client count: `--requests` identical non-streaming chat completions (greedy, `--max-tokens`
each) sent from that many concurrent connections to a server on 127.0.0.1, after one warm-up request.
Reported per count: latency p50/p90/p99 of the completed requests (seconds from connect to the last
byte of the answer; numpy's linear-interpolation percentiles), requests/s and completion tokens/s over
the wall time of the whole batch, and how many requests were not completed (by status). The server's
queue holds `--max-queue` waiting requests (default: the largest client count, so none is refused); one
generation runs at a time, so latency is expected to grow with the clients and throughput to stay that
of one stream: the figures say whether it does.
Run it on a quiet machine: `load_average_1min` is in the report.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nkat_gguf.default_model import resolve_model  # noqa: E402
from nkat_gguf.engine.llama.runtime import NkatRuntime, RuntimeOptions  # noqa: E402
from nkat_gguf.engine.serve.server import ChatServer  # noqa: E402
from tools.http_load import Outcome, Request, chat_body, send, send_all  # noqa: E402

PROMPT = "Write one sentence about the sea."
SOCKET_TIMEOUT_S = 600.0


def code_version() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        return subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def summary(clients: int, outcomes: list[Outcome], wall_s: float) -> dict:
    done = [o for o in outcomes if o.status == 200]
    latency = np.array([o.seconds for o in done])
    tokens = sum(o.json()["usage"]["completion_tokens"] for o in done)
    p50, p90, p99 = (np.percentile(latency, [50, 90, 99]).tolist() if done else [None] * 3)
    return {"clients": clients, "requests": len(outcomes), "completed": len(done),
            "not_completed": dict(Counter(str(o.status or o.error) for o in outcomes if o.status != 200)),
            "latency_s": {"p50": p50, "p90": p90, "p99": p99}, "wall_s": wall_s,
            "requests_per_s": len(done) / wall_s, "completion_tokens": tokens, "tokens_per_s": tokens / wall_s,
            "load_average_1min": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="a GGUF path, or 'default' for the embedded model")
    parser.add_argument("--clients", default="1,8,32", help="comma-separated concurrent client counts")
    parser.add_argument("--requests", type=int, default=64, help="requests per client count")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--ctx", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: physical cores)")
    parser.add_argument("--max-queue", type=int, default=None, help="server queue (default: largest --clients)")
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    path = resolve_model(args.model)
    body = chat_body(args.max_tokens, content=PROMPT)
    with NkatRuntime(path, RuntimeOptions(n_ctx=args.ctx, n_threads=args.threads)) as runtime, \
            ChatServer(runtime, port=0, quiet=True, max_queue=args.max_queue or max(counts),
                       queue_timeout_s=SOCKET_TIMEOUT_S) as server:
        server.start()
        port = server.address[1]
        warm = send(port, Request("chat", body), SOCKET_TIMEOUT_S)
        if warm.status != 200:
            sys.exit(f"warm-up request failed: {warm.status or warm.error}")
        rows = []
        for clients in counts:
            started = time.monotonic()
            outcomes = send_all(port, [Request("chat", body)] * args.requests, clients, SOCKET_TIMEOUT_S)
            rows.append(summary(clients, outcomes, time.monotonic() - started))
    print(json.dumps({"model": str(path), "code_version": code_version(), "max_tokens": args.max_tokens,
                      "n_ctx": args.ctx, "threads": args.threads, "max_queue": args.max_queue or max(counts),
                      "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
