"""`ossgpt convert --from DIR --to DIR --format hf|ossgpt`: rewrite a checkpoint in another format.

    ossgpt convert --from gpt-oss-20b --to gpt-oss-20b-bf16 --format hf --dtype bfloat16
    ossgpt convert --from runs/demo/checkpoint --to exported --format hf --max-shard-size 2GB

Reads every format `from_pretrained` reads (ossgpt, Hugging Face plain or MXFP4, OpenAI's original layout) and
writes dense weights: MXFP4 experts are dequantized (exactly: gpt-oss's bf16 and FP4 values fit in bfloat16).
The target appears in one rename once complete, so an interrupted conversion leaves nothing half-written.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ossgpt.checkpoint import from_pretrained, save_pretrained
from ossgpt.checkpoint.pretrained import detect_format, parse_size
from ossgpt.devices import DTYPES
from ossgpt.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="source", required=True, metavar="DIR", help="checkpoint directory to read")
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
    source, target = Path(args.source), Path(args.target)
    if target.exists() and not args.force:
        raise UserError(f"{target} already exists; pass --force to replace it")
    if target.resolve() == source.resolve():
        raise UserError("--to must differ from --from")
    try:
        shard_size = None if args.max_shard_size is None else parse_size(args.max_shard_size)
    except ValueError as err:
        raise UserError(str(err)) from None
    info = detect_format(source)
    model = from_pretrained(source, dtype=DTYPES[args.dtype])
    save_pretrained(model, target, format=args.format, max_shard_size=shard_size)
    kind = info.format + (" with MXFP4 experts" if info.mxfp4 else "")
    print(
        f"converted {source} ({kind}) to {target} ({args.format}, {args.dtype}, {model.num_parameters():,} parameters)"
    )
    return 0
