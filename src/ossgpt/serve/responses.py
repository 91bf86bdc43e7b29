"""POST /v1/responses: the subset of OpenAI's Responses API that gpt-oss's reference server implements.

In: `input` (a string, or items: messages, reasoning, function_call and function_call_output), `instructions`,
`reasoning.effort`, function `tools`, temperature, top_p, max_output_tokens. The items become a chat-completions
conversation (`chat_messages`), rendered in Harmony like any chat.

Out: `output` items, one per message the model writes:
    reasoning      {"type": "reasoning", "content": [{"type": "reasoning_text", "text"}]}   the analysis channel
    message        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text"}]}
    function_call  {"type": "function_call", "name", "arguments", "call_id"}                 ends the turn
Streamed, in the reference server's order (each event with its sequence_number):
    response.created, response.in_progress
    per item: response.output_item.added, response.content_part.added (not for calls),
              response.reasoning_text.delta | response.output_text.delta | response.function_call_arguments.delta ...,
              the matching ...done, response.content_part.done, response.output_item.done
    response.completed (status "incomplete" with incomplete_details when max_output_tokens cut the reply)
The same events build the non-streamed reply, so both always agree.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from ossgpt.serve.openai_schema import (
    FunctionCallItem,
    FunctionCallOutputItem,
    MessageItem,
    ResponsesRequest,
    new_id,
    now,
)
from ossgpt.serve.reply import HarmonyReader, Piece, Reply
from ossgpt.serve.served import Served


def chat_messages(body: ResponsesRequest) -> list[dict]:
    """The request's instructions and input as chat-completions messages (reasoning goes with the assistant
    message that follows it)."""
    messages = [{"role": "developer", "content": body.instructions}] if body.instructions is not None else []
    items = [MessageItem(role="user", content=body.input)] if isinstance(body.input, str) else body.input
    reasoning = None
    for item in items:
        if isinstance(item, MessageItem):
            message = {"role": item.role, "content": item.text}
        elif isinstance(item, FunctionCallItem):
            function = {"name": item.name, "arguments": item.arguments}
            call = {"id": item.call_id, "type": "function", "function": function}
            message = {"role": "assistant", "content": None, "tool_calls": [call]}
        elif isinstance(item, FunctionCallOutputItem):
            message = {"role": "tool", "tool_call_id": item.call_id, "content": item.output}
        else:  # reasoning
            reasoning = "".join(part.text for part in item.content)
            continue
        if reasoning is not None and message["role"] == "assistant":
            message["reasoning"], reasoning = reasoning, None
        messages.append(message)
    return messages


def chat_tools(body: ResponsesRequest) -> list[dict] | None:
    if not body.tools or body.tool_choice == "none":
        return None
    return [{"type": "function", "function": tool.model_dump(exclude={"type", "strict"}, exclude_none=True)}
            for tool in body.tools]  # fmt: skip


@dataclass
class Run:
    """A response being generated."""

    served: Served
    body: ResponsesRequest
    pieces: AsyncIterator[Piece]
    reply: Reply
    id: str
    created: int


def start(served: Served, body: ResponsesRequest) -> Run:
    """Check and queue the request (APIError: 400, 404, 429)."""
    prompt = served.chat_prompt(chat_messages(body), chat_tools(body), body.effort, param="input")
    stream = served.submit(prompt, body.max_output_tokens, body, served.harmony.stop_token_ids,
                           ("input", "max_output_tokens"))  # fmt: skip
    reply = Reply(HarmonyReader(served.harmony))
    return Run(served, body, served.pieces(stream, reply), reply, new_id("resp"), now())


async def events(run: Run) -> AsyncIterator[dict]:
    """The response's events, in order, numbered; the last one, response.completed, holds the whole response."""
    number = itertools.count()
    async for event in _events(run):
        yield event | {"sequence_number": next(number)}


async def _events(run: Run) -> AsyncIterator[dict]:
    output = Output()
    yield {"type": "response.created", "response": response(run, [], "in_progress")}
    yield {"type": "response.in_progress", "response": response(run, [], "in_progress")}
    async with aclosing(run.pieces) as pieces:
        async for piece in pieces:
            for event in output.add(piece):
                yield event
    for event in output.close():
        yield event
    status = "incomplete" if run.reply.finish_reason == "length" else "completed"
    yield {"type": "response.completed", "response": response(run, output.items, status)}


