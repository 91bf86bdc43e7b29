"""A reply as the engine generates it: token events in, typed pieces of text out, for every endpoint to shape.

    reply = Reply(HarmonyReader(harmony), stop_strings=["\\n\\n"])    # or PlainReader(tokenizer)
    for event in events:                     # ossgpt.inference.engine.Event, one per generated token
        for piece in reply.add(event):       # Piece(kind, text, start, name)
            ...
        if reply.finish_reason: break        # "stop" (a stop token, or a stop string: reply.cut) or "length"

A piece's kind is what the text is:
    "reasoning"  the chain of thought (Harmony's analysis channel)
    "content"    the answer (the final channel, a preamble on the commentary channel, all text of a plain model)
    "call"       the arguments of a tool call (an assistant message with a recipient, e.g. functions.get_weather)
`start` marks the first piece of a new message (its text may be ""): a new output item for the Responses API, a new
tool call for chat completions (`name`: the function's name, without the "functions." namespace).

Stop strings end the answer where one first appears (the stop string itself is not returned): "content" text is
held back while it could be the beginning of one. Reasoning and tool calls are never cut.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from dataclasses import dataclass

from ossgpt.chat.harmony import Harmony, Message, StreamParser


@dataclass
class Piece:
    kind: str  # "reasoning", "content" or "call"
    text: str
    start: bool = False  # the first piece of a new message
    name: str | None = None  # a call's function name (on its start piece)


def kind_of(message: Message) -> str:
    """As ossgpt.chat.conversation.openai_reply reads a message: a call if it has a recipient, else reasoning on the
    analysis channel and content on any other."""
    if message.recipient:
        return "call"
    return "reasoning" if message.channel == "analysis" else "content"


class HarmonyReader:
    """Harmony output tokens (after the prompt's `<|start|>assistant`) -> pieces; `messages`: those parsed so far."""

    def __init__(self, harmony: Harmony):
        self.parser = StreamParser(harmony, role="assistant", strict=False)  # an untrained model writes anything

    @property
    def messages(self) -> list[Message]:
        return self.parser.messages

    @property
    def writing(self) -> str | None:
        """The kind of the message whose content is being written, if any."""
        return kind_of(self.parser.current) if self.parser.current is not None else None

    def add(self, token: int) -> list[Piece]:
        before = self.parser.current
        text = self.parser.process(token)
        return self._pieces(self.parser.current, before, text)

    def finish(self) -> list[Piece]:
        before = self.parser.current
        text = self.parser.finish()  # a header cut short becomes a message: its text is new
        last = self.messages[-1] if self.messages else None
        return self._pieces(last, before, text) if text else []

    @staticmethod
    def _pieces(message: Message | None, before: Message | None, text: str) -> list[Piece]:
        if message is None or message.role != "assistant":  # a model imitating a tool's answer is not its reply
            return []
        if message is not before:  # a new message: announce it, even before any text
            name = message.recipient.removeprefix("functions.") if kind_of(message) == "call" else None
            return [Piece(kind_of(message), text, start=True, name=name)]
        return [Piece(kind_of(message), text)] if text else []


class PlainReader:
    """Tokens of a plain (non-chat) model -> "content" pieces, whole characters only; stop tokens are not text."""

    def __init__(self, tokenizer, stop_token_ids: Sequence[int]):
        self.tokenizer, self.stop_token_ids = tokenizer, set(stop_token_ids)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.started = False
        self.messages: list[Message] = []
        self.writing = "content"

    def add(self, token: int) -> list[Piece]:
        if token in self.stop_token_ids:
            return []
        return self._piece(self.decoder.decode(self.tokenizer.token_bytes(token)))

    def finish(self) -> list[Piece]:
        return self._piece(self.decoder.decode(b"", final=True))

    def _piece(self, text: str) -> list[Piece]:
        if not text:
            return []
        start, self.started = not self.started, True
        return [Piece("content", text, start=start)]


class StopText:
    """Finds the first stop string in text that arrives piece by piece, holding back a tail that may begin one."""

    def __init__(self, stop_strings: Sequence[str]):
        self.stop_strings = [s for s in stop_strings if s]
        self.held = ""

    def add(self, text: str) -> tuple[str, bool]:
        """(text that is safe to show, whether a stop string was found: then nothing after it is ever shown)."""
        text = self.held + text
        hits = [i for i in (text.find(s) for s in self.stop_strings) if i >= 0]
        if hits:
            self.held = ""
            return text[: min(hits)], True
        keep = max((n for s in self.stop_strings for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        self.held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def finish(self) -> str:
        held, self.held = self.held, ""
        return held


class Reply:
    """Engine events of one request -> pieces; counts the generated tokens and knows why the reply ended."""

    def __init__(self, reader, stop_strings: Sequence[str] = ()):
        self.reader = reader
        self.stop = StopText(stop_strings)
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.finish_reason: str | None = None  # "stop" or "length" once ended
        self.cut = False  # a stop string ended the answer
        self.reasoning_tokens = 0  # generated inside a reasoning message (its <|message|> to its last content token)

    @property
    def messages(self) -> list[Message]:
        """The parsed Harmony messages (empty for a plain model)."""
        return self.reader.messages

    def add(self, event) -> list[Piece]:
        self.prompt_tokens = event.prompt_tokens
        pieces = []
        if event.token is not None:
            self.completion_tokens += 1
            pieces = self._filter(self.reader.add(event.token))
            self.reasoning_tokens += self.reader.writing == "reasoning"
        if event.finish_reason is not None and self.finish_reason is None:
            pieces += self._filter(self.reader.finish())
            if self.finish_reason is None:  # no stop string after all: what was held back is answer text
                held = self.stop.finish()
                pieces += [Piece("content", held)] if held else []
                self.finish_reason = event.finish_reason
        return pieces

    def _filter(self, pieces: list[Piece]) -> list[Piece]:
        """Apply the stop strings to the answer; nothing comes out once one was found."""
        out = []
        for piece in pieces:
            if self.finish_reason is not None:
                break
            if piece.kind == "content":
                piece.text, hit = self.stop.add(piece.text)
                if hit:
                    self.finish_reason, self.cut = "stop", True
                if not piece.text and not piece.start:
                    continue
            out.append(piece)
        return out
