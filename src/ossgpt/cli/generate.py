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

from ossgpt.cli import arguments
from ossgpt.errors import UserError
from ossgpt.inference.generate import stream
from ossgpt.tokenizer import TextStream


def add_arguments(parser: argparse.ArgumentParser) -> None:
    arguments.add_loading(parser)
    parser.add_argument("--prompt", required=True, metavar="TEXT", help="the text to continue")
    parser.add_argument(
        "--max-new-tokens", type=int, default=200, metavar="N", help="tokens to generate at most (default: 200)"
    )
    arguments.add_sampling(parser, temperature=0.8, top_k=200)
    parser.add_argument("--greedy", action="store_true", help="always take the most likely token (no sampling)")


def run(args: argparse.Namespace) -> int:
    sampling = arguments.sampling(args, greedy=args.greedy)
    if args.max_new_tokens < 1:
        raise UserError(f"max new tokens must be at least 1, got {args.max_new_tokens}")
    model, tokenizer = arguments.load(args)

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
    prompt = torch.tensor([prompt_ids], device=model.device)
    tokens = stream(model, prompt, max_new_tokens, stop_ids, **sampling)
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
