"""OpenAI chat-format conversations <-> Harmony, and the loss mask supervised fine-tuning trains with.

In: OpenAI chat messages, as a chat-completions request or a JSONL training record sends them, and OpenAI tools:

    {"role": "system" | "developer", "content": ...}   the developer message's instructions (joined by blank lines)
    {"role": "user", "content": ...}
    {"role": "assistant", "content": ..., "reasoning": ..., "tool_calls": [{"id", "type": "function",
                          "function": {"name", "arguments": a JSON string}}]}
    {"role": "tool", "tool_call_id": ... (or "name": the function's name), "content": ...}
    tools: [{"type": "function", "function": {"name", "description"?, "parameters"?: a JSON schema}}]

content is a string or a list of {"type": "text", "text": ...} parts (joined with nothing); an assistant's
reasoning may also come as `reasoning_content` or `thinking` (the field of the Multilingual-Thinking dataset).
Fields the API and datasets carry empty (refusal, audio, annotations, a null `thinking` on a user message...) are
accepted when empty; anything else unknown is an error.

Out (`harmony_messages`): the whole Harmony conversation, list[Message]:

    system     system_content: identity, knowledge cutoff, date, reasoning effort, channels (+ the functions rule)
    developer  developer_content: the instructions and the tools (left out when there are neither)
    user       the text
    assistant  reasoning -> an `analysis` message; then content -> a `final` message, or, beside tool_calls, a
               `commentary` preamble; each tool call -> `commentary` to=functions.NAME, content type
               <|constrain|>json, the arguments string unchanged (what gpt-oss writes, as openai-harmony renders it)
    tool       from functions.NAME (found through tool_call_id) to=assistant on `commentary`

Rendering (token ids of the o200k_harmony vocabulary):

    render_prompt(harmony, messages)     -> tokens: the history, then `<|start|>assistant`
    render_training(harmony, messages)   -> (tokens, mask): mask[i] is True where token i is one the model must write

Chain of thought in the history: the analysis messages of finished turns (those before the last `final` message)
are dropped; the ones of a tool-call chain still in progress are kept, as OpenAI's Harmony guide and the gpt-oss
chat template prescribe. The trained turn (the assistant messages after the last user message) keeps its own.

The mask supervises exactly the tokens that sampling produces at inference: a reply is sampled after a prompt that
ends `<|start|>assistant` and stops at <|return|> or <|call|>. So in each assistant message of the trained turn the
channel, recipient, content type, content and closing token are supervised; its `<|start|>assistant` is context
where a prompt provides it (after a user or tool message, or after a <|call|>) and supervised where the model writes
it itself (after an <|end|> of its own, e.g. between its analysis and its final answer). The turn's last message
closes with <|return|> if final or <|call|> if a tool call (as openai-harmony's render_conversation_for_training
renders it). System, developer, user and tool messages are context.

The other way (`openai_reply`): the parsed messages of a completion (Harmony.parse, StreamParser) -> an OpenAI
assistant message {"role", "content", "reasoning", "tool_calls"?} and its finish reason.

Where openai-harmony 0.0.8 differs (tests/test_conversation.py shows each difference):
  * its auto_drop_analysis drops only the analysis before the *first* final message (openai/harmony PR #96 proposes
    the last), so in a third turn it keeps the second turn's reasoning, and it keeps earlier turns' reasoning while
    a tool call is in progress; here both are dropped, as the guide and the gpt-oss chat template do;
  * render_conversation_for_training applies the same dropping, so for a one-turn conversation it drops the very
    reasoning being trained on; here the trained turn keeps it;
  * it tokenizes each text part of a message on its own; here the joined text is tokenized whole (the text is the
    same; the tokens differ only where a part boundary cuts a word), so a reply does not depend on how a client
    split its text.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
from collections.abc import Sequence

from ossgpt.chat.harmony import (
    REASONING_EFFORTS,
    ROLES,
    FunctionTool,
    Harmony,
    Message,
    developer_content,
    system_content,
    typescript,
)

JSON_ARGUMENTS = "<|constrain|>json"  # the content type of a tool call's arguments
REASONING_FIELDS = ("reasoning", "reasoning_content", "thinking")
FIELDS = {  # what each role's message may carry, beside "role"
    "system": ("content",),
    "developer": ("content",),
    "user": ("content",),
    "assistant": ("content", "tool_calls", *REASONING_FIELDS),
    "tool": ("content", "tool_call_id", "name"),
}
# Fields the OpenAI API returns (and clients echo back) or datasets carry that mean nothing here while empty.
EMPTY_FIELDS = ("name", "refusal", "audio", "function_call", "annotations", *REASONING_FIELDS)
RECORD_FIELDS = ("messages", "tools", "reasoning_effort")
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
GREEN, RESET = "\x1b[32m", "\x1b[0m"


class ConversationError(ValueError):
    """A malformed conversation. str(error) says what is wrong and what to do; `param` is the JSON path of the bad
    field ("messages[2].role"), or None when the problem is not one field's."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


