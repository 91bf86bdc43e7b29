"""Checkpoint interop: ossgpt's own format and Hugging Face's gpt-oss format."""

from ossgpt.checkpoint.pretrained import from_pretrained, load_config, save_pretrained

__all__ = ["from_pretrained", "load_config", "save_pretrained"]
