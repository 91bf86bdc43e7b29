"""Checkpoints: reading and writing ossgpt's own format, Hugging Face's and OpenAI's original gpt-oss layouts.

pretrained.py   from_pretrained / save_pretrained, format detection
hf_config.py    Hugging Face's config.json <-> GPTOSSConfig
original.py     OpenAI's original/ layout: its config and tensor names
files.py        safetensors files and shards, read lazily
run_dir.py      a training run's folder: where its checkpoint and records live
"""

from ossgpt.checkpoint.pretrained import from_pretrained, load_config, save_pretrained

__all__ = ["from_pretrained", "load_config", "save_pretrained"]
