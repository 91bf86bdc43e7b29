"""The prototype's `python main.py --train_data ... --eval_data ...`: end to end, epochs, torchrun, bad input."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from ossgpt.inference.loading import load_model_and_tokenizer
from test_training import WORDS

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
CL100K_CACHE = ROOT.parent / "shared" / "tokenizers" / "tiktoken_cache"
SHORT = ["--preset", "tiny", "--seq_len", "32", "--batch_size", "2", "--tokenizer", "bytes"]


def load_main_py():
    spec = importlib.util.spec_from_file_location("seed_main", ROOT / "main.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def texts(tmp_path):
    rng = random.Random(0)
    train, held_out = tmp_path / "train.txt", tmp_path / "eval.txt"
    train.write_text(" ".join(rng.choice(WORDS) for _ in range(3000)))
    held_out.write_text(" ".join(rng.choice(WORDS) for _ in range(500)))
    return train, held_out


def test_main_py_end_to_end(tmp_path, texts, monkeypatch):
    """The prototype's command, with the preset's own (compact cl100k) tokenizer when its vocabulary is available."""
    train, held_out = texts
    out = tmp_path / "run"
    flags = SHORT
    if CL100K_CACHE.is_dir():
        monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(CL100K_CACHE))
        flags = SHORT[:-2]  # drop --tokenizer bytes
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "main.py"), "--train_data", str(train), "--eval_data", str(held_out),
               "--num_epochs", "3", "--grad_accum_steps", "2", "--learning_rate", "3e-4", "--warmup_steps", "2",
               "--gradient_checkpointing", "--max_steps", "3", *flags, "--out_dir", str(out)]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "eval at step 3" in result.stderr
    meta = json.loads((out / "data" / "meta.json").read_text())
    assert meta["val_bytes"] == held_out.stat().st_size and meta["train_bytes"] == train.stat().st_size
    recorded = json.loads((out / "train_config.json").read_text())
    assert recorded["max_steps"] == 3 and recorded["gradient_checkpointing"] and recorded["learning_rate"] == 3e-4
    model, tokenizer = load_model_and_tokenizer(out)
    assert tokenizer.spec == meta["tokenizer"] and model.config.tokenizer == meta["tokenizer"]


def test_num_epochs_sets_the_steps(tmp_path, texts):
    train, held_out = texts
    out = tmp_path / "run"
    argv = ["--train_data", str(train), "--eval_data", str(held_out), "--num_epochs", "0.05", *SHORT,
            "--out_dir", str(out)]  # fmt: skip
    assert load_main_py().main(argv) == 0
    train_tokens = json.loads((out / "data" / "meta.json").read_text())["train_tokens"]
    expected = -(-0.05 * train_tokens // (2 * 32))  # ceil(epochs * tokens / tokens per step)
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == expected


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--train_data", "missing.txt"], "input missing.txt does not exist"),
        (["--num_epochs", "0"], "--num_epochs must be positive"),
        (["--batch_size", "0"], "must be a positive integer"),
    ],
)
def test_main_py_bad_input_is_one_error_line(flags, message, tmp_path, texts, capsys):
    train, held_out = texts
    argv = [
        "--train_data",
        str(train),
        "--eval_data",
        str(held_out),
        *SHORT,
        "--out_dir",
        str(tmp_path / "run"),
        *flags,
    ]
    assert load_main_py().main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_main_py_under_torchrun(tmp_path, texts):
    train, held_out = texts
    out = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command = [*torchrun, str(ROOT / "main.py"), "--train_data", str(train), "--eval_data", str(held_out),
               "--max_steps", "2", *SHORT, "--out_dir", str(out)]  # fmt: skip
    result = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    recorded = json.loads((out / "train_config.json").read_text())
    assert (recorded["distributed"], recorded["world_size"], recorded["batch_size"]) == ("ddp", 2, 4)  # 2 per process
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 2
