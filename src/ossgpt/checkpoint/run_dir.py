"""A training run's folder: what `ossgpt train` writes where, and how the other commands find it.

    RUN_DIR/
      train_config.json   TRAIN_CONFIG: the resolved TrainConfig, the number of processes and the model config
      train.log           LOG: a header (versions, machine, run), then every message and logged step
      metrics.jsonl       METRICS: one JSON object per logged step and per evaluation
      loss.png            PLOT: training and validation loss against tokens seen
      checkpoint/         CHECKPOINT: the latest checkpoint, itself a model directory (config.json, weights,
                          tokenizer.json) that every command loads, plus the optimizer and trainer state; for a
                          LoRA fine-tune (`ossgpt sft`), the adapters and a reference to their base instead of the
                          weights (ossgpt.checkpoint.adapted)

Commands that take a checkpoint (`eval`, `generate`, `chat`, `serve`, `train --init-from`, `convert`, `merge`) and
GPTOSSForCausalLM.from_pretrained accept either a model directory or a run directory (`resolve_checkpoint`); beside a
run's checkpoint they find the run's record (`run_record`): the length it trained on and its data folder.
"""

from __future__ import annotations

import json
from pathlib import Path

from ossgpt.checkpoint.adapted import is_adapted
from ossgpt.checkpoint.original import ORIGINAL_DIR
from ossgpt.errors import UserError

CHECKPOINT = "checkpoint"
TRAIN_CONFIG = "train_config.json"
LOG = "train.log"
METRICS = "metrics.jsonl"
PLOT = "loss.png"


def checkpoint_dir(run_dir: str | Path) -> Path:
    """RUN_DIR/checkpoint."""
    return Path(run_dir) / CHECKPOINT


def resolve_checkpoint(path: str | Path) -> Path:
    """The model directory that `path` names: `path` itself if it has config.json (or adapters, see
    ossgpt.checkpoint.adapted), else `path`/checkpoint (a training run), else `path`/original (a gpt-oss download
    holding only OpenAI's original layout)."""
    path = Path(path)
    for directory in (path, checkpoint_dir(path), path / ORIGINAL_DIR):
        if (directory / "config.json").is_file() or is_adapted(directory):
            return directory
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist; pass a model directory or a training run directory")
    raise UserError(
        f"{path} has no config.json, so it is not a checkpoint: expected a model directory with config.json (or "
        f"{ORIGINAL_DIR}/config.json), or a training run directory with {CHECKPOINT}/config.json"
    )


def run_record(checkpoint: Path) -> dict:
    """train_config.json of the run whose checkpoint `checkpoint` is; {} for a model directory outside a run."""
    if checkpoint.name != CHECKPOINT:
        return {}
    try:
        value = json.loads((checkpoint.parent / TRAIN_CONFIG).read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
