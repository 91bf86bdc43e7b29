"""Long context: a model trained on short sequences, evaluated on windows F times longer, YaRN against plain RoPE.

    python bench/long_context.py --checkpoint runs/tiny --heldout ../shared/data/novels/sherlock.txt \
        --factors 4 8 --plot docs/long_context.png

For each factor F the held-out text is scored in windows of F x the training length twice: with YaRN set for
the longer context (`ossgpt eval --context-extension F`) and with plain RoPE (`--no-yarn`, the control). Prints
one markdown row per run (overall loss, bits per byte, mean loss inside and past the training length) and plots
the loss by position (means over log-spaced bins) with the training length marked.

`--finetuned NAME=RUN ...` adds runs fine-tuned from the checkpoint at a longer length (`ossgpt train
--init-from CHECKPOINT --seq-len L [--context-extension F]`), each scored on windows of the length it was tuned on:

    ossgpt train --data DATA --out runs/long-yarn --init-from runs/tiny --context-extension 4 --seq-len 1024 \
        --batch-size 4 --max-minutes 2
    python bench/long_context.py --checkpoint runs/tiny --heldout ... --factors 4 \
        --finetuned "4x, YaRN, fine-tuned=runs/long-yarn" "4x, plain RoPE, fine-tuned=runs/long-plain"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ossgpt.cli.eval import read_document
from ossgpt.errors import UserError
from ossgpt.eval.metrics import evaluate_tokens, tokenize_documents
from ossgpt.inference.loading import context_extension, load_model_and_tokenizer, resolve_checkpoint, trained_seq_len

BINS = 32  # log-spaced position bins per plot line (single positions are noisy: few windows at 8x)


def score(checkpoint: Path, documents: list[str], factor: float | None, no_yarn: bool, trained: int):
    """EvalResult over windows of factor x trained tokens (the training length when factor is None)."""
    model, tokenizer = load_model_and_tokenizer(
        checkpoint, decoding=False, **context_extension(checkpoint, factor, no_yarn)
    )
    text = tokenize_documents(tokenizer, documents)
    return evaluate_tokens(model, text, int((factor or 1) * trained), batch_size=4)


def summary(name: str, result, trained: int) -> str:
    loss = np.asarray(result.loss_by_position)
    past = f"{np.nanmean(loss[trained:]):.3f}" if len(loss) > trained else "-"
    return (f"| {name} | {result.seq_len} | {result.loss:.3f} | {result.bits_per_byte:.3f} | "
            f"{np.nanmean(loss[:trained]):.3f} | {past} |")  # fmt: skip


def main() -> None:
    try:
        run()
    except UserError as error:  # missing files, impossible factors, ...: one line, exit 2
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a training run directory (its train_config.json "
                        "gives the training length)")  # fmt: skip
    parser.add_argument("--heldout", nargs="+", required=True, help="text files never trained on")
    parser.add_argument("--factors", nargs="+", type=float, default=[4.0, 8.0])
    parser.add_argument(
        "--finetuned",
        nargs="*",
        default=[],
        metavar="NAME=RUN",
        help="runs fine-tuned from --checkpoint at a longer length, named for the table and plot",
    )
    parser.add_argument("--plot", default=None, help="PNG to write")
    args = parser.parse_args()
    finetuned = dict(item.rpartition("=")[::2] for item in args.finetuned)
    if any(not name or not run for name, run in finetuned.items()):
        raise UserError('--finetuned takes NAME=RUN items, e.g. "4x, YaRN, fine-tuned=runs/long-yarn"')
    checkpoint = resolve_checkpoint(args.checkpoint)
    trained = trained_seq_len(checkpoint)
    if trained is None:
        raise UserError(f"{args.checkpoint} is not a training run (no train_config.json); pass a run's folder")
    documents = [read_document(Path(p)) for p in args.heldout]

    runs = {f"trained length ({trained})": score(checkpoint, documents, None, False, trained)}
    for factor in args.factors:
        runs[f"{factor:g}x, YaRN"] = score(checkpoint, documents, factor, False, trained)
        runs[f"{factor:g}x, plain RoPE"] = score(checkpoint, documents, factor, True, trained)
    for name, run_dir in finetuned.items():
        tuned = resolve_checkpoint(run_dir)
        runs[name] = score(tuned, documents, None, False, trained_seq_len(tuned) or trained)

    print(f"| run | window | loss | bits/byte | mean loss, positions < {trained} | mean loss, positions >= {trained} |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, result in runs.items():
        print(summary(name, result, trained))

    if args.plot:
        fig = Figure(figsize=(8, 4.8))
        ax = fig.add_subplot()
        for name, result in runs.items():
            loss = np.asarray(result.loss_by_position)
            edges = np.unique(np.geomspace(1, len(loss) + 1, BINS).astype(int)) - 1  # position bins, log-spaced
            means = [np.nanmean(loss[a:b]) for a, b in zip(edges, edges[1:])]
            ax.plot((edges[:-1] + edges[1:]) / 2, means, lw=1.2, marker=".", label=name)
        ax.axvline(trained, color="gray", ls="--", lw=1)
        ax.text(trained, ax.get_ylim()[1], " training length", va="top", color="gray", fontsize=8)
        ax.set_xlabel("position in the window (tokens; mean over log-spaced bins)")
        ax.set_ylabel("loss (nats / token)")
        ax.set_title("held-out loss by position: YaRN vs plain RoPE past the training length")
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        FigureCanvasAgg(fig).print_png(str(args.plot))
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
