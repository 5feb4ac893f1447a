"""Print the Markdown table of a `nkat-gguf frontier --json` result (README's and BENCHMARKS.md's table).

    .venv/bin/nkat-gguf frontier --json > frontier.json
    .venv/bin/python tools/frontier_table.py frontier.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from nkat_gguf.evaluate.frontier import format_markdown

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tools/frontier_table.py FRONTIER.json")
    print(format_markdown(json.loads(Path(sys.argv[1]).read_text())))
