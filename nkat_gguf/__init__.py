"""nkat-gguf: GGUF converter that stores a low-rank quantization correction (theta) in GGUF metadata."""

__version__ = "0.1.0"
