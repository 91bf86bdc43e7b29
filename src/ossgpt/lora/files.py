"""Adapters on disk: a folder with the adapter tensors and what they fit.

    adapter.safetensors    the adapters only ({name: tensor}, as adapter_state_dict names them), in their dtype
    adapter_config.json    {"lora": LoRAConfig.to_dict(), "sites": {site name: shape of the weight it adapts}}
                           (the token ids whose rows train are LoRAConfig's `tokens`)

The sites (ossgpt.lora.transform) describe the base: loading onto a model whose sites differ (another width, depth
or expert count) is refused before anything changes, naming the first difference.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ossgpt.atomic import atomic_directory
from ossgpt.lora.config import LoRAConfig
from ossgpt.lora.transform import adapter_shapes, adapter_state_dict, add_lora, base_sites, lora_config, lora_parameters

ADAPTER_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter_config.json"


def save_adapters(model: nn.Module, directory: str | Path) -> None:
    """Write the adapters of an adapted model to `directory` (which appears whole or not at all)."""
    config = lora_config(model)
    sites = base_sites(model, config.targets, config.tokens)
    tensors = {name: t.cpu().contiguous() for name, t in adapter_state_dict(model).items()}
    with atomic_directory(directory) as tmp:
        save_file(tensors, str(tmp / ADAPTER_FILE), metadata={"format": "pt"})
        described = {"lora": config.to_dict(), "sites": {name: list(shape) for name, shape in sites.items()}}
        (tmp / CONFIG_FILE).write_text(json.dumps(described, indent=1) + "\n")


def load_adapters(model: nn.Module, directory: str | Path) -> nn.Module:
    """Add the saved adapters to `model` (a base without adapters, dense or packed), in place, in the dtype they
    were saved in, and return it.

    ValueError, before the model changes, if the folder is not a whole adapter folder or was saved for another
    base (the first site that differs is named)."""
    directory = Path(directory)
    if not (directory / CONFIG_FILE).is_file() or not (directory / ADAPTER_FILE).is_file():
        raise ValueError(f"{directory}: not an adapter folder (save_adapters writes {CONFIG_FILE} and {ADAPTER_FILE})")
    config, saved_sites = _read_config(directory / CONFIG_FILE)
    try:
        sites = base_sites(model, config.targets, config.tokens)
    except ValueError as e:  # e.g. a token id past this model's vocabulary
        raise ValueError(f"{directory}: {e}") from None
    for name, shape in saved_sites.items():
        if name not in sites:
            raise ValueError(f"{directory}: the adapters adapt {name}, which this model does not have")
        if tuple(shape) != sites[name]:
            raise ValueError(f"{directory}: the adapters were trained on a base whose {name} has shape {list(shape)}; "
                             f"this model's has {list(sites[name])}")  # fmt: skip
    for name in sites:
        if name not in saved_sites:
            raise ValueError(f"{directory}: this model has {name}, which the adapters do not adapt")
    try:
        tensors = load_file(directory / ADAPTER_FILE)
    except SafetensorError as e:
        raise ValueError(f"{directory / ADAPTER_FILE}: unreadable ({e})") from None
    expected = adapter_shapes(sites, config.rank, len(config.tokens))
    for name, shape in expected.items():
        if name not in tensors:
            raise ValueError(f"{directory / ADAPTER_FILE}: missing tensor {name!r} that its config implies")
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"{directory / ADAPTER_FILE}: tensor {name!r} has shape {list(tensors[name].shape)}, "
                             f"its config implies {list(shape)}")  # fmt: skip
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise ValueError(f"{directory / ADAPTER_FILE}: unexpected tensor {extra[0]!r} that its config does not imply")
    add_lora(model, config, dtype=tensors[next(iter(expected))].dtype)  # in the dtype they were saved in
    with torch.no_grad():
        for name, param in lora_parameters(model):
            param.copy_(tensors[name])
    return model


def _read_config(path: Path) -> tuple[LoRAConfig, dict]:
    """adapter_config.json -> (LoRAConfig, {site name: shape list}); ValueError naming the file if malformed."""
    try:
        described = json.loads(path.read_text())
        if not isinstance(described, dict) or not isinstance(described.get("sites"), dict) or "lora" not in described:
            raise ValueError('expected a JSON object with "lora" and "sites"')
        return LoRAConfig.from_dict(described["lora"]), described["sites"]
    except ValueError as e:  # json's decode error is one too
        raise ValueError(f"{path}: not an adapter config: {e}") from None
