"""The model being served, and what every endpoint does with it before shaping a reply.

    served = Served(model, tokenizer, "my-model", worker, context=4096, sampling={"temperature": 1.0})
    served.check_model(body.model)                        # 404 for another model's name
    prompt = served.chat_prompt(messages, tools, effort)  # Harmony tokens (400 for a malformed conversation)
    stream = served.submit(prompt, max_tokens, body, ...) # limits checked before any work: 400, 429
    async with aclosing(served.pieces(stream, reply)) as pieces:
        async for piece in pieces: ...                    # see ossgpt.serve.reply; the request stops on exit

Every failure is an APIError, which the app answers as OpenAI's error JSON.
"""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator, Sequence

from ossgpt.chat.conversation import ConversationError, harmony_messages, render_prompt
from ossgpt.chat.harmony import Harmony
from ossgpt.inference.engine import Request
from ossgpt.inference.sampling import Sampler
from ossgpt.serve.openai_schema import APIError, Sampling
from ossgpt.serve.reply import Piece, Reply
from ossgpt.serve.worker import EngineError, QueueFullError, Stream, Worker

RETRY_AFTER_S = 1  # what a 429 tells a client to wait: a busy server frees rows every few tokens


class Served:
    def __init__(self, model, tokenizer, name: str, worker: Worker, context: int, sampling: dict):
        """context: the most tokens (prompt + reply) of one request; sampling: the Sampler keywords a request's own
        temperature, top_p and seed override."""
        self.model, self.tokenizer, self.name, self.worker = model, tokenizer, name, worker
        self.context, self.sampling = context, sampling
        self.harmony = Harmony(tokenizer) if Harmony.supports(tokenizer) else None

    def check_model(self, requested: str | None) -> None:
        if requested is not None and requested != self.name:
            raise APIError(404, f"model {requested!r} does not exist: this server serves {self.name!r}",
                           param="model", code="model_not_found")  # fmt: skip

    def chat_prompt(self, messages: list[dict], tools: list[dict] | None, effort: str, param: str) -> list[int]:
        """The Harmony prompt of an OpenAI-style conversation (roles, tool calls and results, reasoning)."""
        if self.harmony is None:
            raise APIError(400, f"this model's tokenizer ({self.tokenizer.spec}) has no chat format (Harmony's "
                           "tokens): use /v1/completions with a text prompt", param=param)  # fmt: skip
        try:
            conversation = harmony_messages(messages, tools, reasoning_effort=effort,
                                            current_date=datetime.date.today().isoformat())  # fmt: skip
            return render_prompt(self.harmony, conversation)
        except ConversationError as err:
            raise APIError(400, str(err), param=err.param) from None

    def sampler(self, body: Sampling) -> Sampler:
        options = dict(self.sampling)
        options.update({key: value for key in ("temperature", "top_p", "seed")
                        if (value := getattr(body, key)) is not None})  # fmt: skip
        options["do_sample"] = options.get("temperature", 1.0) > 0
        try:
            return Sampler(**options)
        except ValueError as err:
            raise APIError(400, str(err)) from None

    def submit(self, prompt: list[int], max_tokens: int | None, body: Sampling, stop_token_ids: Sequence[int],
               params: tuple[str, str]) -> Stream:  # fmt: skip
        """Queue a generation; max_tokens None: up to the context. params: the request's names of the prompt and
        of max_tokens, for error messages."""
        prompt_param, max_param = params
        if len(prompt) >= self.context:
            raise APIError(400, f"the prompt is {len(prompt)} tokens: this model takes at most {self.context} "
                           "tokens, prompt and reply together; shorten it", param=prompt_param,
                           code="context_length_exceeded")  # fmt: skip
        if max_tokens is None:
            max_tokens = self.context - len(prompt)
        elif len(prompt) + max_tokens > self.context:
            raise APIError(400, f"the prompt ({len(prompt)} tokens) + {max_param} ({max_tokens}) is more than the "
                           f"{self.context} tokens this model takes: lower {max_param} or shorten the prompt",
                           param=max_param, code="context_length_exceeded")  # fmt: skip
        request = Request(prompt, max_tokens, self.sampler(body), tuple(stop_token_ids))
        try:
            return self.worker.submit(request)
        except QueueFullError as err:
            raise APIError(429, f"{err}; retry in a moment", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None  # fmt: skip
        except ValueError as err:  # the engine's own checks (token ids outside the vocabulary, ...)
            raise APIError(400, str(err), param=prompt_param) from None

    @staticmethod
    async def pieces(stream: Stream, reply: Reply) -> AsyncIterator[Piece]:
        """The reply's pieces as the engine makes them; leaving early (a stop string, a client gone) stops the
        request in the engine. An engine failure is a 500."""
        try:
            async for event in stream:
                for piece in reply.add(event):
                    yield piece
                if reply.finish_reason is not None:
                    return
        except EngineError as err:
            raise APIError(500, f"{err}; the server is still up: retry", type="server_error") from None
        finally:
            stream.close()