async def final(run: Run) -> dict:
    """The whole response (for a request that does not stream)."""
    async for event in events(run):
        if event["type"] == "response.completed":
            return event["response"]


def response(run: Run, output: list[dict], status: str) -> dict:
    body, reply = run.body, run.reply
    usage = None
    if status != "in_progress":
        usage = {"input_tokens": reply.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
                 "output_tokens": reply.completion_tokens,
                 "output_tokens_details": {"reasoning_tokens": reply.reasoning_tokens},
                 "total_tokens": reply.prompt_tokens + reply.completion_tokens}  # fmt: skip
    return {
        "id": run.id, "object": "response", "created_at": run.created, "model": run.served.name, "status": status,
        "output": output, "usage": usage, "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": body.instructions, "tools": [tool.model_dump(exclude_none=True) for tool in body.tools or []],
        "tool_choice": body.tool_choice or "auto", "parallel_tool_calls": False,  # a call ends the model's turn
        "temperature": body.temperature, "top_p": body.top_p, "max_output_tokens": body.max_output_tokens,
        "reasoning": {"effort": body.effort, "summary": None}, "text": {"format": {"type": "text"}}, "metadata": {},
    }  # fmt: skip


class Output:
    """The output items, built piece by piece; `add` and `close` return the events (without sequence numbers)."""

    PART = {"reasoning": "reasoning_text", "content": "output_text"}  # an item's content part type
    DELTA = {"reasoning": "response.reasoning_text", "content": "response.output_text",
             "call": "response.function_call_arguments"}  # fmt: skip

    def __init__(self):
        self.items: list[dict] = []  # the finished items
        self.kind: str | None = None  # of the item being written
        self.item: dict | None = None
        self.text = ""

    def add(self, piece: Piece) -> list[dict]:
        events = []
        if piece.start or self.item is None:
            events += self.close() + self.open(piece)
        if piece.text:
            self.text += piece.text
            events.append(self._event(self.DELTA[self.kind] + ".delta", delta=piece.text, **self._extra()))
        return events

    def open(self, piece: Piece) -> list[dict]:
        self.kind, self.text = piece.kind, ""
        if piece.kind == "call":
            self.item = {"type": "function_call", "id": new_id("fc"), "call_id": new_id("call"), "name": piece.name,
                         "arguments": "", "status": "in_progress"}  # fmt: skip
        elif piece.kind == "reasoning":
            self.item = {"type": "reasoning", "id": new_id("rs"), "summary": [], "content": [], "status": "in_progress"}
        else:
            self.item = {"type": "message", "id": new_id("msg"), "role": "assistant", "content": [],
                         "status": "in_progress"}  # fmt: skip
        events = [{"type": "response.output_item.added", "output_index": len(self.items), "item": dict(self.item)}]
        if piece.kind != "call":
            events.append(self._event("response.content_part.added", content_index=0, part=self._part("")))
        return events

    def close(self) -> list[dict]:
        """Finish the item being written (if any): its ...done events."""
        if self.item is None:
            return []
        done = self.DELTA[self.kind] + ".done"
        if self.kind == "call":
            self.item |= {"arguments": self.text, "status": "completed"}
            events = [self._event(done, arguments=self.text, name=self.item["name"])]
        else:
            part = self._part(self.text)
            self.item |= {"content": [part], "status": "completed"}
            events = [self._event(done, text=self.text, **self._extra()),
                      self._event("response.content_part.done", content_index=0, part=part)]  # fmt: skip
        events.append({"type": "response.output_item.done", "output_index": len(self.items), "item": self.item})
        self.items.append(self.item)
        self.item = self.kind = None
        return events

    def _part(self, text: str) -> dict:
        part = {"type": self.PART[self.kind], "text": text}
        return part | ({"annotations": [], "logprobs": []} if self.kind == "content" else {})

    def _extra(self) -> dict:
        """The fields a text delta or done event has beyond its item: content_index, and logprobs for output text."""
        if self.kind == "call":
            return {}
        return {"content_index": 0} | ({"logprobs": []} if self.kind == "content" else {})

    def _event(self, type: str, **fields) -> dict:
        return {"type": type, "output_index": len(self.items), "item_id": self.item["id"], **fields}
