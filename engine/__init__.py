"""The engine, one room per job: llama/ (the llama.cpp runtime), measure/ (speed, perplexity, KLD), calibrate/,
serve/ (the HTTP server) and forward/ (the PyTorch forward)."""
