"""`ossgpt prepare INPUT... --out DATA_DIR`: tokenize text files into train/val token files.

    ossgpt prepare novels/ --out data/novels                       # for the default preset, tiny
    ossgpt prepare novels/ --out data/novels-mini --preset mini    # in the mini preset's tokenizer
    ossgpt prepare --source shakespeare --out data/shakespeare --tokenizer bytes

See ossgpt.data.prepare for what DATA_DIR holds.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ossgpt.data.download import SOURCES, fetch_source
from ossgpt.data.prepare import prepare
from ossgpt.errors import UserError
from ossgpt.presets import DEFAULT_PRESET, PRESETS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "inputs",
        nargs="*",
        metavar="INPUT",
        help="text files or folders (searched recursively, hidden files skipped); each file is one document",
    )
    parser.add_argument(
        "--out",
        required=True,
        metavar="DATA_DIR",
        help="folder to write train.bin, val.bin, meta.json and tokenizer.json into",
    )
    parser.add_argument(
        "--preset",
        default=DEFAULT_PRESET,
        choices=list(PRESETS),
        help=f"tokenize for this preset's model: with its tokenizer, unless --tokenizer says otherwise (default: "
        f"{DEFAULT_PRESET}, `ossgpt train`'s default too; "
        + ", ".join(f"{name}: {preset.model['tokenizer']}" for name, preset in PRESETS.items())
        + ")",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        metavar="SPEC",
        help="cl100k_base, o200k_harmony, bytes, or BASE:K for a compact vocabulary: the K most frequent BASE tokens "
        "of the training text plus byte fallback, e.g. cl100k_base:8192 (default: the --preset's)",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.05,
        metavar="F",
        help="share of each document's tokens, taken from its end, held out for validation; in [0, 0.5) "
        "(default: 0.05)",
    )
    parser.add_argument(
        "--force", action="store_true", help="replace DATA_DIR if it exists (once the new one is complete)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="tokenizing processes (default: one per CPU core; used with 4 or more files)",
    )
    parser.add_argument(
        "--vocab-file",
        default=None,
        metavar="PATH",
        help="a .tiktoken BPE ranks file (o200k_base's for o200k_harmony) to use instead of tiktoken's cache or "
        "download; needed offline unless TIKTOKEN_CACHE_DIR holds tiktoken's cached file",
    )
    parser.add_argument(
        "--source",
        choices=SOURCES,
        default=None,
        help="also download a public corpus (needs internet) into DATA_DIR/../raw and prepare it; INPUT may then "
        "be empty",
    )


def run(args: argparse.Namespace) -> int:
    inputs = list(args.inputs)
    if args.source:
        inputs.append(fetch_source(args.source, Path(args.out).resolve().parent / "raw"))
    if not inputs:
        raise UserError("no INPUT given; pass text files or folders, or --source shakespeare|openwebtext")
    meta = prepare(
        inputs,
        args.out,
        tokenizer=args.tokenizer or PRESETS[args.preset].model["tokenizer"],
        val_fraction=args.val_fraction,
        force=args.force,
        workers=args.workers,
        vocab_file=args.vocab_file,
    )
    total_bytes = meta["train_bytes"] + meta["val_bytes"]
    total_tokens = meta["train_tokens"] + meta["val_tokens"]
    print(
        f"prepared {meta['files']} file(s) into {args.out}: tokenizer {meta['tokenizer']}, vocab {meta['vocab_size']:,}"
    )
    print(f"  train: {meta['train_tokens']:,} tokens from {meta['train_bytes']:,} bytes")
    print(f"  val:   {meta['val_tokens']:,} tokens from {meta['val_bytes']:,} bytes")
    print(f"  {total_bytes / total_tokens:.2f} bytes/token (tokens include one <|endoftext|> per document part)")
    return 0
