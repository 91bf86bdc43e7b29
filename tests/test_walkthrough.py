"""examples/walkthrough.py, the executable tour of the package, runs end to end on a tiny budget."""

import os
import random
import subprocess
import sys
from pathlib import Path

from test_training import WORDS

ROOT = Path(__file__).resolve().parents[1]
CL100K_CACHE = ROOT.parent / "shared" / "tokenizers" / "tiktoken_cache"


def test_walkthrough_runs_in_data_flow_order(tmp_path):
    """With the tiny preset's own compact cl100k tokenizer when its vocabulary is here, else bytes."""
    text = tmp_path / "text.txt"
    rng = random.Random(0)
    text.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(600)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    flags = []
    if CL100K_CACHE.is_dir():
        env["TIKTOKEN_CACHE_DIR"] = str(CL100K_CACHE)
    else:
        flags = ["--tokenizer", "bytes"]
    command = [sys.executable, str(ROOT / "examples" / "walkthrough.py"), "--text", str(text), "--out",
               str(tmp_path / "out"), "--steps", "3", "--batch-size", "2", "--seq-len", "32", *flags]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [line.split(".")[0] for line in result.stdout.splitlines() if line[:1].isdigit()]
    assert steps == ["1", "2", "3", "4", "5", "5", "6", "7"]  # every stage, in order (step 1 and the last step)
    assert (tmp_path / "out" / "model" / "model.safetensors").is_file()
