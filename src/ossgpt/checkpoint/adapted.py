"""A LoRA fine-tune's checkpoint: the adapters (ossgpt.lora.files) and a reference to the base model they adapt.

    DIR/
      adapter.safetensors, adapter_config.json   the adapters, and the sites of the base they fit (ossgpt.lora.files)
      base.json                                  {"base": the base model directory, an absolute path}
      tokenizer.json                             the base's, when it has one

Never a copy of the base: gpt-oss-20b's adapters take megabytes, its weights 13 GB. `ossgpt sft` writes such a
folder as a LoRA run's checkpoint (with its optimizer and trainer state beside); the commands that load a
checkpoint rebuild the adapted model from it (ossgpt.inference.loading), `ossgpt merge` folds it into the base.

    is_adapted(directory)                          whether DIR is such a folder
    load_adapted(directory, base=None, **options)  the base (from_pretrained(base, **options)) with the adapters on
    load_whole_model(directory, **options)         any checkpoint as one plain, trainable model: adapters folded in
    whole_model_directory(directory)               the model directory a checkpoint is or adapts (its config's)
    write_adapted(config, lora, state, base, directory)  the adapters {name: tensor} and the reference, into DIR
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ossgpt.checkpoint.files import read_json
from ossgpt.checkpoint.pretrained import from_pretrained
from ossgpt.config import GPTOSSConfig
from ossgpt.errors import UserError
from ossgpt.lora import LoRAConfig, add_lora, load_adapters, merge_lora, save_adapters
from ossgpt.lora.files import CONFIG_FILE
from ossgpt.lora.transform import lora_parameters
from ossgpt.model import GPTOSS

BASE_FILE = "base.json"


def is_adapted(directory: str | Path) -> bool:
    """Whether `directory` holds adapters and the reference to their base."""
    return (Path(directory) / CONFIG_FILE).is_file() and (Path(directory) / BASE_FILE).is_file()


def adapted_base(directory: str | Path) -> Path:
    """The base model directory that the adapters in `directory` were trained on; UserError if it is gone."""
    path = Path(directory) / BASE_FILE
    record = read_json(path)
    if not isinstance(record, dict) or not isinstance(record.get("base"), str):
        raise UserError(f'{path} is not a base reference ({{"base": PATH}}); the checkpoint is corrupt')
    base = Path(record["base"])
    if not (base / "config.json").is_file():
        raise UserError(
            f"{directory} adapts the base model {base}, which is not there any more: put it back, or name where it "
            "is now (ossgpt merge --base PATH)"
        )
    return base


def load_adapted(directory: str | Path, base: str | Path | None = None, **options) -> GPTOSS:
    """The base model with the adapters of `directory` added (not merged), in eval mode.

    base: the base model directory, if not the one recorded (moved); options: from_pretrained's (dtype, device,
    keep_mxfp4, ...). UserError if the adapters do not fit the base (the first differing site is named)."""
    base = Path(base) if base is not None else adapted_base(directory)
    model = from_pretrained(base, **options)
    try:
        load_adapters(model, directory)
    except ValueError as err:
        raise UserError(f"{err}: the adapters do not fit the base model {base}") from None
    return model.eval()


def load_whole_model(directory: str | Path, **options) -> GPTOSS:
    """The model of any checkpoint `directory` as one plain model, as from_pretrained gives it (eval mode, every
    float parameter trainable): a LoRA fine-tune's base with its adapters folded into the weights (merge_lora, as
    `ossgpt merge` writes it), anything else from_pretrained(directory, **options)."""
    if not is_adapted(directory):
        return from_pretrained(directory, **options)
    model = merge_lora(load_adapted(directory, **options))
    for param in model.parameters():  # add_lora froze the base, and merging leaves it so
        param.requires_grad_(param.is_floating_point())
    return model.eval()


def whole_model_directory(directory: str | Path) -> Path:
    """The model directory whose config.json describes checkpoint `directory`: a LoRA fine-tune's base, else
    `directory` itself (the adapters change no shape)."""
    return adapted_base(directory) if is_adapted(directory) else Path(directory)


def write_adapted(
    config: GPTOSSConfig, lora: LoRAConfig, state: dict[str, torch.Tensor], base: Path, directory: Path
) -> None:
    """Write adapters into `directory` (existing, being made), as save_adapters would from the adapted model:
    `state` holds the adapters of a model of `config` adapted by `lora` ({name: tensor}, as gathered from every
    process; other tensors are ignored), `base` the base model's directory."""
    with torch.device("meta"):  # a model to hold the tensors: no memory, no initialisation
        holder = GPTOSS(config)
    add_lora(holder, lora)
    # (state may hold more: torch's gathering of trainable parameters keeps a tied frozen head.)
    holder.load_state_dict({name: state[name] for name, _ in lora_parameters(holder)}, strict=False, assign=True)
    # save_adapters writes its own folder atomically; make it a subfolder, then lift its files.
    save_adapters(holder, directory / "adapters")
    for path in (directory / "adapters").iterdir():
        os.replace(path, directory / path.name)
    (directory / "adapters").rmdir()
    (directory / BASE_FILE).write_text(json.dumps({"base": str(base)}, indent=1) + "\n")
