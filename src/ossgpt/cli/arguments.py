"""The flags several subcommands share, defined once: which checkpoint and how to load it, and how to sample.

add_loading(parser)        --checkpoint, --device, --dtype, --mxfp4, --quantize, --vocab-file
load(args)                 -> (model, tokenizer) as those flags say
add_sampling(parser, ...)  --temperature, --top-k, --top-p, --min-p, --repetition-penalty, --seed
sampling(args)             -> the Sampler keywords those flags give (UserError for a value out of range)
"""

from __future__ import annotations

import argparse
import sys
import time

from ossgpt.devices import DTYPES, resolve_device, resolve_dtype
from ossgpt.errors import UserError
from ossgpt.inference.loading import QUANTIZE_HELP, QUANTIZE_MODES, describe_weights, load_model_and_tokenizer
from ossgpt.inference.sampling import Sampler
from ossgpt.quant.int8 import Int8Linear
from ossgpt.quant.mxfp4 import has_mxfp4_experts

CHECKPOINT_HELP = (
    "a model directory (ossgpt, Hugging Face, MXFP4 or OpenAI's original layout) or a training run directory "
    "(holding checkpoint/)"
)


def add_checkpoint(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="PATH", help=CHECKPOINT_HELP)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto, cuda if available)")


def add_loading(parser: argparse.ArgumentParser) -> None:
    """--checkpoint and --device, and how the weights are held in memory."""
    add_checkpoint(parser)
    parser.add_argument(
        "--dtype",
        choices=["auto", *DTYPES],
        default="auto",
        help="weights dtype (default: auto, bfloat16 on a GPU that supports it, else float32)",
    )
    parser.add_argument(
        "--mxfp4",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep a checkpoint's MXFP4 experts packed in memory (4.25 bits per weight) and multiply by them "
        "packed, or (--no-mxfp4) dequantize them at load (default: packed on the CPU)",
    )
    parser.add_argument("--quantize", choices=QUANTIZE_MODES, default="auto", help=QUANTIZE_HELP)
    parser.add_argument(
        "--vocab-file",
        default=None,
        metavar="PATH",
        help="the tokenizer's .tiktoken ranks file (o200k_base's for gpt-oss), if tiktoken's cache "
        "lacks it and it cannot be downloaded",
    )


def load(args: argparse.Namespace):
    """(model, tokenizer) of the flags of `add_loading`; says on stderr how the weights are held."""
    device = resolve_device(args.device)
    start = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(
        args.checkpoint,
        device=device,
        dtype=DTYPES[resolve_dtype(args.dtype, device)],
        quantization=args.quantize,
        keep_mxfp4=args.mxfp4,
        vocab_file=args.vocab_file,
    )
    if has_mxfp4_experts(model) or isinstance(model.lm_head, Int8Linear):  # say what the automatic choices were
        print(f"loaded in {time.perf_counter() - start:.1f} s: {describe_weights(model)}", file=sys.stderr)
    return model, tokenizer


def add_sampling(parser: argparse.ArgumentParser, temperature: float, top_k: int | None) -> None:
    """The sampling flags, with this subcommand's default temperature and top-k."""
    parser.add_argument(
        "--temperature",
        type=float,
        default=temperature,
        metavar="T",
        help=f"divide the logits by T before sampling: lower is more conservative, 0 is greedy "
        f"(default: {temperature})",
    )
    parser.add_argument(
        "--top-k",
        type=int,
        default=top_k,
        metavar="K",
        help=f"sample among the K most likely tokens (default: {top_k or 'off'})",
    )
    parser.add_argument(
        "--top-p",
        type=float,
        default=None,
        metavar="P",
        help="sample among the most likely tokens that together hold probability P, in (0, 1] (default: off)",
    )
    parser.add_argument(
        "--min-p",
        type=float,
        default=None,
        metavar="P",
        help="drop tokens less likely than P times the most likely one (default: off)",
    )
    parser.add_argument(
        "--repetition-penalty",
        type=float,
        default=None,
        metavar="R",
        help="> 1 discourages tokens already in the text (default: off)",
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed, for a repeatable sample")


def sampling(args: argparse.Namespace, greedy: bool = False) -> dict:
    """The Sampler keywords of the flags of `add_sampling`, checked; greedy when asked to be or at temperature 0."""
    options = dict(
        do_sample=not greedy and args.temperature > 0,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )
    try:
        Sampler(**options)
    except ValueError as err:
        raise UserError(str(err)) from None
    return options
