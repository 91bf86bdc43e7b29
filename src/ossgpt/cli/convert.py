"""`ossgpt convert --from DIR --to DIR --format hf|ossgpt`: rewrite a checkpoint in another format.

    ossgpt convert --from gpt-oss-20b --to gpt-oss-20b-bf16 --format hf --dtype bfloat16
    ossgpt convert --from runs/demo --to exported --format hf --max-shard-size 2GB

Reads every format `from_pretrained` reads (ossgpt, Hugging Face plain or MXFP4, OpenAI's original layout), from a
model or a training run directory, and writes dense weights: MXFP4 experts are dequantized (exactly: gpt-oss's bf16
and FP4 values fit in bfloat16). The checkpoint's tokenizer.json comes along (a compact vocabulary's token table).
A LoRA fine-tune (`ossgpt sft`) is the model it fine-tuned, as everywhere else: its adapters are merged into its
base, as `ossgpt merge` does (which also re-packs experts in MXFP4 and reads a moved base).
The target appears in one rename once complete, so an interrupted conversion leaves nothing half-written.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ossgpt.checkpoint import save_pretrained
from ossgpt.checkpoint.adapted import is_adapted, load_whole_model, whole_model_directory
from ossgpt.checkpoint.pretrained import detect_format, parse_size
from ossgpt.checkpoint.run_dir import resolve_checkpoint
from ossgpt.devices import DTYPES
from ossgpt.errors import UserError
from ossgpt.tokenizer import TOKENIZER_FILE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="DIR",
        help="checkpoint to read: a model or training run directory (a LoRA run's adapters are merged in)",
    )
    parser.add_argument("--to", dest="target", required=True, metavar="DIR", help="directory to write")
    parser.add_argument(
        "--format",
        required=True,
        choices=["hf", "ossgpt"],
        help="hf: Hugging Face gpt-oss layout (transformers' GptOssForCausalLM loads it); ossgpt: ossgpt's own",
    )
    parser.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="float32",
        help="dtype of the written weights (default: float32; bfloat16 is lossless for the published gpt-oss)",
    )
    parser.add_argument(
        "--max-shard-size",
        default=None,
        metavar="SIZE",
        help="split the weights into files of at most SIZE (e.g. 5GB) with an index, as Hugging Face does",
    )
    parser.add_argument("--force", action="store_true", help="replace DIR given to --to if it exists")


def run(args: argparse.Namespace) -> int:
    source, target = resolve_checkpoint(args.source), Path(args.target)
    if target.exists() and not args.force:
        raise UserError(f"{target} already exists; pass --force to replace it")
    if target.resolve() in (source.resolve(), Path(args.source).resolve()):
        raise UserError("--to must differ from --from")
    try:
        shard_size = None if args.max_shard_size is None else parse_size(args.max_shard_size)
    except ValueError as err:
        raise UserError(str(err)) from None
    weights = whole_model_directory(source)
    info = detect_format(weights)
    model = load_whole_model(source, dtype=DTYPES[args.dtype])
    tokenizer = source / TOKENIZER_FILE
    save_pretrained(model, target, format=args.format, max_shard_size=shard_size,
                    tokenizer_file=tokenizer if tokenizer.is_file() else None)  # fmt: skip
    kind = info.format + (" with MXFP4 experts" if info.mxfp4 else "")
    if is_adapted(source):
        kind = f"LoRA adapters merged into their base {weights}, {kind}"
    print(
        f"converted {source} ({kind}) to {target} ({args.format}, {args.dtype}, {model.num_parameters():,} parameters)"
    )
    return 0