# --------------------------------------------------------------------------------------------- OpenAI -> Harmony
def conversation_from_json(record: dict) -> tuple[list, list | None, str | None]:
    """A JSONL training record {"messages": [...], "tools"?: [...], "reasoning_effort"?: "low|medium|high"} ->
    (messages, tools, reasoning_effort), its shape checked (the messages and tools are checked by harmony_messages)."""
    if not isinstance(record, dict):
        raise ConversationError(f'a record must be a JSON object {{"messages": [...]}}; got {_kind(record)}')
    for key in record:
        if key not in RECORD_FIELDS:
            raise ConversationError(
                f"unknown field {key!r} in the record; a record has messages, and optionally tools and "
                "reasoning_effort",
                key,
            )
    messages, tools, effort = record.get("messages"), record.get("tools"), record.get("reasoning_effort")
    if not isinstance(messages, list) or not messages:
        raise ConversationError(f"messages must be a non-empty list of messages; got {_kind(messages)}", "messages")
    if tools is not None and not isinstance(tools, list):
        raise ConversationError(f"tools must be a list of tools; got {_kind(tools)}", "tools")
    if effort is not None:
        _check_effort(effort)
    return messages, tools, effort


def parse_tools(tools: list | None) -> list[FunctionTool]:
    """OpenAI tools [{"type": "function", "function": {"name", "description"?, "parameters"?}}] -> FunctionTools."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise ConversationError(f"tools must be a list of tools; got {_kind(tools)}", "tools")
    parsed: list[FunctionTool] = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        _check_object(tool, where, ("type", "function"))
        if tool.get("type") != "function":
            raise ConversationError(f"{where}.type must be 'function'; got {_show(tool.get('type'))}", f"{where}.type")
        function = tool.get("function")
        _check_object(function, f"{where}.function", ("name", "description", "parameters", "strict"))
        name, description, parameters = function.get("name"), function.get("description"), function.get("parameters")
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise ConversationError(
                f"{where}.function.name must be 1 to 64 letters, digits, underscores or dashes; got {_show(name)}",
                f"{where}.function.name",
            )
        if any(t.name == name for t in parsed):
            raise ConversationError(
                f"{where}.function.name {name!r} is already a tool; rename one of them", f"{where}.function.name"
            )
        if description is not None and not isinstance(description, str):
            raise ConversationError(
                f"{where}.function.description must be a string; got {_kind(description)}",
                f"{where}.function.description",
            )
        if parameters is not None:
            try:  # what the developer message will show the model; a schema it cannot describe fails here
                if not isinstance(parameters, dict):
                    raise TypeError(f"got {_kind(parameters)}")
                typescript(parameters)
            except (AttributeError, KeyError, TypeError) as err:
                raise ConversationError(
                    f"{where}.function.parameters must be a JSON schema object ({err})", f"{where}.function.parameters"
                ) from None
        parsed.append(FunctionTool(name, description or "", parameters))
    return parsed


def harmony_messages(
    messages: list,
    tools: list | None = None,
    *,
    reasoning_effort: str = "medium",
    current_date: str | None = None,
) -> list[Message]:
    """OpenAI chat messages (and tools) -> the whole Harmony conversation: system, developer, then the turns.
    current_date: "YYYY-MM-DD" for the system message, or None to leave the date out."""
    _check_effort(reasoning_effort)
    if current_date is not None:
        try:
            datetime.date.fromisoformat(current_date)
        except (TypeError, ValueError):
            raise ConversationError(
                f"current_date must be a date YYYY-MM-DD; got {_show(current_date)}", "current_date"
            ) from None
    functions = parse_tools(tools)
    if not isinstance(messages, list) or not messages:
        raise ConversationError(f"messages must be a non-empty list of messages; got {_kind(messages)}", "messages")
    instructions: list[str] = []
    turns: list[Message] = []
    calls: dict[str, str] = {}  # tool call id -> function name (the latest call with that id: ids may repeat)
    called: set[str] = set()  # the functions called so far
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        role = _check_message(message, where)
        if role in ("system", "developer"):
            if turns:
                raise ConversationError(
                    f"{where} is a {role} message after the conversation started; put system "
                    "and developer messages first",
                    f"{where}.role",
                )
            instructions.append(_required_text(message, role, where))
        elif role == "user":
            turns.append(Message("user", _required_text(message, role, where)))
        elif role == "assistant":
            turns += _assistant(message, where, functions, calls, called)
        else:
            turns.append(_tool_result(message, where, calls, called))
    system = Message("system", system_content(reasoning_effort, current_date, function_tools=bool(functions)))
    if not instructions and not functions:
        return [system, *turns]
    developer = developer_content("\n\n".join(instructions) if instructions else None, functions)
    return [system, Message("developer", developer), *turns]


def _assistant(message: dict, where: str, functions, calls: dict, called: set) -> list[Message]:
    reasoning = _reasoning(message, where)
    out = [Message("assistant", reasoning, channel="analysis")] if reasoning else []
    content = _text(message.get("content"), f"{where}.content")
    tool_calls = message.get("tool_calls")
    if not tool_calls:
        if content is None:
            raise ConversationError(
                f"{where}.content is missing; an assistant message needs content unless it has tool_calls",
                f"{where}.content",
            )
        return [*out, Message("assistant", content, channel="final")]
    if not isinstance(tool_calls, list):
        raise ConversationError(f"{where}.tool_calls must be a list; got {_kind(tool_calls)}", f"{where}.tool_calls")
    if content:  # text beside tool calls is what the user sees meanwhile: a preamble
        out.append(Message("assistant", content, channel="commentary"))
    for j, call in enumerate(tool_calls):
        out.append(_tool_call(call, f"{where}.tool_calls[{j}]", functions, calls, called))
    return out


def _tool_call(call, where: str, functions, calls: dict, called: set) -> Message:
    _check_object(call, where, ("id", "type", "function"))
    if call.get("type", "function") != "function":
        raise ConversationError(f"{where}.type must be 'function'; got {_show(call.get('type'))}", f"{where}.type")
    call_id, function = call.get("id"), call.get("function")
    if call_id is not None and not isinstance(call_id, str):
        raise ConversationError(f"{where}.id must be a string; got {_kind(call_id)}", f"{where}.id")
    _check_object(function, f"{where}.function", ("name", "arguments"))
    name, arguments = function.get("name"), function.get("arguments")
    if name not in [t.name for t in functions]:
        known = f"one of the tools ({', '.join(t.name for t in functions)})" if functions else "a tool (there are none)"
        raise ConversationError(
            f"{where}.function.name {_show(name)} is not {known}; declare every function the "
            "conversation calls in tools",
            f"{where}.function.name",
        )
    try:
        if not isinstance(arguments, str):
            raise TypeError
        json.loads(arguments)
    except (TypeError, ValueError):
        raise ConversationError(
            f"{where}.function.arguments must be a JSON string (json.dumps of the arguments); got {_show(arguments)}",
            f"{where}.function.arguments",
        ) from None
    if call_id is not None:
        calls[call_id] = name
    called.add(name)
    return Message(
        "assistant", arguments, channel="commentary", recipient=f"functions.{name}", content_type=JSON_ARGUMENTS
    )


def _tool_result(message: dict, where: str, calls: dict, called: set) -> Message:
    content = _required_text(message, "tool", where)
    call_id, name = message.get("tool_call_id"), message.get("name")
    if call_id is not None:
        if not isinstance(call_id, str):
            raise ConversationError(
                f"{where}.tool_call_id must be a string; got {_kind(call_id)}", f"{where}.tool_call_id"
            )
        if call_id not in calls:
            raise ConversationError(
                f"{where}.tool_call_id {_show(call_id)} matches no earlier tool call; give the id "
                "of the assistant's tool call this answers",
                f"{where}.tool_call_id",
            )
        if name is not None and name != calls[call_id]:
            raise ConversationError(
                f"{where}.name {_show(name)} differs from the function its tool_call_id called "
                f"({calls[call_id]!r}); drop one of them",
                f"{where}.name",
            )
        name = calls[call_id]
    elif name is None:
        raise ConversationError(f"{where} needs tool_call_id: the id of the tool call it answers", where)
    elif not isinstance(name, str) or name not in called:
        raise ConversationError(
            f"{where}.name {_show(name)} matches no earlier tool call; give the name of the "
            "function this answers (or its tool_call_id)",
            f"{where}.name",
        )
    return Message("tool", content, channel="commentary", recipient="assistant", name=f"functions.{name}")


def _check_message(message, where: str) -> str:
    """A message's role, once its fields are checked."""
    if not isinstance(message, dict):
        raise ConversationError(f"{where} must be an object with a role and content; got {_kind(message)}", where)
    role = message.get("role")
    if role not in ROLES:
        raise ConversationError(f"{where}.role must be one of {', '.join(ROLES)}; got {_show(role)}", f"{where}.role")
    for key, value in message.items():
        if key == "role" or key in FIELDS[role]:
            continue
        if key in EMPTY_FIELDS:
            if value is None or value == "" or value == []:
                continue
            raise ConversationError(f"{where}.{key} is not supported; leave it out", f"{where}.{key}")
        raise ConversationError(
            f"{where} has an unknown field {key!r}; a {role} message has role, {', '.join(FIELDS[role])}",
            f"{where}.{key}",
        )
    return role


