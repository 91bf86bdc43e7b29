"""Recipe experiments: train the tiny preset under a time budget with one change at a time, score held-out text.

    python bench/recipe.py --data runs/recipe/data --heldout ../shared/data/novels/sherlock.txt \
        --minutes 8 baseline lr-6e-3 batch-8

Each variant is `ossgpt train --preset tiny --max-minutes M` plus its flags (VARIANTS below; --max-steps is set
out of reach, so that the time budget alone ends the run and its learning-rate decay), then
`ossgpt eval --json` on the held-out files. One row per variant is appended to RUNS/results.jsonl (held-out loss
and bits per byte, tokens seen, minutes, mean expert-load coefficient of variation) and the table of every row
so far is printed as markdown: docs/recipe.md holds the table of the runs that chose the defaults.
Run the variants one after another on an otherwise idle machine: a budget in minutes measures throughput too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

# name -> extra `ossgpt train` flags; "baseline" is the preset's defaults.
VARIANTS: dict[str, list[str]] = {
    "baseline": [],
    "lr-1.5e-3": ["--learning-rate", "1.5e-3"],
    "lr-6e-3": ["--learning-rate", "6e-3"],
    "batch-8": ["--batch-size", "8"],
    "batch-32": ["--batch-size", "32"],
    "seq-512": ["--seq-len", "512", "--batch-size", "8"],
    "wd-0": ["--weight-decay", "0"],
    "wd-0.3": ["--weight-decay", "0.3"],
    "wd-0.6": ["--weight-decay", "0.6"],
    "min-lr-0": ["--min-lr", "0"],
    "ns-3": ["--muon-ns-steps", "3"],
    "full-attention": ["--model-override", "layer_types=full_attention,full_attention,full_attention,full_attention"],
    "decay-to-0": ["--min-lr", "0", "--warmup-steps", "20"],
    "d-384": ["--model-override", "hidden_size=384", "--model-override", "num_attention_heads=6",
              "--model-override", "num_key_value_heads=3"],
    "layers-6": ["--model-override", "num_hidden_layers=6"],
    "layers-3": ["--model-override", "num_hidden_layers=3"],
    "experts-8": ["--model-override", "num_local_experts=8"],
    "top-1": ["--model-override", "num_experts_per_tok=1"],
    "no-balance": ["--model-override", "router_aux_loss_coef=0"],
    "muon": ["--optimizer", "muon"],
    "muon-lr-6e-3": ["--optimizer", "muon", "--learning-rate", "6e-3"],
    "muon-batch-32": ["--optimizer", "muon", "--batch-size", "32"],
    "muon-lr-1.2e-2": ["--optimizer", "muon", "--learning-rate", "1.2e-2"],
    "muon-lr-6e-3-untied": ["--optimizer", "muon", "--learning-rate", "6e-3", "--model-override",
                            "tie_word_embeddings=false"],
    "muon-lr-6e-3-warmup-20": ["--optimizer", "muon", "--learning-rate", "6e-3", "--warmup-steps", "20"],
}  # fmt: skip


def run_variant(name: str, args: argparse.Namespace) -> dict:
    label = f"{name} ({args.tag})" if args.tag else name
    out = Path(args.runs) / (f"{name}_{args.tag}" if args.tag else name)
    # tiny's shape on the data's vocabulary, whichever it is (--tag says when it is not tiny's own)
    tokenizer = json.loads((Path(args.data) / "meta.json").read_text())["tokenizer"]
    train = [sys.executable, "-m", "ossgpt", "train", "--data", args.data, "--out", str(out), "--preset", "tiny",
             "--model-override", f"tokenizer={tokenizer}", "--max-minutes", str(args.minutes), "--max-steps",
             "1000000", "--force", *VARIANTS[name]]  # fmt: skip
    if not args.score_only:
        subprocess.run(train, check=True, stdout=subprocess.DEVNULL)
    evaluate = [sys.executable, "-m", "ossgpt", "eval", "--checkpoint", str(out), *args.heldout, "--json"]
    report = json.loads(subprocess.run(evaluate, check=True, stdout=subprocess.PIPE, text=True).stdout)
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    return {
        "variant": label,
        "flags": " ".join(VARIANTS[name]),
        "data": args.data,
        "heldout_loss": report["loss"],
        "heldout_bpb": report["bits_per_byte"],
        "tokens_seen": state["tokens"],
        "steps": state["step"],
        "minutes": state["seconds"] / 60,
        "expert_load_cv": statistics.mean(layer["cv"] for layer in report["expert_load"]),
        "bzip2_bpb": report["baselines"]["bzip2"],
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| variant | flags | held-out bits/byte | loss | tokens seen | steps | minutes | expert-load CV |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | `{r['flags'] or '(defaults)'}` | {r['heldout_bpb']:.3f} | {r['heldout_loss']:.3f} | "
            f"{r['tokens_seen']:,} | {r['steps']} | {r['minutes']:.1f} | {r['expert_load_cv']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("variants", nargs="+", choices=sorted(VARIANTS), metavar="VARIANT")
    parser.add_argument("--data", required=True, help="prepared data folder (ossgpt prepare --out DATA_DIR)")
    parser.add_argument("--heldout", nargs="+", required=True, help="text files never trained on")
    parser.add_argument("--minutes", type=float, default=8.0, help="--max-minutes of every run")
    parser.add_argument("--runs", default="runs/recipe", help="folder of the runs and results.jsonl")
    parser.add_argument(
        "--tag", default="", help="a label added to the rows' names (other data, other defaults), e.g. --tag vocab-16k"
    )
    parser.add_argument("--score-only", action="store_true", help="do not train: score the variants' existing runs")
    args = parser.parse_args()
    results = Path(args.runs) / "results.jsonl"
    results.parent.mkdir(parents=True, exist_ok=True)
    for name in args.variants:
        try:
            row = run_variant(name, args)
        except subprocess.CalledProcessError as failed:  # its own one-line error is on stderr already
            command = " ".join(failed.cmd[2:4])
            raise SystemExit(f"error: variant {name}: `{command} ...` exited with {failed.returncode}") from None
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{name}: {row['heldout_bpb']:.3f} bits/byte", flush=True)
    print(table([json.loads(line) for line in results.read_text().splitlines()]))


if __name__ == "__main__":
    main()
