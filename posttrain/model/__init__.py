"""Models: loading and saving, the tiny base, GGUF, and what changes a model (heads, adapters, kernels)."""
