"""Harmony, the chat format gpt-oss was trained on: render conversations to tokens, parse model output back.

Every message is

    <|start|>{header}<|message|>{content}<|end|>

where the header is the author (a role: system, developer, user, assistant; or a tool's name such as
`functions.get_weather`), then an optional recipient ` to={name}`, an optional `<|channel|>{channel}` and an
optional content type (` json`, or ` <|constrain|>json` for constrained tool arguments). Assistant messages go to
one of three channels: `analysis` (chain of thought, not meant for users), `commentary` (tool calls, preambles)
and `final` (the answer). An assistant message addressed to a tool ends with <|call|> instead of <|end|>.

A prompt for the next reply ends with `<|start|>assistant`; the model writes the rest of the header
(`<|channel|>analysis<|message|>...`), possibly several messages, and ends its turn with <|return|> (answer
complete) or <|call|> (tool call), the tokens sampling stops at. In the history every completed message ends with
<|end|>, the <|return|> included. By default, rendering drops the analysis messages that precede the first `final`
one once the last assistant message is final, as OpenAI recommends (keep them while a tool call is in progress).

The system message (`system_content`) carries the model identity, dates, reasoning effort and channel rules; the
developer message (`developer_content`) the instructions ("system prompt") and function tools, described as
TypeScript types.

This follows openai/harmony's renderer (the order role, recipient, channel, content type; text encoded piece by
piece as ordinary text, so message text spelling "<|end|>" never becomes a control token) and the examples of
OpenAI's "Harmony response format" guide; tests/test_harmony.py holds them as expected strings.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

ROLES = ("system", "developer", "user", "assistant", "tool")
CHANNELS = ("analysis", "commentary", "final")
REASONING_EFFORTS = ("low", "medium", "high")
MODEL_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
KNOWLEDGE_CUTOFF = "2024-06"
SPECIAL_TOKENS = ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|return|>", "<|call|>")
CONSTRAIN = "<|constrain|>"


@dataclass
class Message:
    role: str  # one of ROLES
    content: str
    channel: str | None = None
    recipient: str | None = None  # e.g. "functions.get_weather" for a tool call, "assistant" for a tool's answer
    content_type: str | None = None  # e.g. "<|constrain|>json"
    name: str | None = None  # a tool message's author (its header shows the name instead of the role)


@dataclass
class FunctionTool:
    name: str
    description: str
    parameters: dict | None = None  # a JSON schema of the single argument object


# ------------------------------------------------------------------------------------------ message contents
def system_content(
    reasoning_effort: str = "medium",
    current_date: str | None = None,
    knowledge_cutoff: str | None = KNOWLEDGE_CUTOFF,
    model_identity: str | None = MODEL_IDENTITY,
    channels: Sequence[str] = CHANNELS,
    function_tools: bool = False,
) -> str:
    """The system message's text. function_tools: the conversation's developer message defines functions."""
    if reasoning_effort not in REASONING_EFFORTS:
        raise ValueError(f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}, got {reasoning_effort!r}")
    top = [model_identity] if model_identity else []
    top += [f"Knowledge cutoff: {knowledge_cutoff}"] if knowledge_cutoff else []
    top += [f"Current date: {current_date}"] if current_date else []
    sections = ["\n".join(top)] if top else []
    sections.append(f"Reasoning: {reasoning_effort}")
    if channels:
        rule = f"# Valid channels: {', '.join(channels)}. Channel must be included for every message."
        if function_tools:
            rule += "\nCalls to these tools must go to the commentary channel: 'functions'."
        sections.append(rule)
    return "\n\n".join(sections)


def developer_content(instructions: str | None = None, tools: Sequence[FunctionTool] = ()) -> str:
    """The developer message's text: "# Instructions" and, with tools, a "# Tools" section (namespace functions)."""
    sections = ["# Instructions", instructions] if instructions is not None else []
    if tools:
        lines = ["## functions\n", "namespace functions {\n"]
        for tool in tools:
            lines += [f"// {line}" for line in tool.description.splitlines()]
            argument = f"_: {typescript(tool.parameters)}" if tool.parameters is not None else ""
            lines.append(f"type {tool.name} = ({argument}) => any;\n")
        lines.append("} // namespace functions")
        sections += ["# Tools", "\n".join(lines)]
    return "\n\n".join(sections)


