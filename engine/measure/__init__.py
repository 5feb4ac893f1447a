"""Measurement on a loaded model, as llama.cpp's own tools measure: speed (llama-bench), perplexity and KL divergence
(llama-perplexity), the fitted temperature."""
