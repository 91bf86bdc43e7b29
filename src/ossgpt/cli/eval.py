"""`ossgpt eval --checkpoint PATH FILE...`: loss, perplexity and bits per byte of a checkpoint on text files.

    ossgpt eval --checkpoint runs/demo unseen.txt --train-data runs/demo/data --plot plots/
    ossgpt eval --checkpoint runs/demo/checkpoint a.txt b.txt --json
    ossgpt eval --checkpoint runs/demo unseen.txt --context-extension 8 --seq-len 2048 --plot long/

Context extension: a model trained on windows of L tokens is evaluated on longer ones by setting YaRN scaling
(factor F over an original context of L) at load time, no retraining; `--no-yarn` keeps plain RoPE over the
longer windows, the control that shows what YaRN buys (compare the two loss_by_position.png).

Several files are scored as separate documents (see ossgpt.eval.metrics). Beside the model's bits per byte it
reports baselines on the same text (compressors, a unigram model of the training tokens; see
ossgpt.eval.baselines) and how evenly each MoE layer spreads the tokens over its experts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ossgpt.checkpoint.run_dir import TRAIN_CONFIG, resolve_checkpoint, run_record
from ossgpt.cli import arguments
from ossgpt.data.prepare import note_encoding, read_meta, read_text
from ossgpt.errors import UserError
from ossgpt.eval.baselines import compression_bits_per_byte, train_token_counts, unigram_bits_per_byte
from ossgpt.eval.metrics import DEFAULT_MAX_SEQ_LEN, EvalResult, TokenizedText, evaluate_tokens, tokenize_documents
from ossgpt.inference.loading import context_extension, load_model_and_tokenizer, trained_seq_len

BASELINE_LABELS = {"gzip": "gzip -9", "bzip2": "bzip2 -9", "xz": "xz -9", "unigram": "unigram"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "files",
        nargs="+",
        metavar="FILE",
        help="text files, each one document (files that are not UTF-8 are decoded as cp1252 or Latin-1, as by "
        "`ossgpt prepare`)",
    )
    arguments.add_checkpoint(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument(
        "--seq-len",
        type=int,
        metavar="N",
        help="window length in tokens (default: the length the run trained on, times F with --context-extension "
        f"F; for a bare model directory its context, at most {DEFAULT_MAX_SEQ_LEN})",
    )
    parser.add_argument("--batch-size", type=int, default=8, metavar="N", help="windows per forward pass (default: 8)")
    parser.add_argument(
        "--train-data",
        metavar="DATA_DIR",
        help=f"prepared data folder whose train.bin gives the unigram baseline's token counts (default: the data "
        f"folder recorded in the run directory's {TRAIN_CONFIG})",
    )
    parser.add_argument("--plot", metavar="DIR", help="write loss_by_position.png and expert_load.png into DIR")
    parser.add_argument("--no-baselines", action="store_true", help="skip the compressor and unigram baselines")
    parser.add_argument(
        "--context-extension",
        type=float,
        metavar="F",
        help="evaluate up to F times the trained context: YaRN with factor F over the run's training length",
    )
    parser.add_argument(
        "--no-yarn", action="store_true", help="with --context-extension: plain RoPE over the longer context (control)"
    )


def run(args: argparse.Namespace) -> int:
    documents = [read_document(Path(path)) for path in args.files]
    checkpoint = resolve_checkpoint(args.checkpoint)
    overrides = context_extension(checkpoint, args.context_extension, args.no_yarn)
    model, tokenizer = load_model_and_tokenizer(checkpoint, device=args.device, decoding=False, **overrides)
    text = tokenize_documents(tokenizer, documents)
    seq_len = args.seq_len or default_seq_len(checkpoint, args.context_extension)
    result = evaluate_tokens(model, text, seq_len, args.batch_size, progress=sys.stderr.isatty())
    baselines = None
    if not args.no_baselines:
        baselines = compression_bits_per_byte("".join(documents).encode("utf-8"))
        baselines["unigram"] = unigram_baseline(text, tokenizer, args.train_data, checkpoint)
    if args.plot:
        write_plots(result, Path(args.plot))

    if args.json:
        report = {"checkpoint": str(checkpoint), "files": args.files, **result.to_dict(), "baselines": baselines}
        print(json.dumps(report))
    else:
        print_report(result, baselines, checkpoint, tokenizer.spec, args.files)
    return 0


def default_seq_len(checkpoint: Path, factor: float | None) -> int | None:
    """Windows as long as the training sequences (a model is not expected to know positions it never saw),
    `factor` times longer with --context-extension; None (the model's context) when the length is unknown."""
    trained = trained_seq_len(checkpoint)
    return int((factor or 1) * trained) if trained else None


def read_document(path: Path) -> str:
    """A text file's text, decoded as `ossgpt prepare` decodes it; UserError if it is missing or blank."""
    if not path.exists():
        raise UserError(f"text file {path} does not exist; check the path")
    text, encoding = read_text(path)
    note_encoding(path, encoding)
    if not text.strip():
        raise UserError(f"text file {path} is empty; pass files that contain text")
    return text


def unigram_baseline(text: TokenizedText, tokenizer, train_data: str | None, checkpoint: Path) -> float | None:
    """Bits per byte of the unigram baseline, or None (with a note) when no training tokens can be found."""
    data_dir = Path(train_data) if train_data is not None else recorded_data_dir(checkpoint)
    if data_dir is None:
        print("note: unigram baseline skipped: no training data found; pass --train-data DATA_DIR", file=sys.stderr)
        return None
    train_bin = data_dir / "train.bin"
    if not train_bin.is_file():
        raise UserError(f"{data_dir} has no train.bin; pass the data folder `ossgpt prepare` wrote")
    spec = read_meta(data_dir)["tokenizer"] if (data_dir / "meta.json").is_file() else None
    if spec is not None and spec != tokenizer.spec:
        raise UserError(f"{data_dir} was prepared with tokenizer {spec}, but the model uses {tokenizer.spec}")
    counts = train_token_counts(train_bin, tokenizer.vocab_size)
    return unigram_bits_per_byte(text.text_tokens, text.n_bytes, counts)


def recorded_data_dir(checkpoint: Path) -> Path | None:
    """The data folder that trained this checkpoint, from RUN_DIR/train_config.json, if it still exists."""
    data = run_record(checkpoint).get("data")
    return Path(data) if isinstance(data, str) and (Path(data) / "train.bin").is_file() else None


def write_plots(result: EvalResult, directory: Path) -> None:
    from ossgpt.eval.plots import plot_expert_load, plot_loss_by_position  # matplotlib is slow to import

    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create plot folder {directory}: {err.strerror or err}") from err
    plot_loss_by_position(result, directory / "loss_by_position.png")
    plot_expert_load(result, directory / "expert_load.png")
    print(f"wrote {directory / 'loss_by_position.png'} and {directory / 'expert_load.png'}", file=sys.stderr)


def print_report(
    result: EvalResult, baselines: dict | None, checkpoint: Path, tokenizer_spec: str, files: list[str]
) -> None:
    print(f"checkpoint  {checkpoint} (tokenizer {tokenizer_spec})")
    print(f"text        {', '.join(files)} (windows of {result.seq_len} tokens)")
    print()
    print(f"  loss (nats/token)  {result.loss:10.4f}")
    print(f"  perplexity         {result.perplexity:10.2f}")
    print(f"  bits per byte      {result.bits_per_byte:10.4f}")
    print(f"  tokens             {result.n_tokens:10,}")
    print(f"  bytes              {result.n_bytes:10,}")

    if baselines is not None:
        print("\nbits per byte on the same text (lower is better)")
        print(f"  {'model':<10} {result.bits_per_byte:8.4f}")
        for name, label in BASELINE_LABELS.items():
            value = baselines[name]
            shown = f"{value:8.4f}" if value is not None else f"{'-':>8}  (no training data: pass --train-data)"
            print(f"  {label:<10} {shown}")

    n_experts = len(result.expert_load[0].counts)
    print(
        f"\nexpert load: share of routed tokens per expert (uniform {1 / n_experts:.3f}); "
        f"dropped 0 (routing is dropless)"
    )
    print(f"  {'layer':<6} {'CV':>6} {'min':>6} {'max':>6}")
    for layer, load in enumerate(result.expert_load):
        print(f"  {layer:<6} {load.cv:6.3f} {min(load.fractions):6.3f} {max(load.fractions):6.3f}")
