"""Smoke runs of the experiment scripts in bench/ (recipe, long context): they run end to end on tiny inputs.
Their real runs are the documented commands in docs/recipe.md; nothing here measures anything."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ossgpt.cli import main
from test_training import TINY, make_data

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def heldout(tmp_path):
    path = tmp_path / "heldout.txt"
    path.write_text("It was the best of times, it was the worst of times, it was the age of wisdom. " * 8)
    return path


def run_script(name: str, *args) -> str:
    result = subprocess.run([sys.executable, str(BENCH / name), *map(str, args)], capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.slow
def test_long_context_script(tmp_path, heldout):
    run, data = tmp_path / "run", make_data(tmp_path / "data")
    assert main(["train", "--data", str(data), "--out", str(run), *TINY, "--max-steps", "2"]) == 0
    tuned = tmp_path / "tuned"
    assert main(["train", "--data", str(data), "--out", str(tuned), *TINY, "--max-steps", "1", "--init-from", str(run),
                 "--context-extension", "2", "--seq-len", "64"]) == 0  # fmt: skip
    out = run_script("long_context.py", "--checkpoint", run, "--heldout", heldout, "--factors", "2",
                     "--finetuned", f"2x, YaRN, tuned={tuned}", "--plot", tmp_path / "lc.png")  # fmt: skip
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split(" | ")[0] for row in rows] == ["| trained length (32)", "| 2x, YaRN", "| 2x, plain RoPE",
                                                     "| 2x, YaRN, tuned"]  # fmt: skip
    assert [row.split(" | ")[1] for row in rows] == ["32", "64", "64", "64"]  # window lengths
    assert (tmp_path / "lc.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_recipe_script(tmp_path, heldout):
    data = make_data(tmp_path / "data", train_tokens=40_000)
    runs = tmp_path / "runs"
    out = run_script("recipe.py", "baseline", "--data", data, "--heldout", heldout, "--minutes", "0.01",
                     "--runs", runs)  # fmt: skip
    row = json.loads((runs / "results.jsonl").read_text())
    assert row["variant"] == "baseline" and row["steps"] >= 1 and row["tokens_seen"] == row["steps"] * 16 * 256
    assert 0 < row["heldout_bpb"] < 20 and 0 <= row["expert_load_cv"]
    assert "| baseline | `(defaults)` |" in out


def test_int8_rows_script():
    args = ("--vocab", "256", "--hidden", "64", "--rows", "1", "4", "--repeats", "1", "--cold")
    out = run_script("int8_rows.py", *args)
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split("|")[1].strip() for row in rows] == ["1", "4"]
    assert all(len(row.split("|")) == 9 for row in rows)  # rows + four kernels + ossgpt's two int8 linears
    assert "weight read from memory" in out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lm_head_script(dtype):
    out = run_script("lm_head.py", "--quick", "--dtype", dtype)
    assert f"hidden 64, {dtype}" in out
    parts = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    assert parts[0] == "part" and parts[1] == "gemm 256^3" and len(parts) == 4
    assert "linear_cross_entropy" in parts[3]


def test_quantize_accuracy_script(tmp_path, heldout):
    """On a model trained two steps (hidden 32: a multiple of 32, so W8A8 takes the native kernels where built)."""
    run, data = tmp_path / "run", make_data(tmp_path / "data")
    assert main(["train", "--data", str(data), "--out", str(run), *TINY, "--max-steps", "2"]) == 0
    out = run_script("quantize_accuracy.py", "--checkpoint", run, heldout, "--seq-len", "32", "--windows", "4")
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row[1].strip() for row in rows] == ["none", "int8", "int8-dynamic"]
    assert rows[0][3].strip() == "0.00000" and rows[0][4].strip() == "100.0%"  # float32 against itself
    assert all(0 < float(row[2]) < 20 and float(row[3]) >= 0 for row in rows)


def test_step_parts_script():
    out = run_script("step_parts.py", "--quick")
    parts = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    assert {"swiglu", "muon"} <= set(parts[1:])


def test_gpt_oss_20b_memory_table():
    """The paper tables of bench/gpt_oss_20b.py (its measuring runs need a 13.8 GB checkpoint: BENCHMARKS.md): decoding
    (weights, KV cache, total) and LoRA fine-tuning (frozen base, adapters' training state)."""
    out = run_script("gpt_oss_20b.py", "--memory-table")
    decoding, lora = out.split("LoRA fine-tuning")
    rows = [line for line in decoding.splitlines() if line.startswith("| gpt-oss")]
    assert len(rows) == 6 and all(line.count("GB") == 2 for line in rows)
    rows = [line for line in lora.splitlines() if line.startswith("| gpt-oss")]
    assert len(rows) == 2 and all(line.count("GB") == 2 for line in rows)


@pytest.mark.slow
def test_serve_script(tmp_path):
    """bench/serve.py --quick: `ossgpt serve` on tiny shapes in a subprocess, 1 to 16 streaming clients beside
    generate_batch, then 16 staggered, the table and the JSON (slow: two processes load torch and a model;
    ~20 CPU-seconds)."""
    pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'ossgpt[serve]')")
    out = run_script("serve.py", "--quick", "--json", tmp_path / "serve.json")
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| tiny")]
    assert [row[2].strip() for row in rows[:6]] == ["generate_batch, batch 8", "1", "4", "8", "16", "16 staggered"]
    assert all(("ok" in cell) != ("MISSED" in cell) for cell in rows[6][2:-1]) and len(rows) == 7
    tiny = json.loads((tmp_path / "serve.json").read_text())["shapes"]["tiny"]
    assert [level["requests"] for level in tiny["levels"].values()] == [1, 4, 8, 16, 16]
    assert tiny["prefill_bound_16_vs_1"] > 1  # 16 prompts' prefill costs more than one's
    assert all(level["tokens_per_s"] > 0 and level["ttft_p99_s"] >= level["ttft_p50_s"] > 0
               for level in tiny["levels"].values())  # fmt: skip
