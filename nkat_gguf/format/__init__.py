"""GGUF bytes, tensors, the NKAT metadata format and the other file formats nkat-gguf reads and writes."""
