"""Quantized models, applied from outside the model: its modules replaced by ones whose weights are stored in fewer
bits (int8 for decoding, MXFP4 as gpt-oss is published), computing the same function up to their rounding.
"""
