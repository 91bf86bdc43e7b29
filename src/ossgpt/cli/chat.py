"""`ossgpt chat --checkpoint DIR`: talk with a model in the terminal.

    ossgpt chat --checkpoint gpt-oss-20b --reasoning-effort low --show-reasoning
    ossgpt chat --checkpoint runs/demo --temperature 0.8 --top-p 0.95

gpt-oss checkpoints (tokenizer o200k_harmony) chat in the Harmony format: the reply streams as it is generated;
its chain of thought (the analysis channel) is hidden unless --show-reasoning shows it, dimmed. Models whose
tokenizer lacks the Harmony tokens (the small cl100k models ossgpt trains) get a plain "User: / Assistant:"
transcript instead. The KV cache is kept across turns: each turn runs the model on the new tokens only.

Ctrl-C stops a reply and returns to the prompt; Ctrl-C or Ctrl-D at the prompt quits.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from contextlib import closing

import torch

from ossgpt.chat.session import HarmonyChat, open_chat
from ossgpt.devices import DTYPES, resolve_device, resolve_dtype
from ossgpt.errors import UserError
from ossgpt.inference.generate import ContextFullError
from ossgpt.inference.loading import QUANTIZE_HELP, QUANTIZE_MODES, load_model_and_tokenizer
from ossgpt.inference.sampling import Sampler

PROMPT = ">>> "
DIM, RESET = "\033[2m", "\033[0m"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="PATH",
        help="a model directory (ossgpt, Hugging Face, MXFP4 or OpenAI original layout) or a training run directory",
    )
    parser.add_argument("--system", default=None, metavar="TEXT", help="instructions for the model (system prompt)")
    parser.add_argument(
        "--reasoning-effort",
        choices=["low", "medium", "high"],
        default="medium",
        help="how much the model reasons before answering (Harmony models; default: medium)",
    )
    parser.add_argument(
        "--show-reasoning", action="store_true", help="show the model's chain of thought (dimmed), hidden by default"
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=1024, metavar="N", help="tokens per reply at most (default: 1024)"
    )
    parser.add_argument(
        "--temperature", type=float, default=1.0, metavar="T", help="sampling temperature, 0 is greedy (default: 1.0)"
    )
    parser.add_argument(
        "--top-p",
        type=float,
        default=None,
        metavar="P",
        help="nucleus sampling: keep probability mass P (default: off)",
    )
    parser.add_argument("--top-k", type=int, default=None, metavar="K", help="sample among the K most likely tokens")
    parser.add_argument("--min-p", type=float, default=None, metavar="P", help="drop tokens below P x the top one's")
    parser.add_argument(
        "--repetition-penalty", type=float, default=None, metavar="R", help="> 1 discourages repeating tokens"
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed, for repeatable replies")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    parser.add_argument(
        "--dtype",
        choices=["auto", *DTYPES],
        default="auto",
        help="weights dtype (default: auto, bfloat16 on a GPU that supports it, else float32)",
    )
    parser.add_argument(
        "--mxfp4",
        action="store_true",
        help="keep MXFP4 experts packed in memory (4.25 bits per weight) and dequantize them on the fly",
    )
    parser.add_argument("--quantize", choices=QUANTIZE_MODES, default=None, help=QUANTIZE_HELP)
    parser.add_argument(
        "--vocab-file",
        default=None,
        metavar="PATH",
        help="the tokenizer's .tiktoken ranks file (o200k_base's for gpt-oss), if tiktoken cannot download it",
    )


def run(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    device = resolve_device(args.device)
    try:
        generator = None if args.seed is None else torch.Generator(device).manual_seed(args.seed)
        sampler = Sampler(args.temperature > 0, args.temperature, args.top_k, args.top_p, args.min_p,
                          args.repetition_penalty, generator)  # fmt: skip
    except ValueError as err:
        raise UserError(str(err)) from None
    dtype = DTYPES[resolve_dtype(args.dtype, device)]
    model, tokenizer = load_model_and_tokenizer(args.checkpoint, device=str(device), dtype=dtype,
                                                quantization=args.quantize, keep_mxfp4=args.mxfp4,
                                                vocab_file=args.vocab_file)  # fmt: skip
    today = datetime.date.today().isoformat()
    chat = open_chat(model, tokenizer, sampler, args.max_new_tokens, args.system, args.reasoning_effort, today)
    if not isinstance(chat, HarmonyChat):
        print(
            f"note: tokenizer {tokenizer.spec} has no Harmony chat tokens; using a plain 'User: / Assistant:' "
            "transcript",
            file=sys.stderr,
        )
    print(f"chatting with {args.checkpoint}; Ctrl-C stops a reply, Ctrl-D quits", file=sys.stderr)
    display = Display(sys.stdout, args.show_reasoning, color=sys.stdout.isatty())
    while True:
        try:
            text = input(PROMPT)
        except (EOFError, KeyboardInterrupt):  # Ctrl-D / Ctrl-C at the prompt: leave cleanly
            print()
            return 0
        if text.strip():
            converse(chat, text, display)


def converse(chat, text: str, display: Display) -> None:
    """One turn: stream the reply; on Ctrl-C stop it; if the conversation no longer fits, start a new one."""
    for attempt in range(2):
        try:
            with closing(chat.reply(text)) as pieces:
                for kind, piece in pieces:
                    display.show(kind, piece)
            display.end()
            return
        except KeyboardInterrupt:
            display.end("[interrupted]")
            return
        except ContextFullError:
            if attempt or not chat.session.tokens:
                display.end()
                print(f"error: the message does not fit in the model's context of {chat.session.max_length} "
                      "tokens", file=sys.stderr)  # fmt: skip
                return
            print("note: the conversation filled the model's context; starting a new one", file=sys.stderr)
            chat.reset()


class Display:
    """Writes a reply as it streams: the answer plainly, the reasoning and tool calls dimmed (or labelled when the
    output is not a terminal), the reasoning only if asked for."""

    LABELS = {"analysis": "[reasoning] ", "call": "[tool call, not run] "}

    def __init__(self, out, show_reasoning: bool, color: bool):
        self.out, self.show_reasoning, self.color = out, show_reasoning, color
        self.kind = None  # kind of the block being written
        self.written = False  # anything written in this reply

    def show(self, kind: str, text: str) -> None:
        if kind == "analysis" and not self.show_reasoning:
            return
        if kind != self.kind:  # a new block: separate it from the previous one
            self._reset_style()
            if self.written:
                self.out.write("\n")
            if kind in self.LABELS:
                self.out.write(DIM if self.color else self.LABELS[kind])
            self.kind = kind
        self.out.write(text)
        self.out.flush()
        self.written = True

    def end(self, note: str | None = None) -> None:
        self._reset_style()
        if note:
            self.out.write(("\n" if self.written else "") + note)
        self.out.write("\n")
        self.out.flush()
        self.kind, self.written = None, False

    def _reset_style(self) -> None:
        if self.color and self.kind in self.LABELS:
            self.out.write(RESET)
