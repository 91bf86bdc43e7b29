"""`save_pretrained` / `from_pretrained`: ossgpt's own checkpoint format, Hugging Face's, and OpenAI's original.

ossgpt format                       Hugging Face format                      OpenAI's original format
  config.json {"format": "ossgpt",    config.json {"model_type": "gpt_oss",    original/config.json (reference
               "config": {...}}                    ...HF field names}                      ModelConfig names)
  model.safetensors (our names)       model.safetensors or shards + index      original/*.safetensors
                                      (names with a `model.` prefix)            (see ossgpt.checkpoint.original)

The model's parameter names are HF's minus the `model.` prefix, so HF <-> ossgpt is renaming. HF checkpoints may
keep the experts in MXFP4 (`quantization_config: {"quant_method": "mxfp4"}`, as gpt-oss is published), and the
original layout always does: `from_pretrained` dequantizes them (exactly: FP4 values are representable in bf16),
or with `keep_mxfp4=True` keeps them packed (ossgpt.quant.mxfp4).

Loading builds the model on the `meta` device (no memory, no init), then materialises the tensors one by one
from the memory-mapped files, in the requested dtype and device; a packed expert projection is dequantized one
expert at a time as soon as its blocks and scales have both been read, so no format ever holds the dense model
twice. Every name and shape is checked: a foreign, truncated or mismatched checkpoint fails with the file and
tensor named, never a silent partial load.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import save_file

from ossgpt.checkpoint.files import atomic_directory, iter_tensors, read_json, safetensors_files
from ossgpt.checkpoint.hf_config import config_from_hf, config_to_hf
from ossgpt.checkpoint.original import (
    ORIGINAL_DIR,
    config_from_original,
    is_original_config,
    original_files,
    rename_original,
)
from ossgpt.config import GPTOSSConfig
from ossgpt.errors import UserError
from ossgpt.kernels.mxfp4 import dequantize_experts
from ossgpt.lora.transform import has_lora
from ossgpt.model import GPTOSS
from ossgpt.model.rope import RotaryEmbedding
from ossgpt.options import RuntimeOptions
from ossgpt.quant.mxfp4 import has_mxfp4_experts, use_mxfp4_experts
from ossgpt.tokenizer import TOKENIZER_FILE

FORMAT_NAME = "ossgpt"
FORMAT_VERSION = 1
HF_PREFIX = "model."
# What published HF MXFP4 checkpoints say in config.json (quantized: the experts only).
MXFP4_QUANTIZATION_CONFIG = {
    "quant_method": "mxfp4",
    "modules_to_not_convert": [
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ],
}


def hf_to_ours(name: str) -> str:
    return name[len(HF_PREFIX) :] if name.startswith(HF_PREFIX) else name


def ours_to_hf(name: str) -> str:
    return name if name.startswith("lm_head.") else HF_PREFIX + name


class CheckpointInfo(NamedTuple):
    format: str  # "ossgpt", "hf" or "original"
    directory: Path  # the folder holding config.json and the weights (`original/` for the original layout)
    raw_config: dict  # config.json as read
    mxfp4: bool  # whether the experts are stored packed in MXFP4


def detect_format(directory: str | Path) -> CheckpointInfo:
    """What kind of checkpoint `directory` is, or a UserError saying what it is not.

    A published gpt-oss repository holds both an HF layout at its root and the original one in `original/`:
    the root wins. A directory with only `original/`, or `original/` itself, is read in the original layout.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"checkpoint directory {directory} does not exist")
    config_path = directory / "config.json"
    if not config_path.exists():
        if (directory / ORIGINAL_DIR / "config.json").exists():
            return detect_format(directory / ORIGINAL_DIR)
        raise UserError(f"{directory} has no config.json: not an ossgpt, Hugging Face or original gpt-oss checkpoint")
    raw = read_json(config_path)
    if raw.get("format") == FORMAT_NAME:
        return CheckpointInfo("ossgpt", directory, raw, mxfp4=False)
    if raw.get("model_type") == "gpt_oss":
        quant = raw.get("quantization_config") or {}
        if quant and quant.get("quant_method") != "mxfp4":
            raise UserError(
                f"{config_path}: quantization {quant.get('quant_method')!r} is not supported (ossgpt reads "
                "unquantized and mxfp4 gpt-oss checkpoints)"
            )
        return CheckpointInfo("hf", directory, raw, mxfp4=bool(quant))
    if is_original_config(raw):
        return CheckpointInfo("original", directory, raw, mxfp4=True)
    kind = raw.get("model_type") or raw.get("format") or "unknown"
    raise UserError(f"{config_path} describes a {kind!r} model; ossgpt loads ossgpt and gpt_oss checkpoints only")


