"""Data parallelism: two CPU processes (gloo) under torchrun, with DDP and with FSDP2, take the same steps as one
process with the same global batch, and only rank 0 writes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from ossgpt.cli import main
from test_training import TINY, make_data, read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")

# float32: the runs must agree to float32 rounding, and they sum gradients in different orders (--dtype auto is
# bfloat16 on a CPU with native bfloat16 matmuls, where products of different splits round differently).
FLAGS = [*TINY, "--max-steps", "3", "--grad-accum-steps", "2", "--log-every", "1", "--eval-every", "3",
         "--dtype", "float32"]  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(data folder, run folder of one process) shared by the tests of this module."""
    root = tmp_path_factory.mktemp("distributed")
    data = make_data(root / "data")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (module fixtures run before the autouse one)
    assert main(["train", "--data", str(data), "--out", str(root / "single"), *FLAGS]) == 0
    torch.set_num_threads(threads)
    return data, root / "single"


def torchrun(*args: str, cwd=None) -> subprocess.CompletedProcess:
    """Two processes on this machine; --standalone picks a free port for their rendezvous."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(mode, reference, tmp_path):
    data, single = reference
    run = tmp_path / mode
    result = torchrun("-m", "ossgpt", "train", "--data", str(data), "--out", str(run), *FLAGS, "--distributed", mode)
    check_same_run(result, run, single, mode)


def test_muon_on_sharded_matrices_matches_one_process(reference, tmp_path):
    """FSDP2 shards each matrix over the processes; Muon must orthogonalise the whole matrix, not each shard."""
    data, _ = reference
    single, run = tmp_path / "single", tmp_path / "fsdp"
    assert main(["train", "--data", str(data), "--out", str(single), *FLAGS, "--optimizer", "muon"]) == 0
    result = torchrun("-m", "ossgpt", "train", "--data", str(data), "--out", str(run), *FLAGS, "--optimizer", "muon",
                      "--distributed", "fsdp")  # fmt: skip
    check_same_run(result, run, single, "fsdp")


def check_same_run(result: subprocess.CompletedProcess, run, single, mode: str) -> None:
    """The two-process run `run` took the steps of the one-process run `single`, and only rank 0 wrote."""
    assert result.returncode == 0, result.stderr[-3000:]

    (steps, evals), (ref_steps, ref_evals) = read_metrics(run), read_metrics(single)
    assert [r["step"] for r in steps] == [1, 2, 3] and len(evals) == 1  # one writer: no repeated rows
    for row, ref in zip(steps, ref_steps):
        for key in ("loss", "lm_loss", "aux_loss", "grad_norm", "lr"):
            assert row[key] == pytest.approx(ref[key], rel=1e-5), key
        assert row["tokens"] == ref["tokens"]
        assert row["expert_load"] == ref["expert_load"]  # sums of integer counts: exact
    assert evals[0]["val_loss"] == pytest.approx(ref_evals[0]["val_loss"], rel=1e-5)
    weights, ref_weights = (
        load_file(run / "checkpoint/model.safetensors"),
        load_file(single / "checkpoint/model.safetensors"),
    )
    assert weights.keys() == ref_weights.keys()
    assert all((weights[k] - ref_weights[k]).abs().max() < 1e-5 for k in weights)
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in single.iterdir())
    log = (run / "train.log").read_text()
    assert log.count("saved ") == 1 and f"2 process(es) ({mode})" in log