def _reasoning(message: dict, where: str) -> str | None:
    given = [key for key in REASONING_FIELDS if message.get(key) is not None]
    if len(given) > 1:
        raise ConversationError(
            f"{where} has both {given[0]} and {given[1]}; give the reasoning once", f"{where}.{given[1]}"
        )
    if not given:
        return None
    if not isinstance(message[given[0]], str):
        raise ConversationError(
            f"{where}.{given[0]} must be a string; got {_kind(message[given[0]])}", f"{where}.{given[0]}"
        )
    return message[given[0]]


def _required_text(message: dict, role: str, where: str) -> str:
    text = _text(message.get("content"), f"{where}.content")
    if text is None:
        raise ConversationError(f"{where}.content is missing; a {role} message needs text content", f"{where}.content")
    return text


def _text(content, where: str) -> str | None:
    """A content field as text: a string, or a list of text parts joined with nothing; None stays None."""
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ConversationError(f"{where} must be a string or a list of text parts; got {_kind(content)}", where)
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text":
            raise ConversationError(
                f'{where}[{j}] must be a text part {{"type": "text", "text": ...}} (gpt-oss '
                f"reads text only); got {_show(part)}",
                f"{where}[{j}]",
            )
        if not isinstance(part.get("text"), str):
            raise ConversationError(
                f"{where}[{j}].text must be a string; got {_kind(part.get('text'))}", f"{where}[{j}].text"
            )
        texts.append(part["text"])
    return "".join(texts)