def typescript(schema: dict, indent: str = "") -> str:
    """A JSON schema as the TypeScript-like type the model was trained on (objects, strings with enums, numbers,
    booleans, arrays, nullable, oneOf unions one variant a line; titles, descriptions, examples and defaults as
    comments; anything else is `any`), laid out as openai-harmony lays it out."""
    if isinstance(schema.get("oneOf"), list):
        return "".join(f"\n{indent} | {_variant(v, indent, True)}" for v in schema["oneOf"])
    kind = schema.get("type")
    if isinstance(kind, list):
        return " | ".join("number" if t == "integer" else t for t in kind)
    if kind == "object":
        out = f"{indent}// {schema['description']}\n" if "description" in schema else ""
        out += "{\n"
        required = set(schema.get("required", ()))
        for key, value in schema.get("properties", {}).items():
            name = key if key in required else f"{key}?"
            variants = value.get("oneOf") if isinstance(value.get("oneOf"), list) else None
            if "title" in value:
                out += f"{indent}// {value['title']}\n{indent}//\n"
            if "description" in value and variants is None:
                out += f"{indent}// {value['description']}\n"
            if value.get("examples"):
                out += f"{indent}// Examples:\n"
                out += "".join(f'{indent}// - "{e}"\n' for e in value["examples"] if isinstance(e, str))
            if variants is not None:  # a union: one variant a line, openai-harmony's layout and rules
                description = value.get("description")
                above = description is not None and (not variants or variants[0].get("description") != description)
                out += f"{indent}// {description}\n" if above else ""
                out += f"{indent}// {_default(value)}\n" if "default" in value else ""
                out += f"{indent}{name}:\n"
                for i, variant in enumerate(variants):
                    shown = not (i == 0 and above) and variant.get("description") != description
                    out += f"{indent} | {_variant(variant, indent, shown)}\n"
                out += f"{indent},\n"
                continue
            out += f"{indent}{name}: {_nullable(value, indent + '    ')},"
            out += f" // {_default(value)}\n" if "default" in value else "\n"
        return out + f"{indent}}}"
    if kind == "string":
        options = [f'"{v}"' for v in schema.get("enum") or () if isinstance(v, str)]
        return " | ".join(options) if options else "string"
    if kind in ("number", "integer"):
        return "number"
    if kind == "boolean":
        return "boolean"
    if kind == "array":
        return f"{typescript(schema['items'], indent)}[]" if "items" in schema else "Array<any>"
    return "any"


def _nullable(schema: dict, indent: str) -> str:
    text = typescript(schema, indent)
    return text + " | null" if schema.get("nullable") and "null" not in text else text


def _variant(variant: dict, indent: str, show_description: bool) -> str:
    """One variant of a oneOf union, with its description (if shown) and default as a trailing comment."""
    comments = [variant["description"]] if show_description and "description" in variant else []
    comments += [_default(variant)] if "default" in variant else []
    return _nullable(variant, indent + "   ") + (f" // {' '.join(comments)}" if comments else "")


def _default(schema: dict) -> str:
    default = schema["default"]
    if isinstance(default, str):
        return f"default: {default}" if schema.get("enum") else f'default: "{default}"'
    return f"default: {json.dumps(default, separators=(',', ':'), ensure_ascii=False)}"  # as serde_json writes it


