"""Exports for the runtimes users already have: llama.cpp --lora, Ollama, KoboldCpp, and merged files."""
