"""Quantized weights: the MXFP4 format gpt-oss is published in, and experts that keep it packed in memory."""
