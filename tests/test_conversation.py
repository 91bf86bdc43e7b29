"""OpenAI chat conversations -> Harmony tokens and loss masks, checked against openai-harmony.

Every rendering is compared token for token with OpenAI's renderer (openai-harmony) on the real o200k_harmony
vocabulary, the openai-harmony conversation written out by hand from the OpenAI messages. Both need o200k_base's
ranks offline: from TIKTOKEN_ENCODINGS_BASE (a folder holding o200k_base.tiktoken) or tiktoken's cache
(TIKTOKEN_CACHE_DIR); without them those tests skip. The error tests need neither.
"""

import hashlib
import os
from pathlib import Path

import pytest

from ossgpt.chat.conversation import (
    ConversationError,
    conversation_from_json,
    harmony_messages,
    openai_reply,
    parse_tools,
    render_prompt,
    render_training,
    show_supervised,
)
from ossgpt.chat.harmony import FunctionTool, Harmony, Message, developer_content
from ossgpt.tokenizer import HarmonyTokenizer

try:
    import openai_harmony as oh
except ImportError:  # a dev dependency: the comparisons skip without it
    oh = None

O200K_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"


def o200k_base() -> tuple[Path, dict[str, str | None]] | None:
    """o200k_base's ranks file, and the environment under which openai-harmony reads it offline."""
    folder = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
    if folder and (Path(folder) / "o200k_base.tiktoken").is_file():
        return Path(folder) / "o200k_base.tiktoken", {}
    cache = os.environ.get("TIKTOKEN_CACHE_DIR")  # tiktoken's cache names files by the sha1 of their address
    if cache and (Path(cache) / hashlib.sha1(O200K_URL.encode()).hexdigest()).is_file():
        # openai-harmony's own cache (TIKTOKEN_RS_CACHE_DIR) names them the same way.
        return Path(cache) / hashlib.sha1(O200K_URL.encode()).hexdigest(), {
            "TIKTOKEN_RS_CACHE_DIR": cache,
            "TIKTOKEN_ENCODINGS_BASE": None,
        }
    return None


NO_VOCABULARY = "o200k_base.tiktoken is not available offline (set TIKTOKEN_ENCODINGS_BASE or TIKTOKEN_CACHE_DIR)"


@pytest.fixture(scope="module")
def harmony() -> Harmony:
    found = o200k_base()
    if found is None:
        pytest.skip(NO_VOCABULARY)
    return Harmony(HarmonyTokenizer("o200k_harmony", vocab_file=found[0]))


@pytest.fixture(scope="module")
def encoding():
    if oh is None:
        pytest.skip("openai-harmony is not installed (pip install openai-harmony)")
    found = o200k_base()
    if found is None:
        pytest.skip(NO_VOCABULARY)
    with pytest.MonkeyPatch.context() as env:
        for key, value in found[1].items():
            if value is None:
                env.delenv(key, raising=False)
            else:
                env.setenv(key, value)
        return oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)


# -------------------------------------------------------------------------------------- openai-harmony's side
def oh_message(role, content, channel=None, recipient=None, content_type=None, name=None):
    """An openai-harmony message; content: text, a list of texts (one TextContent each) or a System/DeveloperContent."""
    message = oh.Message(author=oh.Author(role=oh.Role(role), name=name))
    for part in content if isinstance(content, list) else [content]:
        message = message.adding_content(part)
    message.channel, message.recipient, message.content_type = channel, recipient, content_type
    return message


def oh_system(effort="medium", date=None):
    content = oh.SystemContent.new().with_reasoning_effort(oh.ReasoningEffort(effort.capitalize()))
    return oh_message("system", content.with_conversation_start_date(date) if date else content)


def oh_developer(instructions=None, tools=()):
    content = oh.DeveloperContent.new()
    content = content.with_instructions(instructions) if instructions is not None else content
    if tools:
        content = content.with_function_tools([oh.ToolDescription.new(**t["function"]) for t in tools])
    return oh_message("developer", content)


def oh_call(name, arguments):
    return oh_message("assistant", arguments, "commentary", f"functions.{name}", "<|constrain|>json")


def oh_result(name, text):
    return oh_message("tool", text, "commentary", "assistant", name=f"functions.{name}")


def theirs_prompt(encoding, messages, drop_analysis=True) -> list[int]:
    config = oh.RenderConversationConfig(auto_drop_analysis=drop_analysis)
    return encoding.render_conversation_for_completion(
        oh.Conversation.from_messages(messages), oh.Role.ASSISTANT, config
    )


