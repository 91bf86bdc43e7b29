"""Loading a trained model and its tokenizer for inference (`ossgpt eval`, `ossgpt generate`).

A checkpoint path may name a model directory (config.json + weights, ossgpt's, Hugging Face's or OpenAI's
original layout) or a training run directory (see ossgpt.checkpoint.run_dir).

Context extension (`context_extension`): config overrides that set YaRN for F times the length a run trained on,
used at load time by `ossgpt eval` and as the starting point of a long-context fine-tune by `ossgpt train`.

Quantization for decoding (`quantize`, the `--quantize` option of `ossgpt generate` and `ossgpt chat`): the int8
copy of ossgpt.quant.int8, weight-only (`int8`) or with the LM head's input quantized too
(`int8-dynamic`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ossgpt.checkpoint import from_pretrained, load_config
from ossgpt.checkpoint.run_dir import resolve_checkpoint, run_record
from ossgpt.devices import resolve_device
from ossgpt.errors import UserError
from ossgpt.quant.int8 import quantize_for_decoding
from ossgpt.quant.mxfp4 import has_mxfp4_experts
from ossgpt.tokenizer import load_tokenizer

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
    device: str | torch.device | None = "cpu",
    dtype: torch.dtype = torch.float32,
    quantization: str | None = None,
    keep_mxfp4: bool = False,
    vocab_file: str | Path | None = None,
    **config_overrides,
):
    """(model in eval mode, tokenizer) of the checkpoint at `path` (a model or training run directory).

    The tokenizer is the one the model's config names (`config.tokenizer`); a compact vocabulary is rebuilt from
    the checkpoint's tokenizer.json, a tiktoken one read from its cache or `vocab_file`. device: a name for
    ossgpt.devices.resolve_device ("auto" or None picks CUDA when available). quantization: see `quantize`.
    keep_mxfp4: keep MXFP4 experts packed (see ossgpt.checkpoint.from_pretrained). config_overrides change
    non-shape config fields at load time (e.g. RoPE scaling for context extension).
    """
    directory = resolve_checkpoint(path)
    model = from_pretrained(directory, dtype=dtype, device=resolve_device(device), keep_mxfp4=keep_mxfp4,
                            **config_overrides)  # fmt: skip
    model = quantize(model, quantization)
    tokenizer = load_tokenizer(model.config.tokenizer, directory=directory, vocab_file=vocab_file)
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
    """The sequence length a training run's checkpoint was trained on (None for a model directory outside a run)."""
    return run_record(checkpoint).get("seq_len")
