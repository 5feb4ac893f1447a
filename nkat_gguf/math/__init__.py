"""The math of nkat-gguf as pure functions: theta (low-rank residual corrections) and SO(8) rotations."""