def theirs_training(encoding, messages, drop_analysis=True) -> list[int]:
    config = oh.RenderConversationConfig(auto_drop_analysis=drop_analysis)
    return encoding.render_conversation_for_training(oh.Conversation.from_messages(messages), config)


# ---------------------------------------------------------------------------------------------- conversations
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Gets the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city, e.g. Paris"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
            },
            "required": ["city"],
        },
    },
}
LOCATION = {"type": "function", "function": {"name": "get_location", "description": "Gets the user's city."}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}

SIMPLE = [
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "reasoning": "Simple arithmetic.", "content": "4"},
]
TOOL_CHAIN = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "reasoning": "I need the weather tool.", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "sunny", "celsius": 21}'},
    {"role": "assistant", "reasoning": "It is sunny.", "content": "Sunny, 21 °C."},
]
THREE_TURNS = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "reasoning": "Greet back.", "content": "Hello!"},
    {"role": "user", "content": "What is 3 + 5?"},
    {"role": "assistant", "reasoning": "Add them.", "content": "8"},
    {"role": "user", "content": "And doubled?"},
    {"role": "assistant", "reasoning": "16.", "content": "16"},
]
SYSTEM_MEDIUM = (
    "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\nKnowledge cutoff: 2024-06"
    "\n\nReasoning: medium\n\n# Valid channels: analysis, commentary, final. Channel must be included for every "
    "message.<|end|>"
)


def supervised_spans(harmony, tokens, mask) -> list[str]:
    """The text of each run of supervised tokens."""
    spans, run = [], []
    for token, supervised in [*zip(tokens, mask), (None, False)]:
        if supervised:
            run.append(token)
        elif run:
            spans.append(harmony.decode(run))
            run = []
    return spans


# -------------------------------------------------------------------------------- rendering = openai-harmony
@pytest.mark.parametrize(
    "instructions, tools, effort, date",
    [("Be brief.", [WEATHER, LOCATION], "high", "2025-06-28"), (None, [LOCATION], "low", None),
     ("Be brief.", None, "medium", None), (None, None, "medium", "2025-01-01")],
)  # fmt: skip
def test_system_developer_and_tools(harmony, encoding, instructions, tools, effort, date):
    messages = [{"role": "system", "content": instructions}] if instructions else []
    messages.append({"role": "user", "content": "Hi"})
    ours = render_prompt(harmony, harmony_messages(messages, tools, reasoning_effort=effort, current_date=date))
    theirs = [oh_system(effort, date)]
    theirs += [oh_developer(instructions, tools or ())] if instructions or tools else []  # none when empty
    assert ours == theirs_prompt(encoding, [*theirs, oh_message("user", "Hi")])


def parts(*texts: str) -> list[dict]:
    return [{"type": "text", "text": text} for text in texts]


def test_instructions_from_several_messages_and_content_parts(harmony, encoding):
    """System and developer texts join with a blank line, text parts with nothing. openai-harmony tokenizes each part
    on its own; here the joined text is tokenized whole, so the tokens agree where parts meet between pre-tokens
    (words, punctuation) and differ, the text not, where a part boundary cuts one."""
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": parts("Answer ", "in French.")},
        {"role": "user", "content": parts("Bonjour,", " ça va ?")},
        {"role": "assistant", "content": parts("Oui.")},
    ]
    ours = render_training(harmony, harmony_messages(messages))[0]
    theirs = [oh_system(), oh_developer("Be brief.\n\nAnswer in French."), oh_message("user", ["Bonjour,", " ça va ?"]),
              oh_message("assistant", "Oui.", "final")]  # fmt: skip
    assert ours == theirs_training(encoding, theirs)

    cut = render_prompt(harmony, harmony_messages([{"role": "user", "content": parts("Bonj", "our")}]))
    theirs_cut = theirs_prompt(encoding, [oh_system(), oh_message("user", ["Bonj", "our"])])
    assert cut != theirs_cut and harmony.decode(cut) == encoding.decode(theirs_cut)
    assert cut == theirs_prompt(encoding, [oh_system(), oh_message("user", "Bonjour")])


@pytest.mark.parametrize("field", ["reasoning", "reasoning_content", "thinking"])
def test_reasoning_and_final(harmony, encoding, field):
    messages = [SIMPLE[0], {"role": "assistant", field: "Simple arithmetic.", "content": "4"}]
    tokens, _ = render_training(harmony, harmony_messages(messages))
    expected = [oh_system(), oh_message("user", "What is 2 + 2?"), oh_message("assistant", "Simple arithmetic.",
                "analysis"), oh_message("assistant", "4", "final")]  # fmt: skip
    assert tokens == theirs_training(encoding, expected, drop_analysis=False)
    # openai-harmony's default drops the analysis before the first final message: the very reasoning trained on.
    assert theirs_training(encoding, expected) == theirs_training(encoding, expected[:2] + expected[3:])


