"""Loading a trained model and its tokenizer for inference (`ossgpt eval`, `ossgpt generate`).

A checkpoint path may name either
  a model directory   config.json + model.safetensors (+ tokenizer.json), as `save_pretrained` writes it, or a
                      Hugging Face gpt-oss directory;
  a training run      RUN_DIR holding the model directory as RUN_DIR/checkpoint/.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ossgpt.checkpoint import from_pretrained
from ossgpt.errors import UserError
from ossgpt.tokenizer import load_tokenizer

RUN_CHECKPOINT = "checkpoint"  # a training run's model directory, relative to the run directory


def resolve_checkpoint(path: str | Path) -> Path:
    """The model directory that `path` names: `path` itself if it has config.json, else `path`/checkpoint."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    if (path / RUN_CHECKPOINT / "config.json").is_file():
        return path / RUN_CHECKPOINT
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist; pass a model directory or a training run directory")
    raise UserError(
        f"{path} is not a checkpoint: expected a model directory with config.json, "
        f"or a training run directory with {RUN_CHECKPOINT}/config.json"
    )


def resolve_device(name: str | None) -> torch.device:
    """The torch device `name` ("cpu", "cuda", "cuda:1"); None picks CUDA when available, else the CPU."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda requested but CUDA is not available here; use --device cpu")
    return device


def load_model_and_tokenizer(
    path: str | Path, device: str | None = "cpu", dtype: torch.dtype = torch.float32, **config_overrides
):
    """(model in eval mode, tokenizer) of the checkpoint at `path` (a model or training run directory).

    The tokenizer is the one the model's config names (`config.tokenizer`); a compact vocabulary is rebuilt from
    the checkpoint's tokenizer.json. device=None picks CUDA when available. config_overrides change non-shape
    config fields at load time (e.g. RoPE scaling for context extension).
    """
    directory = resolve_checkpoint(path)
    model = from_pretrained(directory, dtype=dtype, device=resolve_device(device), **config_overrides)
    tokenizer = load_tokenizer(model.config.tokenizer, directory=directory)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(
            f"{directory}: tokenizer {tokenizer.spec} has {tokenizer.vocab_size} tokens but the model only "
            f"{model.config.vocab_size} embeddings; the checkpoint's tokenizer does not belong to its model"
        )
    return model, tokenizer
