"""Resuming: an interrupted and resumed run equals an uninterrupted one; kills mid-save; bad checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from ossgpt.checkpoint import from_pretrained
from ossgpt.cli import main
from ossgpt.training import data as training_data
from ossgpt.training.checkpoint import PAUSE_ENV
from test_training import TINY, make_data, read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")

# Gradient accumulation, the load-balancing loss and router jitter (which draws from torch's RNG) all on.
RESUMABLE = [*TINY, "--grad-accum-steps", "2", "--log-every", "1", "--model-override", "router_aux_loss_coef=0.01",
             "--model-override", "router_jitter_noise=0.1"]  # fmt: skip


@pytest.fixture
def data(tmp_path):
    return make_data(tmp_path / "data")


def train_argv(data, run, *flags) -> list[str]:
    return ["train", "--data", str(data), "--out", str(run), *RESUMABLE, *flags]


def interrupt_at(monkeypatch, stop_step: int) -> None:
    """Make the run stop (as Ctrl-C would) when it asks for the batches of step `stop_step` (0-based)."""
    batch = training_data.TrainBatches.batch

    def batch_or_stop(self, step, micro_step):
        if step == stop_step:
            raise KeyboardInterrupt
        return batch(self, step, micro_step)

    monkeypatch.setattr(training_data.TrainBatches, "batch", batch_or_stop)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resumed_run_equals_an_uninterrupted_one(optimizer, tmp_path, data, monkeypatch):
    flags = ["--max-steps", "6", "--save-every", "3", "--eval-every", "3", "--optimizer", optimizer]
    assert main(train_argv(data, tmp_path / "straight", *flags)) == 0

    with monkeypatch.context() as patch:
        interrupt_at(patch, stop_step=3)
        assert main(train_argv(data, tmp_path / "resumed", *flags)) == 130  # stopped after the save at step 3
    assert json.loads((tmp_path / "resumed/checkpoint/trainer_state.json").read_text())["step"] == 3
    torch.manual_seed(12345)  # as a new process would, start from other RNG states: the checkpoint restores them
    assert main(train_argv(data, tmp_path / "resumed", *flags, "--resume")) == 0

    timing = {"tokens_per_sec", "elapsed_s"}
    (straight, straight_evals), (resumed, resumed_evals) = (
        read_metrics(tmp_path / "straight"),
        read_metrics(tmp_path / "resumed"),
    )
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]  # the rows of the interrupted run were not repeated
    for a, b in zip(straight, resumed):
        assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}
    assert straight_evals == resumed_evals
    for name in ("model.safetensors", "optimizer.safetensors"):
        a, b = (load_file(tmp_path / run / "checkpoint" / name) for run in ("straight", "resumed"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_one_command_restarts_a_run_killed_at_any_moment(tmp_path, data, monkeypatch):
    """`until ossgpt train ... --resume; do :; done`: --resume starts a run that has no checkpoint yet (never started,
    or killed before its first save) and continues one that has; the result is the uninterrupted run's."""
    flags = ["--max-steps", "5", "--save-every", "3", "--resume"]
    assert main(train_argv(data, tmp_path / "straight", *flags)) == 0  # --resume on a new folder: a new run
    run = tmp_path / "run"
    for stop_step in (1, 4):  # before the first save (nothing to resume), then after it
        with monkeypatch.context() as patch:
            interrupt_at(patch, stop_step)
            assert main(train_argv(data, run, *flags)) == 130
    assert "holds no checkpoint yet; starting the run from step 0" in (run / "train.log").read_text()
    assert main(train_argv(data, run, *flags)) == 0
    assert "resuming at step 3" in (run / "train.log").read_text()
    for name in ("model.safetensors", "optimizer.safetensors"):
        a, b = (load_file(tmp_path / folder / "checkpoint" / name) for folder in ("straight", "run"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_restart_before_the_first_save_says_so(tmp_path, data, monkeypatch):
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        interrupt_at(patch, stop_step=1)
        assert main(train_argv(data, run, "--max-steps", "3")) == 130
    assert (run / "train_config.json").is_file() and not (run / "checkpoint").exists()
    assert main(train_argv(data, run, "--max-steps", "3", "--resume")) == 0
    assert "holds no checkpoint yet; starting the run from step 0" in (run / "train.log").read_text()


def test_checkpoints_by_time_as_well_as_by_steps(tmp_path, data, monkeypatch):
    """With a save due every few minutes, a kill loses at most that much, however far apart --save-every is."""
    run = tmp_path / "run"
    flags = ["--max-steps", "6", "--save-every", "1000", "--save-every-minutes", "1e-9"]
    with monkeypatch.context() as patch:
        interrupt_at(patch, stop_step=2)
        assert main(train_argv(data, run, *flags)) == 130
    assert json.loads((run / "checkpoint/trainer_state.json").read_text())["step"] == 2
    log = (run / "train.log").read_text()
    assert "saved" in log and "at step 1" in log and "checkpoints every 1000 steps or 1e-09 minutes" in log


def test_sigkill_during_a_save_leaves_the_previous_checkpoint(tmp_path, data, monkeypatch):
    run = tmp_path / "run"
    flags = ["--max-steps", "4", "--save-every", "2"]
    with monkeypatch.context() as patch:
        interrupt_at(patch, stop_step=2)
        assert main(train_argv(data, run, *flags)) == 130  # checkpoint at step 2

    # Resume in a subprocess whose save at step 4 stops half-written (model and optimizer files, no trainer
    # state yet); kill it there.
    env = {**os.environ, PAUSE_ENV: "120", "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "stderr.txt", "w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "ossgpt", *train_argv(data, run, *flags, "--resume")],
                                   env=env, stderr=stderr)  # fmt: skip
        deadline = time.monotonic() + 120
        while not list(run.glob(".checkpoint.tmp-*/optimizer.safetensors")):
            assert process.poll() is None, (tmp_path / "stderr.txt").read_text()
            assert time.monotonic() < deadline, "the run never reached its save"
            time.sleep(0.05)
        process.kill()
        process.wait()

    assert list(run.glob(".checkpoint.tmp-*"))  # the half-written save is still there...
    assert json.loads((run / "checkpoint/trainer_state.json").read_text())["step"] == 2  # ...beside the old one
    from_pretrained(run / "checkpoint")
    assert main(train_argv(data, run, *flags, "--resume")) == 0
    assert json.loads((run / "checkpoint/trainer_state.json").read_text())["step"] == 4
    assert not list(run.glob(".checkpoint.*"))  # the next start tidied up


def test_a_kill_between_the_two_renames_is_repaired(tmp_path, data):
    """atomic_directory moves the old checkpoint aside, then renames the new one in: a kill in between leaves no
    checkpoint/, only the moved-aside one, which the next start puts back."""
    run = tmp_path / "run"
    assert main(train_argv(data, run, "--max-steps", "2")) == 0
    os.replace(run / "checkpoint", run / ".checkpoint.old-4242")
    (run / ".checkpoint.tmp-4243").mkdir()
    assert main(train_argv(data, run, "--max-steps", "3", "--resume")) == 0
    assert "resuming at step 2" in (run / "train.log").read_text()
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []


def corrupt_model(checkpoint):
    (checkpoint / "model.safetensors").write_bytes((checkpoint / "model.safetensors").read_bytes()[:1000])


def foreign_optimizer(checkpoint):
    save_file({"other.weight.exp_avg": torch.zeros(3)}, checkpoint / "optimizer.safetensors")


BAD_CHECKPOINTS = {
    "truncated weights": (corrupt_model, [], "model.safetensors"),
    "garbage trainer state": (lambda c: (c / "trainer_state.json").write_text("{oops"), [], "not valid JSON"),
    "foreign trainer state": (
        lambda c: (c / "trainer_state.json").write_text('{"step": 1}'),
        [],
        "not an ossgpt trainer state",
    ),  # fmt: skip
    "model only": (lambda c: (c / "trainer_state.json").unlink(), [], "not a training checkpoint"),
    "no optimizer state": (lambda c: (c / "optimizer.safetensors").unlink(), [], "has no optimizer.safetensors"),
    "foreign optimizer state": (foreign_optimizer, [], "does not belong to this model"),
    "another optimizer": (None, ["--optimizer", "adamw"], "or was trained with another --optimizer"),
    "another model": (None, ["--model-override", "hidden_size=64"], "holds a different model: hidden_size 32"),
}


@pytest.mark.parametrize("case", BAD_CHECKPOINTS)
def test_bad_checkpoint_on_resume_is_one_error_line(case, tmp_path, data, capsys):
    breaks, flags, message = BAD_CHECKPOINTS[case]
    run = tmp_path / "run"
    assert main(train_argv(data, run, "--max-steps", "1")) == 0
    if breaks:
        breaks(run / "checkpoint")
    capsys.readouterr()
    assert main(train_argv(data, run, "--max-steps", "2", "--resume", *flags)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert message in err
