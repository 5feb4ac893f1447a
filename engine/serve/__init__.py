"""The OpenAI-compatible HTTP server over one loaded model."""
