"""`ossgpt sft --checkpoint BASE --data FILE.jsonl --out RUN_DIR`: fine-tune a model on conversations, to chat.

    ossgpt sft --checkpoint runs/demo --data chats.jsonl --out runs/chat            # LoRA, rank 8, alpha 16
    ossgpt sft --checkpoint runs/demo --data chats.jsonl --out runs/chat --lora-tokens none  # no embedding rows
    ossgpt sft --checkpoint gpt-oss-20b --data chats.jsonl --out runs/20b --lora-rank 16 --lora-alpha 32 \\
        --lora-targets q_proj,k_proj,v_proj,o_proj,gate_up_proj,down_proj,router
    ossgpt sft --checkpoint runs/demo --data chats.jsonl --out runs/chat-full --full --learning-rate 1e-4
    ossgpt sft --checkpoint runs/demo --data chats.jsonl --out runs/chat --resume    # continue it after a stop
    ossgpt sft --checkpoint runs/demo --show chats.jsonl | less                     # what the model is taught
    ossgpt chat --checkpoint runs/chat                  # a LoRA run loads as its base with the adapters
    ossgpt merge --checkpoint runs/chat --out chat-model --format hf

LoRA trains the embedding rows of Harmony's special tokens beside the adapters (--lora-tokens harmony, the
default; ossgpt.lora.tokens): a base pretrained on plain text never saw them.

Every flag but --show is a field of SFTConfig (ossgpt.training.sft), generated from it as `ossgpt train`'s flags
are from TrainConfig. --show prints each conversation of a file as training renders it, the supervised tokens
marked (green on a terminal, else in [[ ]]), and trains nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from ossgpt.chat.conversation import show_supervised
from ossgpt.cli.train import add_config_arguments
from ossgpt.errors import UserError
from ossgpt.kernels.loss import IGNORE_INDEX
from ossgpt.training.sft import PRETRAINING_ONLY, SFTConfig, base_model, chat_format, sft
from ossgpt.training.sft_data import read_examples

REQUIRED = ("checkpoint", "data", "out")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--show", metavar="FILE.jsonl", default=None,
        help="print each conversation of FILE as training renders it in --checkpoint's tokenizer, the supervised "
        "tokens marked, and exit",
    )  # fmt: skip
    add_config_arguments(parser, SFTConfig, skip=PRETRAINING_ONLY, presets=False, required=False)


def run(args: argparse.Namespace) -> int:
    names = {f.name for f in dataclasses.fields(SFTConfig)}
    given = {name: value for name, value in vars(args).items() if name in names}
    if args.show is not None:
        if not given.get("checkpoint"):
            raise UserError("--show needs --checkpoint: the model whose tokenizer renders the conversations")
        show(args.show, given["checkpoint"], given.get("vocab_file") or None)
        return 0
    missing = [f"--{name}" for name in REQUIRED if not given.get(name)]
    if missing:
        raise UserError(
            f"{', '.join(missing)} required: the base model (--checkpoint), the conversations (--data FILE.jsonl) "
            "and the run folder (--out); or --show FILE.jsonl to preview a file"
        )
    sft(SFTConfig.create(**given))
    return 0


def show(path: str, checkpoint: str, vocab_file: str | None) -> None:
    """Print every conversation of `path` with its supervised tokens marked."""
    _, harmony = chat_format(base_model(checkpoint), vocab_file)
    color = sys.stdout.isatty()
    for example in read_examples(path, harmony):
        print(f"--- {path}, line {example.line}: {len(example.tokens)} tokens, {example.targets} supervised")
        mask = (example.labels != IGNORE_INDEX).tolist()
        print(show_supervised(harmony, example.tokens.tolist(), mask, color=color), end="")
