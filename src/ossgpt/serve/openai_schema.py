"""OpenAI's shapes: the requests the server takes (validated), the replies it sends, and its error body.

Requests are checked with pydantic: a wrong type or a value out of range is an APIError, status 400, naming the
field (`param`), as OpenAI's API answers. Fields a client may send that change nothing here (user, metadata, store,
parallel_tool_calls, ...) are accepted and ignored; fields that would change the reply but are not implemented
(n > 1, logprobs, echo) are refused rather than silently dropped.

    ChatCompletionRequest    POST /v1/chat/completions
    CompletionRequest        POST /v1/completions
    ResponsesRequest         POST /v1/responses (shaped in ossgpt.serve.responses)
    chat_completion, chat_chunk, completion, usage: the reply objects
    APIError(status, message, type, param, code).body -> {"error": {"message", "type", "param", "code"}}
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError


class APIError(Exception):
    """An error answered as OpenAI does: this status, and {"error": {...}} as the body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    @property
    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def parse_body(raw: bytes, model: type[BaseModel]) -> BaseModel:
    """A request body -> the request model; APIError 400 for JSON that does not parse or does not fit."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise APIError(400, f"the request body is not valid JSON ({err})", code="invalid_json") from None
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        message = f"{param}: {first['msg']}" if param else first["msg"]
        raise APIError(400, message, param=param, code="invalid_value") from None


# ----------------------------------------------------------------------------------------------------- requests
class StreamOptions(BaseModel):
    include_usage: bool = False


class TextFormat(BaseModel):
    type: Literal["text"]  # JSON modes would need constrained decoding, which this server does not do


class ReasoningOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. "summary", which this server does not write
    effort: Literal["low", "medium", "high"] | None = None


class Sampling(BaseModel):
    """What every generating endpoint takes."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None  # None: the served model
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stream: bool = False


class ChatCompletionRequest(Sampling):
    messages: list[dict] = Field(min_length=1)  # checked message by message by ossgpt.chat.conversation
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    stream_options: StreamOptions | None = None
    tools: list[dict] | None = None
    tool_choice: Literal["auto", "none"] | None = None
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    reasoning: ReasoningOptions | None = None  # the same, as {"effort": ...}
    response_format: TextFormat | None = None
    n: Literal[1] | None = None
    logprobs: Literal[False] | None = None

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def effort(self) -> str:
        return self.reasoning_effort or (self.reasoning and self.reasoning.effort) or "medium"


class CompletionRequest(Sampling):
    prompt: str | list[int]
    max_tokens: int = Field(16, ge=1)  # OpenAI's default for this endpoint
    stop: str | list[str] | None = None
    stream_options: StreamOptions | None = None
    n: Literal[1] | None = None
    logprobs: None = None
    echo: Literal[False] | None = None


class TextPart(BaseModel):
    type: Literal["input_text", "output_text", "text"]
    text: str


class MessageItem(BaseModel):
    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ReasoningText(BaseModel):
    type: Literal["reasoning_text"]
    text: str


class ReasoningItem(BaseModel):
    model_config = ConfigDict(extra="ignore")  # id, summary, encrypted_content
    type: Literal["reasoning"]
    content: list[ReasoningText] = []


class FunctionCallItem(BaseModel):
    model_config = ConfigDict(extra="ignore")  # id, status
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function_call_output"]
    call_id: str
    output: str


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[ReasoningItem, Tag("reasoning")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")],
    Discriminator(lambda item: item.get("type", "message") if isinstance(item, dict) else item.type),
]  # a message may leave out its type (OpenAI's "easy input message")


class FunctionTool(BaseModel):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class ResponsesRequest(Sampling):
    input: str | list[InputItem]
    instructions: str | None = None
    reasoning: ReasoningOptions | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["auto", "none"] | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    previous_response_id: None = None  # nothing is stored: send the whole conversation as input

    @property
    def effort(self) -> str:
        return (self.reasoning and self.reasoning.effort) or "medium"


def stop_strings(stop: str | list[str] | None) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or ())


# ------------------------------------------------------------------------------------------------------ replies
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, reasoning_tokens: int | None = None) -> dict:
    counts = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
              "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip
    if reasoning_tokens is not None:
        counts["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return counts


def chat_completion(id: str, created: int, model: str, message: dict, finish_reason: str, usage: dict) -> dict:
    choice = {"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}
    return {"id": id, "object": "chat.completion", "created": created, "model": model, "choices": [choice],
            "usage": usage}  # fmt: skip


def chat_chunk(id: str, created: int, model: str, delta: dict | None, finish_reason: str | None = None,
               usage: dict | None = None) -> dict:  # fmt: skip
    """A streamed piece: a delta (with its finish_reason on the last one), or (delta None) the usage alone."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
    chunk = {"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    return chunk | ({"usage": usage} if usage is not None else {})


def completion(id: str, created: int, model: str, text: str, finish_reason: str | None, usage: dict | None) -> dict:
    """A /v1/completions reply, or (object the same, text a piece, usage None) one of its streamed chunks."""
    choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
    reply = {"id": id, "object": "text_completion", "created": created, "model": model, "choices": [choice]}
    return reply | ({"usage": usage} if usage is not None else {})