def test_tool_call_chain(harmony, encoding):
    """Analysis, call, tool result, analysis, final: the training render and the prompt at each step."""
    ours = harmony_messages(TOOL_CHAIN, [WEATHER])
    theirs = [
        oh_system(), oh_developer("Be brief.", [WEATHER]), oh_message("user", "Weather in Paris?"),
        oh_message("assistant", "I need the weather tool.", "analysis"), oh_call("get_weather", '{"city": "Paris"}'),
        oh_result("get_weather", '{"sky": "sunny", "celsius": 21}'),
        oh_message("assistant", "It is sunny.", "analysis"), oh_message("assistant", "Sunny, 21 °C.", "final"),
    ]  # fmt: skip
    assert len(ours) == len(theirs)
    assert render_training(harmony, ours)[0] == theirs_training(encoding, theirs, drop_analysis=False)
    for step in (3, 5, 6):  # the prompts for the first reply, after the tool result, after the analysis
        assert render_prompt(harmony, ours[:step]) == theirs_prompt(encoding, theirs[:step])


def test_tool_results_by_name_and_parallel_calls(harmony, encoding):
    other = {"id": "call_2", "type": "function", "function": {"name": "get_location", "arguments": "{}"}}
    messages = [
        {"role": "user", "content": "Weather here and in Paris?"},
        {"role": "assistant", "content": "Checking both.", "tool_calls": [other, CALL]},
        {"role": "tool", "name": "get_location", "content": "Lyon"},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    ours = render_prompt(harmony, harmony_messages(messages, [WEATHER, LOCATION]))
    assert ours == theirs_prompt(encoding, [
        oh_system(), oh_developer(None, [WEATHER, LOCATION]), oh_message("user", "Weather here and in Paris?"),
        oh_message("assistant", "Checking both.", "commentary"),  # text beside tool calls: a preamble
        oh_call("get_location", "{}"), oh_call("get_weather", '{"city": "Paris"}'),
        oh_result("get_location", "Lyon"), oh_result("get_weather", "sunny"),
    ])  # fmt: skip


def test_earlier_turns_drop_their_analysis(harmony, encoding):
    """Two turns: openai-harmony drops the analysis before the first final message, as here."""
    ours = harmony_messages(THREE_TURNS[:4])
    theirs = [
        oh_system(), oh_message("user", "Hi"), oh_message("assistant", "Greet back.", "analysis"),
        oh_message("assistant", "Hello!", "final"), oh_message("user", "What is 3 + 5?"),
        oh_message("assistant", "Add them.", "analysis"), oh_message("assistant", "8", "final"),
    ]  # fmt: skip
    assert render_training(harmony, ours)[0] == theirs_training(encoding, theirs)
    assert render_prompt(harmony, ours[:5]) == theirs_prompt(encoding, theirs[:5])
    assert "Greet back." not in harmony.decode(render_prompt(harmony, ours[:5]))


def test_where_openai_harmony_keeps_finished_analysis(harmony, encoding):
    """openai-harmony 0.0.8 keeps the second turn's analysis in the third turn, and a finished turn's analysis while
    a tool call is in progress; both are dropped here (the Harmony guide, the gpt-oss chat template)."""
    ours = harmony_messages(THREE_TURNS)
    theirs = [oh_system()]
    for user, assistant in zip(THREE_TURNS[::2], THREE_TURNS[1::2]):
        theirs += [oh_message("user", user["content"]), oh_message("assistant", assistant["reasoning"], "analysis"),
                   oh_message("assistant", assistant["content"], "final")]  # fmt: skip
    without_finished = [theirs[i] for i in (0, 1, 3, 4, 6, 7, 8, 9)]
    assert render_training(harmony, ours)[0] == theirs_training(encoding, without_finished, drop_analysis=False)
    assert render_training(harmony, ours)[0] != theirs_training(encoding, theirs)  # theirs keeps "Add them."

    chain = harmony_messages([*THREE_TURNS[:3], *TOOL_CHAIN[2:4]], [WEATHER])
    theirs_chain = [*theirs[:1], oh_developer(None, [WEATHER]), *theirs[1:5],
                    oh_message("assistant", "I need the weather tool.", "analysis"),
                    oh_call("get_weather", '{"city": "Paris"}'),
                    oh_result("get_weather", '{"sky": "sunny", "celsius": 21}')]  # fmt: skip
    assert render_prompt(harmony, chain) == theirs_prompt(encoding, [m for i, m in enumerate(theirs_chain) if i != 3])
    assert render_prompt(harmony, chain) != theirs_prompt(encoding, theirs_chain)  # theirs keeps "Greet back."


@pytest.mark.parametrize(
    "parameters",
    [
        None,
        {},
        {"type": "object", "properties": {}},
        {"type": "object", "description": "Where.", "properties": {
            "at": {"type": "object", "description": "A point", "properties": {
                "lat": {"type": "number", "description": "Latitude"}, "lon": {"type": "number"}}, "required": ["lat"]},
            "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}},
            "note": {"type": ["string", "null"]}, "n": {"type": "integer", "nullable": True, "default": 3},
            "flag": {"type": "boolean", "default": False}, "any": {"anyOf": [{"type": "string"}, {"type": "number"}]},
            "ids": {"type": "array", "default": [1, 2]}, "opts": {"type": "object", "default": {"a": "é"}}},
         "required": ["at"]},
        {"type": "object", "properties": {  # oneOf unions: openai-harmony writes one variant a line
            "x": {"oneOf": [{"type": "string", "description": "as text"}, {"type": "integer"}]},
            "y": {"description": "Same", "oneOf": [{"type": "string", "description": "Same"},
                                                   {"type": "integer", "description": "Other", "default": 3}]},
            "z": {"description": "Z", "default": "q", "oneOf": [
                {"type": "string", "nullable": True}, {"type": "object", "properties": {"a": {"type": "string"}}}]},
            "w": {"type": "array", "items": {"oneOf": [{"type": "string"}, {"type": "number", "default": 2}]}}},
         "required": ["y"]},
        {"type": "object", "properties": {"q": {"type": "string", "title": "Query", "description": "What to find",
                                                "examples": ["cats", 3, "dogs"]}}},
    ],
)  # fmt: skip
def test_tool_schemas(harmony, encoding, parameters):
    """The developer message's TypeScript rendering of JSON schemas, against openai-harmony's."""
    function = {"name": "f", "description": "Does f.\nTwo lines."}
    tool = {"type": "function", "function": function if parameters is None else {**function, "parameters": parameters}}
    ours = harmony.render(Message("developer", developer_content(None, parse_tools([tool]))))
    assert ours == encoding.render(oh_developer(None, [tool]))


# --------------------------------------------------------------------------------------------------- the mask
def test_mask_by_hand(harmony):
    tokens, mask = render_training(harmony, harmony_messages(SIMPLE))
    assert show_supervised(harmony, tokens, mask) == (
        f"{SYSTEM_MEDIUM}\n<|start|>user<|message|>What is 2 + 2?<|end|>\n<|start|>assistant[[<|channel|>analysis"
        "<|message|>Simple arithmetic.<|end|>]]\n[[<|start|>assistant<|channel|>final<|message|>4<|return|>]]\n"
    )
    tokens, mask = render_training(harmony, harmony_messages(TOOL_CHAIN, [WEATHER]))
    assert supervised_spans(harmony, tokens, mask) == [
        "<|channel|>analysis<|message|>I need the weather tool.<|end|><|start|>assistant to=functions.get_weather"
        '<|channel|>commentary <|constrain|>json<|message|>{"city": "Paris"}<|call|>',
        "<|channel|>analysis<|message|>It is sunny.<|end|><|start|>assistant<|channel|>final<|message|>Sunny, 21 °C."
        "<|return|>",
    ]
    shown = show_supervised(harmony, tokens, mask)
    assert shown[shown.index("<|start|>user") :] == (
        "<|start|>user<|message|>Weather in Paris?<|end|>\n<|start|>assistant[[<|channel|>analysis<|message|>I need "
        "the weather tool.<|end|>]]\n[[<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>"
        'json<|message|>{"city": "Paris"}<|call|>]]\n<|start|>functions.get_weather to=assistant<|channel|>commentary'
        '<|message|>{"sky": "sunny", "celsius": 21}<|end|>\n<|start|>assistant[[<|channel|>analysis<|message|>It is '
        "sunny.<|end|>]]\n[[<|start|>assistant<|channel|>final<|message|>Sunny, 21 °C.<|return|>]]\n"
    )


def test_mask_of_a_reply_ending_in_parallel_calls(harmony):
    """After a <|call|> the runtime writes the next `<|start|>assistant`; the model writes the rest."""
    other = {"id": "call_2", "type": "function", "function": {"name": "get_location", "arguments": "{}"}}
    messages = [{"role": "user", "content": "Where and how warm?"},
                {"role": "assistant", "content": "Looking.", "tool_calls": [other, CALL]}]  # fmt: skip
    tokens, mask = render_training(harmony, harmony_messages(messages, [WEATHER, LOCATION]))
    assert supervised_spans(harmony, tokens, mask) == [
        "<|channel|>commentary<|message|>Looking.<|end|><|start|>assistant to=functions.get_location<|channel|>"
        "commentary <|constrain|>json<|message|>{}<|call|>",
        ' to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>{"city": "Paris"}<|call|>',
    ]


@pytest.mark.parametrize("conversation", ["simple", "tool chain", "three turns", "parallel"])
def test_mask_invariants(harmony, conversation):
    """The supervised tokens are exactly what sampling writes: each run follows the prompt for that point of the
    conversation (render_prompt), ends with a stop token, and parses back into the trained messages."""
    other = {"id": "call_2", "type": "function", "function": {"name": "get_location", "arguments": "{}"}}
    messages = harmony_messages(*{
        "simple": (SIMPLE,), "tool chain": (TOOL_CHAIN, [WEATHER]), "three turns": (THREE_TURNS,),
        "parallel": ([*TOOL_CHAIN[:2], {"role": "assistant", "content": None, "tool_calls": [other, CALL]}],
                     [WEATHER, LOCATION]),
    }[conversation])  # fmt: skip
    tokens, mask = render_training(harmony, messages)
    assert len(tokens) == len(mask) and mask[-1]
    trained_from = 1 + max(i for i, m in enumerate(messages) if m.role == "user")
    assert not any(mask[: len(render_prompt(harmony, messages[:trained_from]))])
    runs = [i for i in range(len(mask)) if mask[i] and not mask[i - 1]]
    parsed = []
    for start in runs:
        end = mask.index(False, start) if False in mask[start:] else len(mask)
        assert tokens[end - 1] in harmony.stop_token_ids
        prompts = [render_prompt(harmony, messages[:j]) for j in range(trained_from, len(messages))]
        assert tokens[:start] in prompts
        parsed += harmony.parse(tokens[start:end])
    assert parsed == [m for m in messages[trained_from:] if m.role == "assistant"]


def test_show_supervised_in_color(harmony):
    tokens, mask = render_training(harmony, harmony_messages([SIMPLE[0], {"role": "assistant", "content": "4"}]))
    assert show_supervised(harmony, tokens, mask, color=True).endswith(
        "<|start|>assistant\x1b[32m<|channel|>final<|message|>4<|return|>\x1b[0m\n"
    )
    with pytest.raises(ValueError, match="differ in length"):
        show_supervised(harmony, tokens, mask[:-1])


def test_multilingual_thinking_record(harmony):
    """A row of HuggingFaceH4/Multilingual-Thinking: `thinking` on every message, null except the assistant's."""
    record = {"messages": [
        {"role": "system", "content": "reasoning language: French\n\nYou are a helpful assistant.", "thinking": None},
        {"role": "user", "content": "Quelle est la capitale de la France ?", "thinking": None},
        {"role": "assistant", "content": "Paris.", "thinking": "La capitale de la France est Paris."},
    ]}  # fmt: skip
    messages, tools, effort = conversation_from_json(record)
    assert tools is None and effort is None
    conversation = harmony_messages(messages)
    assert conversation[1] == Message("developer", "# Instructions\n\nreasoning language: French\n\nYou are a helpful "
                                                   "assistant.")  # fmt: skip
    tokens, mask = render_training(harmony, conversation)
    assert supervised_spans(harmony, tokens, mask) == [
        "<|channel|>analysis<|message|>La capitale de la France est Paris.<|end|><|start|>assistant<|channel|>final"
        "<|message|>Paris.<|return|>"
    ]
    assert conversation_from_json({**record, "tools": [WEATHER], "reasoning_effort": "high"})[1:] == ([WEATHER], "high")


# ---------------------------------------------------------------------------------------------- openai_reply
def test_openai_reply(harmony):
    def reply(output: str):
        return openai_reply(harmony.parse(harmony.tokenizer.encode(output, allowed_special="all")))

    assert reply(
        "<|channel|>analysis<|message|>Simple arithmetic.<|end|><|start|>assistant<|channel|>final<|message|>4"
        "<|return|>"
    ) == ({"role": "assistant", "content": "4", "reasoning": "Simple arithmetic."}, "stop")
    call = (
        "<|channel|>analysis<|message|>I need the weather tool.<|end|><|start|>assistant<|channel|>commentary "
        'to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>'
    )
    message, finish = reply(call)
    assert finish == "tool_calls" and message["content"] is None and message["reasoning"] == "I need the weather tool."
    (tool_call,) = message["tool_calls"]
    assert tool_call["id"].startswith("call_") and tool_call["id"] == reply(call)[0]["tool_calls"][0]["id"]
    assert tool_call["id"] != reply(call.replace("Paris", "Lyon"))[0]["tool_calls"][0]["id"]
    function = {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert {**tool_call, "id": "x"} == {"id": "x", "type": "function", "function": function}
    preamble = reply(
        "<|channel|>commentary<|message|>Checking.<|end|><|start|>assistant" + call.split("assistant", 1)[1]
    )
    assert preamble[0]["content"] == "Checking." and preamble[1] == "tool_calls"
    assert reply("<|channel|>analysis<|message|>Hmm") == ({"role": "assistant", "content": None,
                                                           "reasoning": "Hmm"}, "stop")  # fmt: skip


def test_reply_round_trip(harmony):
    """A reply turned into an OpenAI message and sent back converts to the same Harmony messages."""
    output = (
        "<|channel|>analysis<|message|>I need the weather tool.<|end|><|start|>assistant<|channel|>commentary"
        "<|message|>Checking.<|end|><|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json"
        '<|message|>{"city": "Paris"}<|call|>'
    )
    parsed = harmony.parse(harmony.tokenizer.encode(output, allowed_special="all"))
    message, _ = openai_reply(parsed)
    result = {"role": "tool", "tool_call_id": message["tool_calls"][0]["id"], "content": "sunny"}
    conversation = harmony_messages([TOOL_CHAIN[1], message, result], [WEATHER])
    assert conversation[3:-1] == parsed
    assert conversation[-1] == Message("tool", "sunny", "commentary", "assistant", name="functions.get_weather")


def test_repeated_call_ids_answer_the_latest_call():
    """Ids are only unique per reply (openai_reply's hash), so a result answers the latest call with its id."""

    def turn(name, arguments):
        call = {"id": "call_0", "type": "function", "function": {"name": name, "arguments": arguments}}
        return {"role": "assistant", "content": None, "tool_calls": [call]}

    conversation = harmony_messages([
        {"role": "user", "content": "Where, then how warm?"}, turn("get_location", "{}"),
        {"role": "tool", "tool_call_id": "call_0", "content": "Lyon"}, turn("get_weather", '{"city": "Lyon"}'),
        {"role": "tool", "tool_call_id": "call_0", "content": "sunny"},
    ], [WEATHER, LOCATION])  # fmt: skip
    assert [m.name for m in conversation if m.role == "tool"] == ["functions.get_location", "functions.get_weather"]


# ---------------------------------------------------------------------------------------------------- errors
USER = {"role": "user", "content": "Hi"}
ASKS = {"role": "assistant", "content": None, "tool_calls": [CALL]}


def call_with(**function):
    call = {"id": "c", "type": "function", "function": {"name": "get_weather", **function}}
    return {"role": "assistant", "content": None, "tool_calls": [call]}


@pytest.mark.parametrize(
    "messages, options, error, param",
    [
        ("hi", {}, "messages must be a non-empty list of messages; got a string", "messages"),
        ([], {}, "messages must be a non-empty list", "messages"),
        (["hi"], {}, "messages[0] must be an object with a role and content; got a string", "messages[0]"),
        ([USER, USER, {"role": "bot", "content": "x"}], {},
         "messages[2].role must be one of system, developer, user, assistant, tool; got 'bot'", "messages[2].role"),
        ([{"content": "x"}], {}, "messages[0].role must be one of system, developer, user, assistant, tool; got null",
         "messages[0].role"),
        ([{"role": "user"}], {}, "messages[0].content is missing; a user message needs text content",
         "messages[0].content"),
        ([{"role": "user", "content": 7}], {}, "messages[0].content must be a string or a list of text parts; got a "
         "number", "messages[0].content"),
        ([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": "u"}]}], {},
         "messages[0].content[1] must be a text part", "messages[0].content[1]"),
        ([{"role": "user", "content": [{"type": "text", "text": None}]}], {},
         "messages[0].content[0].text must be a string; got null", "messages[0].content[0].text"),
        ([{"role": "user", "content": "x", "tool_call": []}], {}, "messages[0] has an unknown field 'tool_call'; a "
         "user message has role, content", "messages[0].tool_call"),
        ([USER, {"role": "assistant", "content": "", "refusal": "No."}], {},
         "messages[1].refusal is not supported; leave it out", "messages[1].refusal"),
        ([USER, {"role": "system", "content": "x"}], {}, "messages[1] is a system message after the conversation "
         "started; put system and developer messages first", "messages[1].role"),
        ([USER, {"role": "assistant", "reasoning": "r"}], {}, "messages[1].content is missing; an assistant message "
         "needs content unless it has tool_calls", "messages[1].content"),
        ([USER, {"role": "assistant", "content": "a", "reasoning": "r", "thinking": "t"}], {},
         "messages[1] has both reasoning and thinking; give the reasoning once", "messages[1].thinking"),
        ([USER, {"role": "assistant", "content": "a", "reasoning": ["r"]}], {},
         "messages[1].reasoning must be a string; got a list", "messages[1].reasoning"),
        ([USER, {"role": "assistant", "content": None, "tool_calls": {"id": "c"}}], {"tools": [WEATHER]},
         "messages[1].tool_calls must be a list; got an object", "messages[1].tool_calls"),
        ([USER, {"role": "assistant", "tool_calls": ["c"]}], {"tools": [WEATHER]},
         "messages[1].tool_calls[0] must be an object; got a string", "messages[1].tool_calls[0]"),
        ([USER, {"role": "assistant", "tool_calls": [{**CALL, "type": "custom"}]}], {"tools": [WEATHER]},
         "messages[1].tool_calls[0].type must be 'function'; got 'custom'", "messages[1].tool_calls[0].type"),
        ([USER, {"role": "assistant", "tool_calls": [{**CALL, "id": 3}]}], {"tools": [WEATHER]},
         "messages[1].tool_calls[0].id must be a string; got a number", "messages[1].tool_calls[0].id"),
        ([USER, ASKS], {"tools": [LOCATION]}, "messages[1].tool_calls[0].function.name 'get_weather' is not one of "
         "the tools (get_location); declare every function", "messages[1].tool_calls[0].function.name"),
        ([USER, ASKS], {}, "messages[1].tool_calls[0].function.name 'get_weather' is not a tool (there are none)",
         "messages[1].tool_calls[0].function.name"),
        ([USER, call_with(arguments={"city": "Paris"})], {"tools": [WEATHER]},
         "messages[1].tool_calls[0].function.arguments must be a JSON string (json.dumps of the arguments); got "
         '{"city": "Paris"}', "messages[1].tool_calls[0].function.arguments"),
        ([USER, call_with(arguments="{city: Paris}")], {"tools": [WEATHER]},
         "messages[1].tool_calls[0].function.arguments must be a JSON string",
         "messages[1].tool_calls[0].function.arguments"),
        ([USER, call_with(arguments="{}", strict=True)], {"tools": [WEATHER]},
         "messages[1].tool_calls[0].function has an unknown field 'strict'",
         "messages[1].tool_calls[0].function.strict"),
        ([USER, ASKS, {"role": "tool", "content": "sunny"}], {"tools": [WEATHER]},
         "messages[2] needs tool_call_id: the id of the tool call it answers", "messages[2]"),
        ([USER, ASKS, {"role": "tool", "tool_call_id": "call_9", "content": "sunny"}], {"tools": [WEATHER]},
         "messages[2].tool_call_id 'call_9' matches no earlier tool call", "messages[2].tool_call_id"),
        ([USER, ASKS, {"role": "tool", "tool_call_id": 1, "content": "sunny"}], {"tools": [WEATHER]},
         "messages[2].tool_call_id must be a string; got a number", "messages[2].tool_call_id"),
        ([USER, ASKS, {"role": "tool", "tool_call_id": "call_1", "name": "get_time", "content": "sunny"}],
         {"tools": [WEATHER]}, "messages[2].name 'get_time' differs from the function its tool_call_id called "
         "('get_weather')", "messages[2].name"),
        ([USER, {"role": "tool", "name": "get_weather", "content": "sunny"}], {"tools": [WEATHER]},
         "messages[1].name 'get_weather' matches no earlier tool call", "messages[1].name"),
        ([USER, ASKS, {"role": "tool", "name": ["get_weather"], "content": "sunny"}], {"tools": [WEATHER]},
         'messages[2].name ["get_weather"] matches no earlier tool call', "messages[2].name"),
        ([USER, ASKS, {"role": "tool", "tool_call_id": "call_1"}], {"tools": [WEATHER]},
         "messages[2].content is missing; a tool message needs text content", "messages[2].content"),
        ([USER], {"reasoning_effort": "extreme"}, "reasoning_effort must be one of low, medium, high; got 'extreme'",
         "reasoning_effort"),
        ([USER], {"current_date": "June 1st"}, "current_date must be a date YYYY-MM-DD; got 'June 1st'",
         "current_date"),
        ([USER], {"tools": {"get_weather": {}}}, "tools must be a list of tools; got an object", "tools"),
        ([USER], {"tools": ["get_weather"]}, "tools[0] must be an object; got a string", "tools[0]"),
        ([USER], {"tools": [{"type": "retrieval"}]}, "tools[0].type must be 'function'; got 'retrieval'",
         "tools[0].type"),
        ([USER], {"tools": [{"type": "function"}]}, "tools[0].function must be an object; got null",
         "tools[0].function"),
        ([USER], {"tools": [{"type": "function", "function": {"name": "f", "parameter": {}}}]},
         "tools[0].function has an unknown field 'parameter'; it has name, description, parameters, strict",
         "tools[0].function.parameter"),
        ([USER], {"tools": [{"type": "function", "function": {"name": "get weather"}}]},
         "tools[0].function.name must be 1 to 64 letters, digits, underscores or dashes; got 'get weather'",
         "tools[0].function.name"),
        ([USER], {"tools": [WEATHER, WEATHER]}, "tools[1].function.name 'get_weather' is already a tool",
         "tools[1].function.name"),
        ([USER], {"tools": [{"type": "function", "function": {"name": "f", "description": 1}}]},
         "tools[0].function.description must be a string; got a number", "tools[0].function.description"),
        ([USER], {"tools": [{"type": "function", "function": {"name": "f", "parameters": ["a"]}}]},
         "tools[0].function.parameters must be a JSON schema object (got a list)", "tools[0].function.parameters"),
        ([USER], {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"a": "string"}}}}]},
         "tools[0].function.parameters must be a JSON schema object", "tools[0].function.parameters"),
    ],
)  # fmt: skip
def test_malformed_conversations(messages, options, error, param):
    with pytest.raises(ConversationError) as caught:
        harmony_messages(messages, **options)
    assert str(caught.value).startswith(error) and caught.value.param == param
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    "record, error, param",
    [
        (["messages"], "a record must be a JSON object", None),
        ({"messages": [USER], "developer": "x"}, "unknown field 'developer' in the record; a record has messages, and "
         "optionally tools and reasoning_effort", "developer"),
        ({"tools": []}, "messages must be a non-empty list of messages; got null", "messages"),
        ({"messages": [USER], "tools": "all"}, "tools must be a list of tools; got a string", "tools"),
        ({"messages": [USER], "reasoning_effort": "max"}, "reasoning_effort must be one of low, medium, high; got "
         "'max'", "reasoning_effort"),
    ],
)  # fmt: skip
def test_malformed_records(record, error, param):
    with pytest.raises(ConversationError) as caught:
        conversation_from_json(record)
    assert str(caught.value).startswith(error) and caught.value.param == param


