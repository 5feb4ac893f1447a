"""`nkat-gguf convert` as a sequence of steps: check, read, (bake), calibrate, quantize, theta, write (pipeline.py)."""

from nkat_gguf.convert.options import ConvertOptions, ConvertReport
from nkat_gguf.convert.pipeline import convert

__all__ = ["ConvertOptions", "ConvertReport", "convert"]
