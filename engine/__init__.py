"""llama.cpp runtime for NKAT models: theta as a LoRA adapter, perplexity, benchmarks, and the PyTorch reference forward."""