@pytest.mark.parametrize(
    "messages, error",
    [
        ([Message("user", "Hi")], "nothing to train on: the conversation needs assistant messages after its last user"),
        ([Message("user", "Hi"), Message("assistant", "4", "final"), Message("user", "And?")], "nothing to train on"),
        ([Message("user", "Hi"), Message("assistant", "{}", "commentary", "functions.f"),
          Message("tool", "ok", "commentary", "assistant", name="functions.f")],
         "the conversation ends with a tool message; a conversation to train on must end with the assistant's final "
         "answer or a tool call"),
        ([Message("user", "Hi"), Message("assistant", "Hmm", "analysis")],
         "the conversation ends with an assistant message on channel 'analysis'"),
    ],
)  # fmt: skip
def test_nothing_to_train_on(messages, error):
    """Checked before any token is rendered, so no tokenizer is needed."""
    with pytest.raises(ConversationError, match="^" + error.replace("(", r"\(").replace(")", r"\)")) as caught:
        render_training(None, messages)
    assert caught.value.param is None


def test_parse_tools():
    assert parse_tools(None) == [] and parse_tools([]) == []
    assert parse_tools([LOCATION, WEATHER]) == [
        FunctionTool("get_location", "Gets the user's city."),
        FunctionTool("get_weather", "Gets the current weather in a city.", WEATHER["function"]["parameters"]),
    ]
