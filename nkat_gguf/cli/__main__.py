"""`python -m nkat_gguf.cli`: the same command line as `nkat-gguf` (backends prints it where PATH has none)."""

from nkat_gguf.cli import main

main()