def load_config(directory: str | Path, **overrides) -> GPTOSSConfig:
    """The model config of a checkpoint directory of any format."""
    return _config_of(detect_format(directory), **overrides)


def _config_of(info: CheckpointInfo, **overrides) -> GPTOSSConfig:
    if info.format == "hf":
        return config_from_hf(info.raw_config, **overrides)
    if info.format == "original":
        return config_from_original(info.raw_config, **overrides)
    raw = info.raw_config
    if raw.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(f"{info.directory} was written by a newer ossgpt (format {raw['format_version']}); upgrade")
    try:
        return GPTOSSConfig.from_dict({**raw["config"], **overrides})
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"{info.directory}/config.json is not a valid ossgpt config: {err}") from None


def from_pretrained(
    directory: str | Path,
    dtype: torch.dtype | None = torch.float32,
    device: str | torch.device = "cpu",
    keep_mxfp4: bool = False,
    options: RuntimeOptions | None = None,
    model_class: type[GPTOSS] = GPTOSS,
    **config_overrides,
) -> GPTOSS:
    """Load a model from an ossgpt, Hugging Face (plain or MXFP4) or original gpt-oss checkpoint directory.

    dtype: of the floating-point weights (MXFP4 experts are dequantized straight to it); None keeps each as
        stored (memory-mapped, no copy), dequantizing experts to bfloat16.
    keep_mxfp4: keep MXFP4 experts packed (4.25 bits per weight) and dequantize them on the fly in the forward;
        the checkpoint must have MXFP4 experts.
    options: how the model runs (ossgpt.options; default RuntimeOptions()).
    model_class: GPTOSS or a subclass (ossgpt.GPTOSSForCausalLM's from_pretrained passes itself).
    config_overrides: change non-shape fields at load time (e.g. rope_factor=8.0 for a longer context).
    """
    info = detect_format(directory)
    config = _config_of(info, **config_overrides)
    if keep_mxfp4 and not info.mxfp4:
        raise UserError(f"keep_mxfp4=True needs a checkpoint with MXFP4 experts; {info.directory} has dense experts")
    with torch.device("meta"):
        model = model_class(config, options)
        if keep_mxfp4:
            use_mxfp4_experts(model)
    expected = {name: t for name, t in model.state_dict().items()}  # meta tensors: shapes and dtypes only
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")

    loaded = {}
    for ours, path, name, tensor in _source_tensors(info, config, dtype, device, keep_mxfp4):
        if ours == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: the embedding is the head
        if ours not in expected:
            raise UserError(f"{path.name}: unexpected tensor {name!r}; this checkpoint does not match its config.json")
        want = expected[ours]
        if tuple(tensor.shape) != tuple(want.shape):
            raise UserError(
                f"{path.name}: tensor {name!r} has shape {tuple(tensor.shape)}, config.json implies {tuple(want.shape)}"
            )
        if tensor.is_floating_point() != want.is_floating_point():
            raise UserError(f"{path.name}: tensor {name!r} has dtype {tensor.dtype}, expected {want.dtype}")
        loaded[ours] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
    missing = sorted(set(expected) - set(loaded))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise UserError(f"{info.directory}: checkpoint is missing tensor(s) {', '.join(missing[:3])}{more}")

    model.load_state_dict(loaded, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary_emb = RotaryEmbedding(config).to(device)  # non-persistent buffers were left on `meta`
    return model.eval()


def _source_tensors(
    info: CheckpointInfo, config: GPTOSSConfig, dtype, device, keep_mxfp4: bool
) -> Iterator[tuple[str, Path, str, torch.Tensor]]:
    """(ossgpt name, file, checkpoint name, tensor) for every tensor, in ossgpt's layout."""
    if info.format == "original":
        tensors = rename_original(iter_tensors(original_files(info.directory), read_packed=keep_mxfp4), config)
    else:
        rename = hf_to_ours if info.format == "hf" else (lambda name: name)
        files = safetensors_files(info.directory)
        tensors = ((rename(name), path, name, t) for name, path, t in iter_tensors(files, read_packed=keep_mxfp4))
    if info.mxfp4 and not keep_mxfp4:
        tensors = _dequantize_packed(tensors, dtype, device)
    return tensors


def _dequantize_packed(tensors, dtype, device) -> Iterator[tuple[str, Path, str, torch.Tensor]]:
    """Replace each packed expert projection (`X_blocks` + `X_scales`) by the dense `X` [E, in, out].

    A half waits only until its partner arrives (they are neighbours in published files); everything else
    passes straight through.
    """
    waiting: dict[str, tuple[str, Path, str, torch.Tensor]] = {}
    for ours, path, name, tensor in tensors:
        base, _, part = ours.rpartition("_")
        if part not in ("blocks", "scales"):
            yield ours, path, name, tensor
            continue
        partner = waiting.pop(base, None)
        if partner is not None and partner[0] == part:
            raise UserError(f"{path.name}: MXFP4 tensor {name!r} appears twice; the checkpoint is corrupt")
        if partner is None:
            waiting[base] = (part, path, name, tensor)
            continue
        halves = {part: (name, tensor), partner[0]: (partner[2], partner[3])}
        (blocks_name, blocks), (scales_name, scales) = halves["blocks"], halves["scales"]
        try:
            dense = dequantize_experts(blocks, scales, dtype or torch.bfloat16, device)
        except ValueError as err:
            raise UserError(f"{path.name}: tensors {blocks_name!r} and {scales_name!r}: {err}") from None
        yield base, path, blocks_name, dense
    for part, path, name, _ in waiting.values():
        other = "scales" if part == "blocks" else "blocks"
        raise UserError(f"{path.name}: MXFP4 tensor {name!r} has no matching {other} tensor; the file is truncated")


# ----------------------------------------------------------------------------------------------------------------
def save_pretrained(
    model: GPTOSS,
    directory: str | Path,
    format: str = "ossgpt",  # noqa: A002
    max_shard_size: int | str | None = None,
    tokenizer_file: str | Path | None = None,
) -> None:
    """Write config.json + weights atomically.

    format: "ossgpt", or "hf" (loadable by transformers' GptOssForCausalLM). A model with MXFP4-packed experts
        (keep_mxfp4=True) is written in the published HF MXFP4 layout and needs format="hf".
    max_shard_size: bytes (or "500MB", "5GB", "2GiB") per weight file; larger states are split into
        model-0000i-of-0000N.safetensors with a model.safetensors.index.json, as HF does.
    tokenizer_file: a tokenizer.json to copy in beside the weights (a compact vocabulary's token table lives there:
        ossgpt.tokenizer.load_tokenizer reads it from the model's directory).
    """
    if format not in ("ossgpt", "hf"):
        raise ValueError(f"format must be 'ossgpt' or 'hf', got {format!r}")
    if has_lora(model):  # its state holds adapters that no config.json describes: the folder would not load
        raise ValueError("the model has LoRA adapters: fold them in first (ossgpt.lora.merge_lora(model)) to save a "
                         "whole model, or save the adapters alone (ossgpt.lora.save_adapters)")  # fmt: skip
    packed = has_mxfp4_experts(model)
    if packed and format != "hf":
        raise ValueError("a model with MXFP4 experts can only be saved with format='hf' (the published layout)")
    state = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")  # safetensors cannot store two names for one tensor; the tie is in the config
    if format == "hf":
        state = {ours_to_hf(name): t for name, t in state.items()}
        config = config_to_hf(model.config)
        config["dtype"] = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
        if packed:
            config["quantization_config"] = MXFP4_QUANTIZATION_CONFIG
    else:
        config = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "config": model.config.to_dict()}
    shards = _shard(state, parse_size(max_shard_size) if max_shard_size is not None else None)
    with atomic_directory(Path(directory)) as tmp:
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, start=1):
                filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / filename), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, filename))
            total = sum(t.numel() * t.element_size() for t in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, tmp / TOKENIZER_FILE)


def _shard(state: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    """Split a state dict, in order, into shards of at most max_bytes (a larger single tensor gets its own)."""
    shards, size = [{}], 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if max_bytes is not None and shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "500MB", "5GB" or "2GiB" (decimal units, as HF's max_shard_size)."""
    if isinstance(size, int) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
    if not match or match[2].upper() not in SIZE_UNITS or float(match[1]) <= 0:
        raise ValueError(f"max_shard_size must be a positive byte count such as 500MB or 5GB, got {size!r}")
    return int(float(match[1]) * SIZE_UNITS[match[2].upper()])
