"""The llama.cpp runtime: loading a GGUF, θ as a LoRA adapter, llama.cpp's quantizer, its log and its build."""
