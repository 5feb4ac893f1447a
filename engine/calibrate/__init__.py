"""Calibration inside llama.cpp's graph: the statistics each weight sees, and text sampled from the model itself."""
