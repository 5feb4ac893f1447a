"""`python tools/backend_selector.py [MODEL] [--gamma G] [--launch NAME]`: the seed's name for `nkat-gguf backends`.

The detection lives in nkat_gguf/backends.py; this entry point only forwards its arguments.
"""

import sys

from nkat_gguf.cli import main

if __name__ == "__main__":
    main(["backends", *sys.argv[1:]])
