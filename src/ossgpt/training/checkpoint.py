"""Training checkpoints: RUN_DIR/checkpoint/, written atomically, read back by `--resume`.

    RUN_DIR/checkpoint/
      config.json, model.safetensors   the model exactly as `save_pretrained` writes it (`from_pretrained` loads it)
      tokenizer.json                   copied from the data folder, so the checkpoint is self-contained
      optimizer.safetensors            optimizer state: NAME.exp_avg, NAME.exp_avg_sq, NAME.step for each AdamW
                                       parameter, NAME.momentum_buffer for each Muon matrix
      trainer_state.json               step, tokens seen, best validation loss, RNG states, the TrainConfig

A LoRA fine-tune (training.sft) saves its adapters and a reference to its frozen base instead of config.json and
model.safetensors (ossgpt.checkpoint.adapted); its optimizer state is the adapters' only.

Safetensors and JSON only: reading a checkpoint never unpickles anything.

Saving is a collective (every process calls it): the full, unsharded model and optimizer state are gathered to
rank 0, which writes them into a temporary sibling folder and renames it into place (`atomic_directory`). So a
run killed at any moment leaves the previous checkpoint complete. What a kill can leave behind, `recover` tidies:
temporary folders, and, if the kill fell between the two renames that swap the folders, the previous checkpoint
still under its moved-aside name.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from ossgpt.atomic import atomic_directory
from ossgpt.checkpoint import save_pretrained
from ossgpt.checkpoint.files import read_json
from ossgpt.checkpoint.run_dir import CHECKPOINT, checkpoint_dir
from ossgpt.config import GPTOSSConfig
from ossgpt.errors import UserError
from ossgpt.model import GPTOSS
from ossgpt.tokenizer import TOKENIZER_FILE
from ossgpt.training.distributed import DistContext

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
STATE_FORMAT = "ossgpt-trainer-state"
ADAMW_KEYS = ("step", "exp_avg", "exp_avg_sq")
MUON_KEYS = ("momentum_buffer",)  # a Muon group's matrices (training.muon); its other groups are AdamW's
# Tests set this to a number of seconds to hold a save open midway, long enough to kill the process there.
PAUSE_ENV = "OSSGPT_TEST_SAVE_PAUSE"


# --- saving -------------------------------------------------------------------------------------------------------
def save_checkpoint(
    run_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    write_weights: Callable[[dict[str, torch.Tensor], Path], None],
    trainer_state: dict,
    tokenizer_file: Path | None,
    ctx: DistContext,
    trainable_only: bool = False,
) -> None:
    """Write RUN_DIR/checkpoint from every process's part of `model` (plain, DDP or FSDP) and `optimizer`.

    write_weights(state, folder): writes the gathered model state into the folder being made (`write_model_state`:
        a model directory). trainable_only: the state holds only the parameters that train (LoRA adapters), not
        the frozen rest.
    trainer_state: JSON-serialisable; the RNG states of all processes are added to it here.
    tokenizer_file: copied into the checkpoint (None: nothing to copy, the model's tokenizer is a named one).
    """
    # Full tensors, on rank 0's CPU only.
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    model_state = get_model_state_dict(model, options=options)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
    rng = ctx.all_gather_object(rng_state())
    if ctx.is_main:
        state = {"format": STATE_FORMAT, **trainer_state, "rng": rng}
        with atomic_directory(checkpoint_dir(run_dir)) as tmp:
            write_weights(model_state, tmp)
            if tokenizer_file is not None:
                shutil.copyfile(tokenizer_file, tmp / TOKENIZER_FILE)
            save_file(flatten_optimizer_state(optimizer_state), str(tmp / OPTIMIZER_FILE), {"format": "pt"})
            time.sleep(float(os.environ.get(PAUSE_ENV, 0)))
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
    ctx.barrier()


def write_model_state(config: GPTOSSConfig, state: dict[str, torch.Tensor], directory: Path) -> None:
    """The model of `config` with the weights `state` into `directory` (existing), as `save_pretrained` writes it."""
    # save_pretrained writes its own folder atomically; make it a subfolder, then lift its files.
    save_pretrained(_model_holding(config, state), directory / "model")
    for path in (directory / "model").iterdir():
        os.replace(path, directory / path.name)
    (directory / "model").rmdir()


def _model_holding(config: GPTOSSConfig, state: dict[str, torch.Tensor]) -> GPTOSS:
    """A model whose parameters are `state`'s tensors (no copy, no initialisation), for save_pretrained."""
    with torch.device("meta"):
        model = GPTOSS(config)
    model.load_state_dict(state, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model


def flatten_optimizer_state(optimizer_state: dict) -> dict[str, torch.Tensor]:
    """{"state": {param name: {"step": ., "exp_avg": ., "exp_avg_sq": .}}} -> {"param name.exp_avg": tensor, ...}."""
    return {
        f"{name}.{key}": torch.as_tensor(value).detach().cpu().contiguous()
        for name, per_param in optimizer_state["state"].items()
        for key, value in per_param.items()
    }


def rng_state() -> dict:
    """This process's python, numpy, torch (and CUDA) RNG states, as JSON-serialisable lists."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


# --- loading ------------------------------------------------------------------------------------------------------
def recover(run_dir: Path) -> None:
    """Tidy what a killed save left in `run_dir` (rank 0 only): delete temporary folders, and put the previous
    checkpoint back if it was moved aside and its replacement never arrived."""
    name = CHECKPOINT
    for tmp in run_dir.glob(f".{name}.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    moved_aside = sorted(run_dir.glob(f".{name}.old-*"), key=lambda p: p.stat().st_mtime)
    if moved_aside and not checkpoint_dir(run_dir).exists():
        os.replace(moved_aside.pop(), checkpoint_dir(run_dir))
    for old in moved_aside:
        shutil.rmtree(old, ignore_errors=True)


def read_trainer_state(directory: Path) -> dict:
    """trainer_state.json of a training checkpoint; UserError if it is missing or not one."""
    path = directory / STATE_FILE
    if not path.is_file():
        raise UserError(f"{directory} has no {STATE_FILE}: not a training checkpoint, cannot --resume from it")
    state = read_json(path)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or not isinstance(state.get("step"), int):
        raise UserError(f"{path} is not an ossgpt trainer state; the checkpoint is corrupt or foreign")
    return state


def check_compatible(saved: GPTOSSConfig, current: GPTOSSConfig, directory: Path) -> None:
    """UserError if the checkpoint's model differs from the one this run would train."""
    saved_values, current_values = saved.to_dict(), current.to_dict()
    differences = [
        f"{key} {saved_values[key]!r} (now {current_values[key]!r})"
        for key in saved_values
        if saved_values[key] != current_values[key]
    ]
    if differences:
        raise UserError(
            f"{directory} holds a different model: {'; '.join(differences[:3])}; resume with the run's --preset, "
            "--model-override and data, or start a new run with --force"
        )


def load_optimizer_state(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Fill `optimizer` (over `model`, plain, DDP or FSDP) from directory/optimizer.safetensors."""
    path = directory / OPTIMIZER_FILE
    try:
        flat = load_file(str(path))
    except FileNotFoundError:
        raise UserError(f"{directory} has no {OPTIMIZER_FILE}; cannot --resume from it") from None
    except (SafetensorError, OSError) as err:
        raise UserError(f"{path} is not a readable safetensors file ({err}); the checkpoint is corrupt") from None
    shapes = {name: tuple(t.shape) for name, t in get_model_state_dict(model).items()}  # global shapes, no gather
    current = get_optimizer_state_dict(model, optimizer)  # parameter names per group; no state yet
    state = {}
    for group in current["param_groups"]:
        keys = MUON_KEYS if group.get("muon") else ADAMW_KEYS
        for name in group["params"]:
            tensors = {key: flat.pop(f"{name}.{key}", None) for key in keys}
            if any(t is None for t in tensors.values()) or tuple(tensors[keys[-1]].shape) != shapes[name]:
                raise UserError(
                    f"{path} has no {' / '.join(keys)} state of the right shape for {name}: it does not belong to "
                    "this model, or was trained with another --optimizer"
                )
            state[name] = tensors
    if flat:
        raise UserError(f"{path} has state for unknown parameters ({next(iter(flat))}, ...); it is foreign")
    options = StateDictOptions(full_state_dict=True)  # every process passes the full tensors; FSDP keeps its shard
    set_optimizer_state_dict(
        model, optimizer, {"state": state, "param_groups": current["param_groups"]}, options=options
    )
