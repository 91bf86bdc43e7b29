"""Loading a trained model and its tokenizer for inference (`ossgpt eval`, `ossgpt generate`).

A checkpoint path may name either
  a model directory   config.json + model.safetensors (+ tokenizer.json), as `save_pretrained` writes it, or a
                      Hugging Face gpt-oss directory;
  a training run      RUN_DIR holding the model directory as RUN_DIR/checkpoint/.

Context extension (`context_extension`): config overrides that set YaRN for F times the length a run trained on,
used at load time by `ossgpt eval` and as the starting point of a long-context fine-tune by `ossgpt train`.

Quantization for decoding (`quantize`, the `--quantize` option of `ossgpt generate` and `ossgpt chat`): the int8
copy of ossgpt.inference.decode_fast, weight-only (`int8`) or with the LM head's input quantized too
(`int8-dynamic`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ossgpt.checkpoint import from_pretrained, load_config
from ossgpt.errors import UserError
from ossgpt.inference.decode_fast import quantize_for_decoding
from ossgpt.quant.experts import has_mxfp4_experts
from ossgpt.tokenizer import load_tokenizer

RUN_CHECKPOINT = "checkpoint"  # a training run's model directory, relative to the run directory
TRAIN_CONFIG = "train_config.json"  # written by `ossgpt train` into RUN_DIR; its "data" names the data folder


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


QUANTIZE_MODES = ("int8", "int8-dynamic")
QUANTIZE_HELP = (
    "int8: int8 weights for the LM head, attention and experts (weight-only; ~4x fewer bytes per token than "
    "float32); int8-dynamic: the same, and the LM head quantizes its input per token too (W8A8), the fastest on "
    "CPU (default: off)"
)


def quantize(model, mode: str | None):
    """`model` itself (mode None), or its int8 copy for decoding (mode one of QUANTIZE_MODES)."""
    if mode is None:
        return model
    if mode not in QUANTIZE_MODES:
        raise UserError(f"unknown quantization {mode!r}; use one of {', '.join(QUANTIZE_MODES)}")
    if has_mxfp4_experts(model):
        raise UserError("--quantize does not combine with MXFP4 experts (--mxfp4): pick one of the two")
    if model.device.type != "cpu":  # the int8 kernels are CPU ones; elsewhere every call would dequantize
        raise UserError(f"--quantize is for decoding on the CPU, not {model.device.type} (its int8 kernels are "
                        "CPU ones); leave it out there, or add --device cpu")  # fmt: skip
    return quantize_for_decoding(model, dynamic_lm_head=mode == "int8-dynamic")


def load_model_and_tokenizer(
    path: str | Path,
    device: str | None = "cpu",
    dtype: torch.dtype = torch.float32,
    quantization: str | None = None,
    **config_overrides,
):
    """(model in eval mode, tokenizer) of the checkpoint at `path` (a model or training run directory).

    The tokenizer is the one the model's config names (`config.tokenizer`); a compact vocabulary is rebuilt from
    the checkpoint's tokenizer.json. device=None picks CUDA when available. quantization: see `quantize`.
    config_overrides change non-shape config fields at load time (e.g. RoPE scaling for context extension).
    """
    directory = resolve_checkpoint(path)
    model = from_pretrained(directory, dtype=dtype, device=resolve_device(device), **config_overrides)
    model = quantize(model, quantization)
    tokenizer = load_tokenizer(model.config.tokenizer, directory=directory)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(
            f"{directory}: tokenizer {tokenizer.spec} has {tokenizer.vocab_size} tokens but the model only "
            f"{model.config.vocab_size} embeddings; the checkpoint's tokenizer does not belong to its model"
        )
    return model, tokenizer


def context_extension(checkpoint: Path, factor: float | None, no_yarn: bool) -> dict:
    """Config overrides that stretch the model's context `factor` times past the length it was trained on."""
    if factor is None:
        if no_yarn:
            raise UserError("--no-yarn only applies with --context-extension F")
        return {}
    if factor < 1:
        raise UserError(f"--context-extension must be >= 1, got {factor}")
    config = load_config(checkpoint)
    if config.rope_type == "yarn" and config.rope_factor > 1:
        raise UserError(f"this model was trained with YaRN factor {config.rope_factor}; extend models trained with "
                        "plain RoPE")  # fmt: skip
    trained = trained_seq_len(checkpoint) or config.max_position_embeddings
    overrides = {"max_position_embeddings": max(config.max_position_embeddings, int(factor * trained))}
    if not no_yarn and factor > 1:
        overrides.update(rope_type="yarn", rope_factor=factor, rope_original_max_position_embeddings=int(trained))
    return overrides


def trained_seq_len(checkpoint: Path) -> int | None:
    """The sequence length a training run's checkpoint was trained on (None for a bare model directory)."""
    return read_json_dict(checkpoint.parent / TRAIN_CONFIG).get("seq_len")


def read_json_dict(path: Path) -> dict:
    """A JSON object file's contents; {} if the file is missing or holds something else."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
