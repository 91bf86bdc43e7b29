"""`ossgpt` command line: one entry point, one module per subcommand.

Each subcommand module defines `add_arguments(parser)` and `run(args) -> int`. Modules are imported only
when their subcommand runs, so `ossgpt --help` stays fast and a subcommand's heavy imports cost the others
nothing.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ossgpt.errors import UserError

SUBCOMMANDS = {
    "prepare": "tokenize text files into train/val token shards",
    "train": "train a model (one process, or many under torchrun)",
    "sft": "fine-tune a model on conversations (JSONL) to chat in the Harmony format: LoRA or every weight",
    "merge": "fold a LoRA fine-tune's adapters into its base and write the model (ossgpt or Hugging Face)",
    "eval": "loss, perplexity and bits per byte of a checkpoint on text files",
    "generate": "continue a prompt with a trained checkpoint",
    "chat": "chat with a checkpoint in the terminal (Harmony format for gpt-oss models)",
    "serve": "serve a checkpoint over an OpenAI-compatible HTTP API, with a web chat page",
    "convert": "rewrite a checkpoint (ossgpt, Hugging Face, MXFP4, OpenAI original) as ossgpt or Hugging Face",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ossgpt", description="GPT-OSS from scratch: prepare, train, evaluate, generate."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or only == name:
            importlib.import_module(f"ossgpt.cli.{name.replace('-', '_')}").add_arguments(sub_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if a in SUBCOMMANDS), None)
    args = build_parser(only=command).parse_args(argv)
    module = importlib.import_module(f"ossgpt.cli.{args.command.replace('-', '_')}")
    try:
        return int(module.run(args) or 0)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout went away (`ossgpt eval ... | head`): stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the final flush at exit cannot fail
        return 141