# ----------------------------------------------------------------------------------------------- the format
class Harmony:
    """Renders and parses Harmony conversations with a tokenizer that has gpt-oss's special tokens."""

    def __init__(self, tokenizer):
        missing = [t for t in SPECIAL_TOKENS if t not in tokenizer.special_tokens]
        if missing:
            raise ValueError(f"tokenizer {tokenizer.spec} lacks the Harmony special tokens {', '.join(missing)}")
        self.tokenizer = tokenizer
        ids = tokenizer.special_tokens
        self.start, self.end, self.message = ids["<|start|>"], ids["<|end|>"], ids["<|message|>"]
        self.channel, self.constrain = ids["<|channel|>"], ids["<|constrain|>"]
        self.return_, self.call = ids["<|return|>"], ids["<|call|>"]

    @staticmethod
    def supports(tokenizer) -> bool:
        return all(t in tokenizer.special_tokens for t in SPECIAL_TOKENS)

    @property
    def stop_token_ids(self) -> tuple[int, int]:
        """The tokens that end an assistant turn: <|return|> (answer complete) and <|call|> (tool call)."""
        return self.return_, self.call

    @property
    def message_end_ids(self) -> tuple[int, int, int]:
        """The tokens that end a message: <|end|>, <|return|> and <|call|>."""
        return self.end, self.return_, self.call

    def text(self, text: str) -> list[int]:
        return self.tokenizer.encode_ordinary(text)

    def decode(self, tokens: Sequence[int]) -> str:
        """Text of tokens, special ones as their text; ids the tokenizer lacks as U+FFFD."""
        return b"".join(self.tokenizer.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    # ------------------------------------------------------------------------------------------ rendering
    def render(self, message: Message) -> list[int]:
        """One message: <|start|>{header}<|message|>{content}<|end|> (or <|call|> for an assistant's tool call)."""
        if message.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {message.role!r}")
        if message.role == "tool":
            if not message.name:
                raise ValueError("a tool message needs the tool's name (name=...)")
            tokens = [self.start, *self.text(message.name)]
        else:
            tokens = [self.start, *self.text(message.role + (f":{message.name}" if message.name else ""))]
        if message.recipient and message.recipient != "all":
            tokens += self.text(f" to={message.recipient}")
        if message.channel:
            tokens += [self.channel, *self.text(message.channel)]
        if message.content_type:
            if message.content_type.startswith(CONSTRAIN):
                tokens += [*self.text(" "), self.constrain, *self.text(message.content_type[len(CONSTRAIN) :])]
            else:
                tokens += self.text(f" {message.content_type}")
        tokens += [self.message, *self.text(message.content)]
        tokens.append(self.call if message.role == "assistant" and message.recipient else self.end)
        return tokens

    def render_conversation(self, messages: Sequence[Message], drop_analysis: bool = True) -> list[int]:
        """All messages, in order. drop_analysis: once the last assistant message is `final`, leave out the analysis
        messages before the first `final` one (openai-harmony's auto_drop_analysis, on by default there too)."""
        last_is_final = next((m.channel == "final" for m in reversed(messages) if m.role == "assistant"), False)
        first_final = next((i for i, m in enumerate(messages) if m.channel == "final"), None)
        if drop_analysis and last_is_final and first_final is not None:
            messages = [m for i, m in enumerate(messages) if not (i < first_final and m.channel == "analysis")]
        return [token for message in messages for token in self.render(message)]

    def render_for_completion(
        self, messages: Sequence[Message], role: str = "assistant", drop_analysis: bool = True
    ) -> list[int]:
        """The conversation followed by `<|start|>{role}`: the prompt for the next message."""
        return [*self.render_conversation(messages, drop_analysis), self.start, *self.text(role)]

    # -------------------------------------------------------------------------------------------- parsing
    def parse(self, tokens: Sequence[int], role: str | None = "assistant", strict: bool = True) -> list[Message]:
        """Messages from a completion's tokens (without the prompt). role: the author already given by the prompt
        (it ended with `<|start|>assistant`), or None if the tokens start with <|start|>."""
        parser = StreamParser(self, role, strict)
        for token in tokens:
            parser.process(token)
        parser.finish()
        return parser.messages


class StreamParser:
    """Parses model output token by token: `process` returns each token's new content text, so a chat can show a
    message as it is written; `current` is the message being read (its header parsed, its content growing),
    `messages` holds the completed ones.

    strict: raise ValueError on malformed output. Otherwise (what a chat wants from an unreliable model) text
    outside any message becomes a channel-less assistant message, and a header that a message-end token cuts
    short keeps its role and channel, the rest becoming the content.
    """

    def __init__(self, harmony: Harmony, role: str | None = "assistant", strict: bool = False):
        self.harmony = harmony
        self.strict = strict
        self.messages: list[Message] = []
        self.header_tokens: list[int] | None = [] if role is not None else None  # None: between messages
        self.role = role  # the next message's author role, when already known
        self.current: Message | None = None  # the message whose content is being read
        self._content = bytearray()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    @property
    def channel(self) -> str | None:
        return self.current.channel if self.current else None

    def process(self, token: int) -> str:
        """Consume one token; the content text it adds ("" for structure tokens or an unfinished character)."""
        h = self.harmony
        if self.current is not None:  # reading content
            if token in h.message_end_ids:
                self._close()
                return ""
            data = self.harmony.tokenizer.token_bytes(token)
            self._content += data
            return self._decoder.decode(data)
        if self.header_tokens is None:  # between messages
            if token == h.start:
                self.header_tokens = []
                return ""
            if self.strict:
                raise ValueError(f"unexpected token {token} where a message should start (<|start|>)")
            self._open(Message(self.role or "assistant", ""))  # stray text: a channel-less message
            return self.process(token)
        if token == h.message:
            header = self.harmony.decode(self.header_tokens)
            try:
                self._open(parse_header(header, self.role))
            except ValueError:
                if self.strict:
                    raise
                self._open(Message(self.role or "assistant", ""))
                return self._add_text(header)
            return ""
        if token in h.message_end_ids:  # a header cut short
            if self.strict:
                raise ValueError(f"message header {h.decode(self.header_tokens)!r} ended before <|message|>")
            self._close_cut_header()
            return ""
        self.header_tokens.append(token)
        return ""

    def finish(self) -> str:
        """End of output: a message in progress is complete as it is. Output that ends inside a header is an error
        when strict (as in openai-harmony); otherwise that header becomes a message, whose text is returned (it
        was never returned by `process`)."""
        if self.current is not None:
            self._close()
        elif self.header_tokens:
            if self.strict:
                raise ValueError("output ended inside a message header")
            return self._close_cut_header()
        return ""

    def _close_cut_header(self) -> str:
        """A header that ends without <|message|>: keep its role and channel; the rest of its text is content."""
        message, rest = _split_malformed_header(self.harmony.decode(self.header_tokens), self.role)
        self._open(message)
        self._add_text(rest)
        self._close()
        return rest

    def _open(self, message: Message) -> None:
        self.current, self.header_tokens, self.role = message, None, None

    def _add_text(self, text: str) -> str:
        self._content += text.encode()
        return text

    def _close(self) -> None:
        self.current.content = self._content.decode("utf-8", errors="replace")
        self.messages.append(self.current)
        self.current, self._content = None, bytearray()
        self._decoder.reset()


def parse_header(header: str, role: str | None) -> Message:
    """A message header (decoded, special tokens as text) -> an empty Message with its author, recipient, channel
    and content type. role: the author if the prompt already gave it. Raises ValueError if malformed."""
    channel, rest = _take_channel(header)
    parts = rest.replace(CONSTRAIN, " " + CONSTRAIN).split()
    name = None
    if role is None:
        if not parts:
            raise ValueError("message header has no role")
        if parts[0] in ROLES:
            role = parts[0]
        elif len(parts) > 1 or parts[0].startswith("to="):  # a tool's answer: its name, then its recipient
            role, name = "tool", parts.pop(0)
        else:
            raise ValueError(f"unknown role {parts[0]!r} in message header")
    if parts and parts[0] == role:
        parts.pop(0)
    recipient = content_type = None
    if parts:
        last = parts.pop()
        if last.startswith("to="):
            recipient = last[3:]
        elif not parts and not last.startswith(CONSTRAIN):  # a lone word is a recipient
            recipient = last
        else:
            content_type = last
            if parts:
                recipient = parts.pop().removeprefix("to=")
    if parts:
        raise ValueError(f"unexpected text {' '.join(parts)!r} in message header")
    return Message(role, "", channel=channel, recipient=recipient, content_type=content_type, name=name)


def _take_channel(header: str) -> tuple[str | None, str]:
    """(channel, the header without `<|channel|>{channel}`)."""
    marker = header.find("<|channel|>")
    if marker < 0:
        return None, header.strip()
    after = header[marker + len("<|channel|>") :]
    channel = re.match(r"[^\s<]*", after).group(0)
    if not channel:
        raise ValueError("message header has <|channel|> but no channel name")
    return channel, (header[:marker] + after[len(channel) :]).strip()


def _split_malformed_header(header: str, role: str | None) -> tuple[Message, str]:
    """A header cut short by a message-end token: keep its role and channel; the rest of its text is content."""
    try:
        channel, rest = _take_channel(header)
    except ValueError:
        channel, rest = None, header
    words = rest.split()
    if role is None and words and words[0] in ROLES:
        role = words.pop(0)
    return Message(role or "assistant", "", channel=channel), " ".join(words)
