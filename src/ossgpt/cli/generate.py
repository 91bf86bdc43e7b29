"""`ossgpt generate --checkpoint PATH --prompt TEXT`: continue a prompt with a trained model.

    ossgpt generate --checkpoint runs/demo --prompt "It was a dark and stormy night" --seed 0
    ossgpt generate --checkpoint runs/demo --prompt "To be" --greedy --max-new-tokens 20

Prints the prompt and its continuation, which stops at <|endoftext|> or after --max-new-tokens tokens. On a
terminal the continuation appears token by token. As in training and evaluation, the prompt is preceded by
<|endoftext|>: it is the beginning of a document.
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch

from ossgpt.errors import UserError
from ossgpt.inference.generate import stream
from ossgpt.inference.loading import QUANTIZE_HELP, QUANTIZE_MODES, load_model_and_tokenizer
from ossgpt.inference.sampling import check_sampling_args
from ossgpt.tokenizer import TextStream


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="PATH",
        help="a model directory (config.json + model.safetensors) or a training run directory (holding checkpoint/)",
    )
    parser.add_argument("--prompt", required=True, metavar="TEXT", help="the text to continue")
    parser.add_argument(
        "--max-new-tokens", type=int, default=200, metavar="N", help="tokens to generate at most (default: 200)"
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.8,
        metavar="T",
        help="divide the logits by T before sampling: lower is more conservative, 0 is greedy (default: 0.8)",
    )
    parser.add_argument(
        "--top-k", type=int, default=200, metavar="K", help="sample among the K most likely tokens (default: 200)"
    )
    parser.add_argument(
        "--top-p",
        type=float,
        default=None,
        metavar="P",
        help="sample among the most likely tokens that together hold probability P, in (0, 1] (default: off)",
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed, for a repeatable sample")
    parser.add_argument("--greedy", action="store_true", help="always take the most likely token (no sampling)")
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default=None, help="where to run (default: cuda if available, else cpu)"
    )
    parser.add_argument("--quantize", choices=QUANTIZE_MODES, default=None, help=QUANTIZE_HELP)


def run(args: argparse.Namespace) -> int:
    try:
        check_sampling_args(args.temperature, args.top_k, args.top_p)
    except ValueError as err:
        raise UserError(str(err)) from None
    if args.max_new_tokens < 1:
        raise UserError(f"max new tokens must be at least 1, got {args.max_new_tokens}")
    model, tokenizer = load_model_and_tokenizer(args.checkpoint, device=args.device, quantization=args.quantize)

    prompt_ids = [tokenizer.eot_token_id, *tokenizer.encode(args.prompt)]
    context = model.config.max_position_embeddings
    if len(prompt_ids) >= context:
        raise UserError(
            f"the prompt is {len(prompt_ids)} tokens (with the leading <|endoftext|>), which leaves no room in the "
            f"model's context of {context} tokens; shorten the prompt"
        )
    max_new_tokens = min(args.max_new_tokens, context - len(prompt_ids))
    if max_new_tokens < args.max_new_tokens:
        print(f"note: generating at most {max_new_tokens} tokens, the room left in the context", file=sys.stderr)
    stop_ids = sorted({tokenizer.eot_token_id, model.config.eos_token_id} - {None})
    generator = None if args.seed is None else torch.Generator(model.device).manual_seed(args.seed)

    tokens = stream(
        model,
        torch.tensor([prompt_ids], device=model.device),
        max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        do_sample=not args.greedy,
        eos_token_id=stop_ids,
        generator=generator,
    )
    new_ids = itertools.takewhile(lambda t: t not in stop_ids, (int(token[0]) for token in tokens))
    pieces = TextStream(tokenizer).add_all(new_ids)
    if sys.stdout.isatty():  # show each piece as soon as it exists
        print(args.prompt, end="", flush=True)
        for piece in pieces:
            print(piece, end="", flush=True)
        print()
    else:
        print(args.prompt + "".join(pieces))
    return 0
