"""Inference: sampling and autoregressive generation with a KV cache."""
