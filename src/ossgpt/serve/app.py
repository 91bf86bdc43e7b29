"""`ossgpt serve`'s HTTP app: one model behind OpenAI's API, on FastAPI (uvicorn runs it).

    app = create_app(model, tokenizer, model_name="gpt-oss-20b", max_batch=16, max_queue=64)
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes:
    GET  /                      the web chat page (static/index.html)
    GET  /health                {"status": "ok", "requests": running or waiting}
    GET  /v1/models             the one model served
    POST /v1/chat/completions   a conversation -> the assistant's reply (Harmony models): content, `reasoning`
                                (with its alias `reasoning_content`), tool_calls; streamed as server-sent events
                                (`data: {chunk}` ... `data: [DONE]`) when asked
    POST /v1/completions        a text prompt -> its continuation (any model)
    POST /v1/responses          the Responses API subset of ossgpt.serve.responses

What a request goes through: its JSON is validated (ossgpt.serve.openai_schema), the prompt built and its length
checked against the context (ossgpt.serve.served), the request queued on the engine thread (ossgpt.serve.worker),
and the tokens it generates read into pieces of reasoning, answer and tool calls (ossgpt.serve.reply) that each
endpoint shapes. Every error is OpenAI's {"error": {...}} with its status; an unexpected exception is a 500 whose
body says nothing more (the traceback goes to the server's log), and the server goes on serving.
"""

from __future__ import annotations

import asyncio
import json
import sys
import traceback
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing, asynccontextmanager
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ossgpt.chat.conversation import openai_reply
from ossgpt.inference.engine import Engine
from ossgpt.inference.loading import CHECKED_CONTEXT
from ossgpt.serve import responses
from ossgpt.serve.openai_schema import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    ResponsesRequest,
    chat_chunk,
    chat_completion,
    completion,
    new_id,
    now,
    parse_body,
    stop_strings,
    usage,
)
from ossgpt.serve.reply import HarmonyReader, Piece, PlainReader, Reply
from ossgpt.serve.served import Served
from ossgpt.serve.worker import Worker


def default_max_length(config) -> int:
    """Prompt + reply tokens of one request unless told: the model's context, at most CHECKED_CONTEXT (what loading
    checks memory for). The whole context would rarely fit: 131072 tokens x 16 rows of gpt-oss-20b are ~51 GB of
    KV cache."""
    return min(config.max_position_embeddings, CHECKED_CONTEXT)