def _check_object(value, where: str, keys: Sequence[str]) -> None:
    if not isinstance(value, dict):
        raise ConversationError(f"{where} must be an object; got {_kind(value)}", where)
    for key in value:
        if key not in keys:
            raise ConversationError(f"{where} has an unknown field {key!r}; it has {', '.join(keys)}", f"{where}.{key}")


def _check_effort(effort) -> None:
    if effort not in REASONING_EFFORTS:
        raise ConversationError(
            f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}; got {_show(effort)}", "reasoning_effort"
        )


def _kind(value) -> str:
    """The JSON type of a value, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def _show(value) -> str:
    """A value for error messages, cut short: a string quoted as Python quotes it, anything else as JSON."""
    try:
        text = repr(value) if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ------------------------------------------------------------------------------------------------------ rendering
def render_prompt(harmony: Harmony, messages: Sequence[Message]) -> list[int]:
    """The prompt for the next assistant reply: the history (finished turns' analysis dropped), `<|start|>assistant`."""
    return harmony.render_for_completion(_history(messages), drop_analysis=False)


def render_training(harmony: Harmony, messages: Sequence[Message]) -> tuple[list[int], list[bool]]:
    """(tokens, mask) of a conversation to train on; mask[i]: token i is one the model must write (module docstring).
    The trained turn is the messages after the last user message; it must end with a final answer or a tool call."""
    start = 1 + max((i for i, m in enumerate(messages) if m.role == "user"), default=-1)
    turn = messages[start:]
    if not any(m.role == "assistant" for m in turn):
        raise ConversationError(
            "nothing to train on: the conversation needs assistant messages after its last user message"
        )
    last = turn[-1]
    if last.role != "assistant" or (last.channel != "final" and not last.recipient):
        ending = (
            f"a {last.role} message"
            if last.role != "assistant"
            else f"an assistant message on channel {last.channel!r}"
        )
        raise ConversationError(
            f"the conversation ends with {ending}; a conversation to train on must end with the "
            "assistant's final answer or a tool call"
        )
    tokens = harmony.render_conversation(_history(messages[:start]), drop_analysis=False)
    mask = [False] * len(tokens)
    given = 1 + len(harmony.text("assistant"))  # `<|start|>assistant`, when a prompt ends with it
    previous = messages[start - 1] if start else None
    for i, message in enumerate(turn):
        rendered = harmony.render(message)
        if i == len(turn) - 1 and message.channel == "final" and not message.recipient:
            rendered[-1] = harmony.return_
        if message.role != "assistant":
            supervised_from = len(rendered)
        elif previous is not None and previous.role == "assistant" and not previous.recipient:
            supervised_from = 0  # after its own <|end|> the model writes the next <|start|>assistant itself
        else:
            supervised_from = given
        tokens += rendered
        mask += [False] * supervised_from + [True] * (len(rendered) - supervised_from)
        previous = message
    return tokens, mask


def _history(messages: Sequence[Message]) -> list[Message]:
    """The messages without the analysis of finished turns: those before the last final message."""
    last_final = max((i for i, m in enumerate(messages) if m.role == "assistant" and m.channel == "final"), default=-1)
    return [
        m for i, m in enumerate(messages) if not (i < last_final and m.role == "assistant" and m.channel == "analysis")
    ]


def show_supervised(harmony: Harmony, tokens: Sequence[int], mask: Sequence[bool], *, color: bool = False) -> str:
    """The rendered conversation as text for a person to check (`ossgpt sft --show`): special tokens as their text,
    one line per message (a line break after each <|end|>, <|return|> and <|call|>), and the supervised tokens
    wrapped in [[ ]] (color=False) or shown green (color=True, ANSI escapes)."""
    if len(tokens) != len(mask):
        raise ValueError(f"tokens and mask differ in length ({len(tokens)} and {len(mask)})")
    opening, closing = (GREEN, RESET) if color else ("[[", "]]")
    out: list[str] = []
    run: list[int] = []

    def flush(supervised: bool) -> None:
        if run:
            text = harmony.decode(run)
            out.append(f"{opening}{text}{closing}" if supervised else text)
            run.clear()

    for i, (token, supervised) in enumerate(zip(tokens, mask)):
        if i and supervised != mask[i - 1]:
            flush(mask[i - 1])
        run.append(token)
        if token in harmony.message_end_ids:
            flush(supervised)
            out.append("\n")
    flush(bool(mask) and mask[-1])
    return "".join(out)


# --------------------------------------------------------------------------------------------- Harmony -> OpenAI
def openai_reply(messages: Sequence[Message]) -> tuple[dict, str]:
    """A completion's parsed messages -> (an OpenAI assistant message, its finish reason).

    The message: content = the text of the final and other user-visible messages (commentary preambles, text
    outside any channel), joined by blank lines, or None; reasoning = the analysis messages' text, or None;
    tool_calls (present only when the reply calls a tool) = [{"id", "type": "function", "function": {"name",
    "arguments": the raw JSON string}}], ids "call_" + a hash of the reply, the same for the same reply. Messages
    by other authors than the assistant (a model imitating a tool) are left out.
    finish reason: "tool_calls" if the reply ends with a tool call, else "stop".
    """
    replies = [m for m in messages if m.role == "assistant"]
    key = json.dumps([[m.channel, m.recipient, m.content] for m in replies])
    reasoning = [m.content for m in replies if m.channel == "analysis" and not m.recipient]
    visible = [m.content for m in replies if m.channel != "analysis" and not m.recipient]
    calls = [m for m in replies if m.recipient]
    reply: dict = {
        "role": "assistant",
        "content": "\n\n".join(visible) if visible else None,
        "reasoning": "\n\n".join(reasoning) if reasoning else None,
    }
    if calls:
        reply["tool_calls"] = [
            {
                "id": "call_" + hashlib.sha256(f"{key}#{i}".encode()).hexdigest()[:24],
                "type": "function",
                "function": {"name": m.recipient.removeprefix("functions."), "arguments": m.content},
            }
            for i, m in enumerate(calls)
        ]
    return reply, "tool_calls" if replies and replies[-1].recipient else "stop"
