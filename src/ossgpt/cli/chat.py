"""`ossgpt chat --checkpoint DIR`: talk with a model in the terminal.

    ossgpt chat --checkpoint gpt-oss-20b --reasoning-effort low --show-reasoning
    ossgpt chat --checkpoint runs/demo --temperature 0.8 --top-p 0.95

Models whose tokenizer has Harmony's chat tokens chat in the Harmony format: gpt-oss checkpoints (o200k_harmony),
and the compact-vocabulary models trained here (their vocabulary ends with those tokens; a model learns the format
from `ossgpt sft`). The reply streams as it is generated; its chain of thought (the analysis channel) is hidden
unless --show-reasoning shows it, dimmed. Models whose tokenizer lacks those tokens (whole cl100k_base, bytes) get a
plain "User: / Assistant:" transcript instead. The KV cache is kept across turns: each turn runs the model on the
new tokens only.

Ctrl-C stops a reply and returns to the prompt; Ctrl-C or Ctrl-D at the prompt quits.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from contextlib import closing

from ossgpt.chat.session import HarmonyChat, open_chat
from ossgpt.cli import arguments
from ossgpt.errors import UserError
from ossgpt.inference.generate import ContextFullError
from ossgpt.inference.sampling import Sampler

PROMPT = ">>> "
DIM, RESET = "\033[2m", "\033[0m"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    arguments.add_loading(parser)
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
    arguments.add_sampling(parser, temperature=1.0, top_k=None)


def run(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    sampler = Sampler(**arguments.sampling(args))
    model, tokenizer = arguments.load(args)
    today = datetime.date.today().isoformat()
    chat = open_chat(model, tokenizer, sampler, args.max_new_tokens, args.system,
                     reasoning_effort=args.reasoning_effort, current_date=today)  # fmt: skip
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
