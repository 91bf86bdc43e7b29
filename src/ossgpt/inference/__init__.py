"""Inference: sampling (sampling.py), autoregressive generation with a KV cache (generate.py), and loading a
checkpoint with its tokenizer, optionally quantized, for eval, generate and chat (loading.py)."""