def create_app(model, tokenizer, model_name: str = "ossgpt", max_batch: int = 16, max_queue: int = 64,
               max_length: int | None = None, sampling: dict | None = None) -> FastAPI:  # fmt: skip
    """The app serving `model`. max_batch: requests decoded together; max_queue: requests that may wait for a row
    (past that: 429); max_length: prompt + reply tokens of one request at most (default: default_max_length; the
    engine's KV cache holds max_batch x max_length); sampling: default Sampler keywords (temperature 1 if none)."""
    max_length = max_length or default_max_length(model.config)
    worker = Worker(lambda: Engine(model, max_batch=max_batch, max_length=max_length), max_batch + max_queue)
    context = worker.engine.max_length
    served = Served(model, tokenizer, model_name, worker, context, sampling or {"temperature": 1.0})

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="ossgpt", lifespan=lifespan)
    app.state.served = served  # for tests and tools that look inside

    # -------------------------------------------------------------------------------------------- errors
    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body, status_code=err.status, headers=err.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:  # unknown path, wrong method
        error = APIError(err.status_code, f"{request.method} {request.url.path}: {err.detail}")
        return JSONResponse(error.body, status_code=error.status, headers=err.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception) -> JSONResponse:  # Starlette then logs the traceback
        return JSONResponse(INTERNAL_ERROR.body, status_code=500)

    # ----------------------------------------------------------------------------------------- the page, health
    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return resources.files("ossgpt.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "requests": worker.active}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card(served)]}

    @app.get("/v1/models/{name:path}")
    async def model_info(name: str) -> dict:
        served.check_model(name)
        return model_card(served)

    # ------------------------------------------------------------------------------------- chat completions
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = parse_body(await request.body(), ChatCompletionRequest)
        served.check_model(body.model)
        tools = body.tools if body.tool_choice != "none" else None
        prompt = served.chat_prompt(body.messages, tools, body.effort, param="messages")
        max_param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        stop_ids = served.harmony.stop_token_ids
        stream = served.submit(prompt, body.max_new_tokens, body, stop_ids, ("messages", max_param))
        reply = Reply(HarmonyReader(served.harmony), stop_strings(body.stop))
        pieces = served.pieces(stream, reply)
        meta = new_id("chatcmpl"), now(), served.name
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return event_stream(chat_chunks(pieces, reply, meta, include_usage))
        return await unless_disconnected(request, chat_reply(pieces, reply, meta))

    # ------------------------------------------------------------------------------------------ completions
    @app.post("/v1/completions")
    async def completions(request: Request):
        body = parse_body(await request.body(), CompletionRequest)
        served.check_model(body.model)
        prompt = tokenizer.encode(body.prompt) if isinstance(body.prompt, str) else body.prompt
        stop_ids = (tokenizer.eot_token_id, *(served.harmony.stop_token_ids if served.harmony else ()))
        stream = served.submit(prompt, body.max_tokens, body, stop_ids, ("prompt", "max_tokens"))
        reply = Reply(PlainReader(tokenizer, stop_ids), stop_strings(body.stop))
        pieces = served.pieces(stream, reply)
        meta = new_id("cmpl"), now(), served.name
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return event_stream(completion_chunks(pieces, reply, meta, include_usage))
        return await unless_disconnected(request, completion_reply(pieces, reply, meta))

    # ------------------------------------------------------------------------------------------- responses
    @app.post("/v1/responses")
    async def responses_api(request: Request):
        body = parse_body(await request.body(), ResponsesRequest)
        served.check_model(body.model)
        run = responses.start(served, body)
        if body.stream:
            return event_stream(responses.events(run), named=True)
        return await unless_disconnected(request, responses.final(run))

    return app


INTERNAL_ERROR = APIError(500, "internal server error (the server's log has the details)", type="server_error")


def model_card(served: Served) -> dict:
    return {"id": served.name, "object": "model", "created": 0, "owned_by": "ossgpt", "max_model_len": served.context}


# ---------------------------------------------------------------------------------------- chat completion shapes
class ChatDeltas:
    """Pieces -> chat.completion.chunk deltas. Several messages of a kind are joined by a blank line, as
    openai_reply joins them, so the streamed reply adds up to the non-streamed one."""

    def __init__(self):
        self.calls = 0  # tool calls so far: the next one's index
        self.begun: set[str] = set()  # the kinds of text with a message so far
        self.content: str | None = None  # the answer so far

    def delta(self, piece: Piece) -> dict | None:
        """The piece's delta (None if it adds nothing)."""
        if piece.kind == "call":
            if piece.start:
                self.calls += 1
                return {"tool_calls": [{"index": self.calls - 1, "id": new_id("call"), "type": "function",
                                        "function": {"name": piece.name, "arguments": piece.text}}]}  # fmt: skip
            return {"tool_calls": [{"index": self.calls - 1, "function": {"arguments": piece.text}}]}
        text = piece.text
        if piece.start:
            text = ("\n\n" if piece.kind in self.begun else "") + text
            self.begun.add(piece.kind)
        if not text:
            return None
        if piece.kind == "reasoning":
            return {"reasoning": text, "reasoning_content": text}
        self.content = (self.content or "") + text
        return {"content": text}


def chat_finish_reason(reply: Reply) -> str:
    """Why the reply ended: "length", or as openai_reply says, "tool_calls" if it ends with a call, else "stop"."""
    if reply.finish_reason == "length":
        return "length"
    return "stop" if reply.cut else openai_reply(reply.messages)[1]


async def chat_chunks(pieces: AsyncIterator[Piece], reply: Reply, meta: tuple, include_usage: bool):
    deltas = ChatDeltas()
    yield chat_chunk(*meta, {"role": "assistant", "content": ""})
    async with aclosing(pieces):
        async for piece in pieces:
            if (delta := deltas.delta(piece)) is not None:
                yield chat_chunk(*meta, delta)
    yield chat_chunk(*meta, {}, chat_finish_reason(reply))
    if include_usage:
        yield chat_chunk(*meta, None, usage=usage(reply.prompt_tokens, reply.completion_tokens, reply.reasoning_tokens))


async def chat_reply(pieces: AsyncIterator[Piece], reply: Reply, meta: tuple) -> dict:
    deltas = ChatDeltas()
    async with aclosing(pieces):
        async for piece in pieces:
            deltas.delta(piece)
    message, _ = openai_reply(reply.messages)
    if reply.cut:  # the answer ends where the stop string began
        message["content"] = deltas.content
    counts = usage(reply.prompt_tokens, reply.completion_tokens, reply.reasoning_tokens)
    return chat_completion(*meta, message, chat_finish_reason(reply), counts)


# ---------------------------------------------------------------------------------------------- completion shapes
async def completion_chunks(pieces: AsyncIterator[Piece], reply: Reply, meta: tuple, include_usage: bool):
    async with aclosing(pieces):
        async for piece in pieces:
            if piece.text:
                yield completion(*meta, piece.text, None, None)
    yield completion(*meta, "", reply.finish_reason, None)
    if include_usage:
        yield completion(*meta, "", None, usage(reply.prompt_tokens, reply.completion_tokens)) | {"choices": []}


async def completion_reply(pieces: AsyncIterator[Piece], reply: Reply, meta: tuple) -> dict:
    async with aclosing(pieces):
        text = "".join([piece.text async for piece in pieces])
    return completion(*meta, text, reply.finish_reason, usage(reply.prompt_tokens, reply.completion_tokens))


# ------------------------------------------------------------------------------------------------ transport
def event_stream(items: AsyncIterator[dict], named: bool = False) -> StreamingResponse:
    """Server-sent events: `data: {json}` per item, then `data: [DONE]` (chat and completions); named: each item
    as `event: {its type}` + `data: {json}`, without [DONE] (the Responses API). An error once the stream has begun
    can only be told in the stream: it becomes an {"error": ...} event, as OpenAI's servers send."""

    async def encode():
        async with aclosing(items):  # however the stream ends (a client gone), the request stops in the engine
            try:
                async for item in items:
                    yield (f"event: {item['type']}\n" if named else "") + f"data: {json.dumps(item)}\n\n"
            except Exception as err:
                if not isinstance(err, APIError):
                    traceback.print_exc(file=sys.stderr)
                    err = INTERNAL_ERROR
                error = err.body | ({"type": "error"} if named else {})
                yield ("event: error\n" if named else "") + f"data: {json.dumps(error)}\n\n"
        if not named:
            yield "data: [DONE]\n\n"

    return StreamingResponse(encode(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def unless_disconnected(request: Request, work: Awaitable[dict]):
    """The JSON reply of `work`, or (the client went away first) an empty response once `work` is cancelled: its
    request then stops in the engine. (A streamed reply needs none of this: Starlette cancels it.)"""
    work = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(until_disconnected(request))
    await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    gone.cancel()
    if work.done():
        return JSONResponse(work.result())
    work.cancel()
    return Response(status_code=499)  # nginx's "client closed request": nobody reads it


async def until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
