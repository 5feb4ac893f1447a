"""The PyTorch forward of a GGUF's architecture, computed from its weights: what gradients and exact references need."""
