"""A conversation with a model, turn by turn, over one KV cache (ossgpt.inference.generate.DecodeSession).

Each turn appends only the new tokens (the user's message and the assistant header) to the cache, so earlier
turns are never prefilled again. `reply(text)` yields the reply as (kind, text) pieces while it is generated:

    kind  "analysis"    chain of thought (Harmony's analysis channel)
          "final"       the answer (also text outside any channel)
          "commentary"  a user-visible preamble
          "call"        a tool call's arguments (this chat runs no tools)

Whatever ends a turn (the model's stop token, max_new_tokens, Ctrl-C closing the generator), the history is left
well-formed: the sampled token the cache does not hold yet goes in with the next turn, a <|return|> becomes the
<|end|> that history keeps, and a message cut short is closed. Earlier turns' chain of thought stays in the cache:
OpenAI recommends leaving it out of later prompts (Harmony.render_for_completion does), but that would mean
prefilling the whole history again every turn.

Two formats:
  HarmonyChat  gpt-oss's Harmony format (the tokenizer has its special tokens): a system message with the reasoning
               effort and date, the --system text as developer instructions, channels.
  PlainChat    any other tokenizer: a "User: ... / Assistant: ..." transcript; the reply ends at the model's
               end-of-text token or when it starts the next "User:" line.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing

from ossgpt.chat.harmony import Harmony, Message, StreamParser, developer_content, system_content
from ossgpt.inference.generate import DecodeSession
from ossgpt.inference.sampling import Sampler
from ossgpt.tokenizer import TextStream


class HarmonyChat:
    def __init__(
        self,
        model,
        tokenizer,
        sampler: Sampler,
        max_new_tokens: int,
        instructions: str | None = None,
        reasoning_effort: str = "medium",
        current_date: str | None = None,
    ):
        self.model, self.sampler, self.max_new_tokens = model, sampler, max_new_tokens
        self.harmony = Harmony(tokenizer)
        self.preamble = [Message("system", system_content(reasoning_effort, current_date))]
        if instructions:
            self.preamble.append(Message("developer", developer_content(instructions)))
        self.reset()

    def reset(self) -> None:
        """Start a new conversation (an empty cache)."""
        self.session = DecodeSession(self.model)
        self.pending = self.harmony.render_conversation(self.preamble)  # tokens to add before the next turn

    def reply(self, text: str) -> Iterator[tuple[str, str]]:
        """Send a user message; yield the reply as (kind, text) pieces."""
        h = self.harmony
        user = Message("user", text)
        self.session.extend([*self.pending, *h.render(user), h.start, *h.text("assistant")])
        self.pending = []
        parser = StreamParser(h, role="assistant")
        start = len(self.session.tokens)
        generated = []
        try:
            for token in self.session.generate(self.max_new_tokens, self.sampler, h.stop_token_ids):
                generated.append(token)
                piece = parser.process(token)
                if piece:
                    yield _kind(parser.current), piece
        finally:
            unfed = generated[len(self.session.tokens) - start :]  # the last sampled token, if not yet in the cache
            self.pending = [h.end if t == h.return_ else t for t in unfed] + self._closing(parser)
            unshown = parser.finish()  # a header the turn cut short: shown as text, whatever it says
        if unshown:
            yield _kind(parser.messages[-1]), unshown

    def _closing(self, parser: StreamParser) -> list[int]:
        """Tokens that complete a message the turn left open."""
        if parser.current is not None:
            return [self.harmony.end]
        if parser.header_tokens is not None:  # inside a header (right after <|start|>: not even a role yet)
            role = self.harmony.text("assistant") if parser.role is None and not parser.header_tokens else []
            return [*role, self.harmony.message, self.harmony.end]
        return []


def _kind(message: Message) -> str:
    return "call" if message.recipient else message.channel or "final"


class PlainChat:
    USER, ASSISTANT = "User:", "Assistant:"

    def __init__(self, model, tokenizer, sampler: Sampler, max_new_tokens: int, instructions: str | None = None):
        self.model, self.tokenizer, self.sampler, self.max_new_tokens = model, tokenizer, sampler, max_new_tokens
        self.instructions = instructions
        self.reset()

    def reset(self) -> None:
        self.session = DecodeSession(self.model)
        head = f"{self.instructions}\n\n" if self.instructions else ""
        self.pending = [self.tokenizer.eot_token_id, *self.tokenizer.encode_ordinary(head)]  # a document starts
        self.user_line = self.USER  # what precedes the next user message ("" once the model wrote it itself)

    def reply(self, text: str) -> Iterator[tuple[str, str]]:
        prompt = f"{self.user_line} {text}\n{self.ASSISTANT}"
        self.session.extend([*self.pending, *self.tokenizer.encode_ordinary(prompt)])
        self.pending, self.user_line = [], "\n" + self.USER
        eot = self.tokenizer.eot_token_id
        text = TextStream(self.tokenizer)
        held = ""  # the end of the reply that may be the beginning of the next user line: not shown yet
        start = len(self.session.tokens)
        generated = []
        try:
            with closing(self.session.generate(self.max_new_tokens, self.sampler, [eot])) as tokens:
                for token in tokens:
                    generated.append(token)
                    if token == eot:
                        break
                    held += text.add(token)
                    if self.user_line in held:  # the model started the next user line: the reply ends before it
                        held, self.user_line = held[: held.index(self.user_line)], ""
                        break
                    keep = _partial_suffix(held, self.user_line)
                    if len(held) > keep:
                        yield "final", held[: len(held) - keep]
                        held = held[len(held) - keep :]
            if held:
                yield "final", held
        finally:
            unfed = generated[len(self.session.tokens) - start :]  # the last sampled token, if not yet in the cache
            self.pending = [t for t in unfed if t != eot]


def _partial_suffix(text: str, pattern: str) -> int:
    """Length of the longest end of `text` that is a proper start of `pattern`."""
    for n in range(min(len(text), len(pattern) - 1), 0, -1):
        if pattern.startswith(text[-n:]):
            return n
    return 0


def open_chat(model, tokenizer, *args, reasoning_effort: str = "medium", current_date: str | None = None):
    """A HarmonyChat if the tokenizer has the Harmony special tokens, else a PlainChat, which has no reasoning effort
    or date. args: both's (sampler, max_new_tokens, instructions)."""
    if Harmony.supports(tokenizer):
        return HarmonyChat(model, tokenizer, *args, reasoning_effort=reasoning_effort, current_date=current_date)
    return PlainChat(model, tokenizer, *args)
