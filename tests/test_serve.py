"""`ossgpt serve` over real HTTP: a live uvicorn server on 127.0.0.1 (a thread per module), driven by the official
`openai` client and by httpx where the client hides what is checked (status codes, raw events, disconnects).

Models: a tiny random GPT-OSS with gpt-oss's tokenizer (o200k_harmony) for chat and the Responses API, and a tiny
byte-tokenizer model for /v1/completions. A random model does not write well-formed Harmony, so the protocol tests
script the reply: `Scripted` is the real tiny model, run by the real engine and KV cache, whose last logits are
replaced by a one-hot row on the scripted next token when a request's prompt holds a script's marker text.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'ossgpt[serve]')")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from ossgpt import GPTOSSForCausalLM  # noqa: E402
from ossgpt.chat.conversation import harmony_messages, render_prompt  # noqa: E402
from ossgpt.chat.harmony import Harmony  # noqa: E402
from ossgpt.cli import main  # noqa: E402
from ossgpt.inference.engine import cache_bytes  # noqa: E402
from ossgpt.inference.generate import generate_batch  # noqa: E402
from ossgpt.inference.memory import GB  # noqa: E402
from ossgpt.serve.app import create_app  # noqa: E402
from ossgpt.tokenizer import ByteTokenizer, HarmonyTokenizer  # noqa: E402
from serve_helpers import Scripted, _ends, serving, tiny_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

CONTEXT = 384  # tokens per request (the engine's max_length): a small KV cache, and a context easy to overflow
NAME = "tiny-oss"


@pytest.fixture(scope="module")
def tokenizer():
    try:
        return HarmonyTokenizer("o200k_harmony")
    except Exception as err:  # no ranks file in tiktoken's cache and no network
        pytest.skip(f"o200k_harmony is not available here ({err}); set TIKTOKEN_CACHE_DIR to a cache holding it")


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return Scripted(tiny_config(), tokenizer).eval()


@pytest.fixture(scope="module")
def app(model, tokenizer):
    # Greedy unless a request says otherwise: sampling from 201,088 logits costs more than this model's step.
    greedy = {"temperature": 0}
    return create_app(model, tokenizer, NAME, max_batch=16, max_queue=8, max_length=CONTEXT, sampling=greedy)


@pytest.fixture(scope="module")
def url(app):
    with serving(app) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def http(url):
    with httpx.Client(base_url=url, timeout=60) as session:
        yield session


@pytest.fixture
def healthy(http):
    """After the test: the server still answers, and has nothing left running."""
    yield
    assert http.get("/health").json()["status"] == "ok"
    deadline = time.monotonic() + 10
    while http.get("/health").json()["requests"]:
        assert time.monotonic() < deadline, "requests left running"
        time.sleep(0.01)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def collect(chunks) -> dict:
    """A streamed chat reply, its deltas added up: content, reasoning (checking reasoning_content says the same),
    tool calls by index, finish_reason, usage."""
    out = {"content": None, "reasoning": None, "tool_calls": {}, "finish_reason": None, "usage": None}
    for chunk in chunks:
        if chunk.usage is not None:
            out["usage"] = chunk.usage
        for choice in chunk.choices:
            delta = choice.delta.model_dump()
            if delta.get("content"):
                out["content"] = (out["content"] or "") + delta["content"]
            if delta.get("reasoning"):
                assert delta["reasoning_content"] == delta["reasoning"]
                out["reasoning"] = (out["reasoning"] or "") + delta["reasoning"]
            for call in delta.get("tool_calls") or []:
                entry = out["tool_calls"].setdefault(call["index"], {"id": None, "name": None, "arguments": ""})
                entry["id"] = call["id"] or entry["id"]
                entry["name"] = call["function"]["name"] or entry["name"]
                entry["arguments"] += call["function"]["arguments"] or ""
            out["finish_reason"] = choice.finish_reason or out["finish_reason"]
    return out


def check_error(response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "Traceback" not in response.text
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


# ------------------------------------------------------------------------------------------------- chat completions
def test_models_health_and_page(client, http):
    assert [m.id for m in client.models.list()] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    assert http.get("/health").json()["status"] == "ok"
    page = http.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")


def test_chat_reasoning_and_usage_streamed_or_not(client, model, tokenizer, healthy):
    marker = model.script("script: think then answer",
                          "<|channel|>analysis<|message|>The user wants a greeting.<|end|>"
                          "<|start|>assistant<|channel|>final<|message|>Hello there!<|return|>")  # fmt: skip
    reply = client.chat.completions.create(model=NAME, messages=user(marker), reasoning_effort="low")
    message = reply.choices[0].message
    assert (message.content, message.reasoning) == ("Hello there!", "The user wants a greeting.")
    assert reply.choices[0].finish_reason == "stop" and message.tool_calls is None
    # usage: the prompt as rendered independently of the server's request handling, and every token generated
    conversation = harmony_messages(user(marker), reasoning_effort="low", current_date=time.strftime("%Y-%m-%d"))
    prompt = render_prompt(Harmony(tokenizer), conversation)
    assert model.prompts[-1] == prompt
    scripted = tokenizer.encode("<|channel|>analysis<|message|>The user wants a greeting.<|end|><|start|>assistant"
                                "<|channel|>final<|message|>Hello there!<|return|>", allowed_special="all")  # fmt: skip
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(prompt), len(scripted))
    assert reply.usage.total_tokens == len(prompt) + len(scripted)

    chunks = client.chat.completions.create(model=NAME, messages=user(marker), stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"reasoning": {"effort": "low"}})  # fmt: skip
    streamed = collect(chunks)
    assert (streamed["content"], streamed["reasoning"]) == (message.content, message.reasoning)
    assert streamed["finish_reason"] == "stop" and not streamed["tool_calls"]
    assert streamed["usage"].model_dump() == reply.usage.model_dump()


def test_tool_call_round_trip_with_reasoning_sent_back(client, model, tokenizer, healthy):
    parameters = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                               "parameters": parameters}}]  # fmt: skip
    marker = model.script("script: weather in Paris?",
                          "<|channel|>analysis<|message|>Need the weather tool.<|end|><|start|>assistant"
                          '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}'
                          "<|call|>")  # fmt: skip
    result = model.script("script: 18C and sunny", "<|channel|>final<|message|>It is sunny in Paris.<|return|>")
    first = client.chat.completions.create(model=NAME, messages=user(marker), tools=tools)
    assert first.choices[0].finish_reason == "tool_calls"
    message = first.choices[0].message
    assert message.reasoning == "Need the weather tool." and message.content is None
    (call,) = message.tool_calls
    assert (call.type, call.function.name, call.function.arguments) == ("function", "get_weather", '{"city": "Paris"}')

    streamed = collect(client.chat.completions.create(model=NAME, messages=user(marker), tools=tools, stream=True))
    assert streamed["finish_reason"] == "tool_calls" and streamed["reasoning"] == message.reasoning
    (streamed_call,) = streamed["tool_calls"].values()
    assert streamed_call["id"].startswith("call") and streamed_call["name"] == "get_weather"
    assert streamed_call["arguments"] == call.function.arguments

    # The client sends the assistant's message back as it came (reasoning included), then the tool's result.
    history = [*user(marker), message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": result}]  # fmt: skip
    second = client.chat.completions.create(model=NAME, messages=history, tools=tools)
    assert second.choices[0].message.content == "It is sunny in Paris."
    assert second.choices[0].finish_reason == "stop"
    # The reasoning of a tool-call chain in progress is part of the next prompt.
    assert _ends(model.prompts[-1], tuple(tokenizer.encode_ordinary("Need the weather tool.")))


def test_stop_strings_cut_the_answer(client, model, healthy):
    marker = model.script("script: count", "<|channel|>final<|message|>one, two, three, four<|return|>")
    reply = client.chat.completions.create(model=NAME, messages=user(marker), stop=[", three", "never"])
    assert reply.choices[0].message.content == "one, two" and reply.choices[0].finish_reason == "stop"
    streamed = collect(client.chat.completions.create(model=NAME, messages=user(marker), stop=", thr", stream=True))
    assert streamed["content"] == "one, two" and streamed["finish_reason"] == "stop"


def test_max_tokens_seed_and_temperature(client, healthy):
    messages = user("Write something random.")
    reply = client.chat.completions.create(model=NAME, messages=messages, max_tokens=5, temperature=0)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 5
    reply = client.chat.completions.create(model=NAME, messages=messages, max_completion_tokens=3)
    assert reply.usage.completion_tokens == 3

    def sample(seed, **options):
        return client.chat.completions.create(model=NAME, messages=messages, max_tokens=6, temperature=1.5,
                                              seed=seed, **options).choices[0].message  # fmt: skip

    assert sample(7) == sample(7)
    assert any(sample(7) != sample(seed) for seed in (8, 9))
    assert sample(7, top_p=0.5) == sample(7, top_p=0.5)


# ------------------------------------------------------------------------------------------------------ responses
def test_responses_stream_and_final_response(client, model, healthy):
    marker = model.script("script: responses",
                          "<|channel|>analysis<|message|>Thinking it over.<|end|>"
                          "<|start|>assistant<|channel|>final<|message|>The answer is 4.<|return|>")  # fmt: skip
    with client.responses.stream(model=NAME, input=marker, instructions="Be brief.", reasoning={"effort": "high"}) as s:
        types = [event.type for event in s]
        final = s.get_final_response()
    item = ["response.output_item.added", "response.content_part.added"]
    done = ["response.content_part.done", "response.output_item.done"]
    collapsed = [t for i, t in enumerate(types) if not (i and t == types[i - 1] and t.endswith(".delta"))]
    assert collapsed == ["response.created", "response.in_progress",
                         *item, "response.reasoning_text.delta", "response.reasoning_text.done", *done,
                         *item, "response.output_text.delta", "response.output_text.done", *done,
                         "response.completed"]  # fmt: skip
    assert final.status == "completed" and final.output_text == "The answer is 4."
    reasoning, message = final.output
    assert reasoning.type == "reasoning" and reasoning.content[0].text == "Thinking it over."
    assert message.type == "message" and message.role == "assistant"
    assert final.usage.output_tokens_details.reasoning_tokens > 0
    assert final.usage.input_tokens == len(model.prompts[-1])

    created = client.responses.create(model=NAME, input=[{"role": "user", "content": marker}])
    assert created.output_text == "The answer is 4." and created.output[0].content[0].text == "Thinking it over."


def test_responses_function_call_round_trip(client, model, healthy):
    tools = [
        {
            "type": "function",
            "name": "add",
            "description": "Add two numbers",
            "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}},
        }
    ]
    marker = model.script(
        "script: add 2 and 2",
        '<|channel|>commentary to=functions.add <|constrain|>json<|message|>{"a": 2, "b": 2}<|call|>',
    )
    result = model.script("script: the sum is 4", "<|channel|>final<|message|>2 + 2 = 4<|return|>")
    with client.responses.stream(model=NAME, input=marker, tools=tools) as s:
        final = s.get_final_response()
    (call,) = final.output
    assert (call.type, call.name, call.arguments) == ("function_call", "add", '{"a": 2, "b": 2}')
    answer = client.responses.create(model=NAME, tools=tools, input=[
        {"role": "user", "content": marker}, call.model_dump(exclude_none=True),
        {"type": "function_call_output", "call_id": call.call_id, "output": result},
    ])  # fmt: skip
    assert answer.output_text == "2 + 2 = 4"


# --------------------------------------------------------------------------------------------------- the engine
def test_16_concurrent_streams_each_equal_to_its_request_served_alone(client, app, healthy):
    engine = app.state.served.worker.engine
    sizes = []
    step = engine.step
    engine.step = lambda: (sizes.append(len(engine.rows)), step())[1]  # how many rows each decode step ran
    requests = [dict(model=NAME, messages=user(f"Request number {i}: " + "go " * i), max_tokens=6 + i % 5,
                     temperature=0) for i in range(16)]  # fmt: skip
    try:
        alone = [client.chat.completions.create(**request).choices[0].message for request in requests]
        assert max(sizes) <= 1
        with ThreadPoolExecutor(16) as pool:
            together = list(pool.map(lambda r: collect(client.chat.completions.create(**r, stream=True)), requests))
    finally:
        del engine.step
    assert max(sizes) > 8  # they did run together
    for served_alone, streamed in zip(alone, together):
        assert (streamed["content"], streamed["reasoning"]) == (served_alone.content, served_alone.reasoning)


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_frees_its_row(app, url, healthy, stream):
    engine = app.state.served.worker.engine
    events = []
    step = engine.step
    engine.step = lambda: (result := step(), events.extend(result))[0]
    body = {"model": NAME, "messages": user("Talk for a long time."), "max_tokens": 300, "stream": stream}
    try:
        with httpx.Client(base_url=url, timeout=60 if stream else 0.5) as session:
            if stream:  # read the first chunk, then hang up
                with session.stream("POST", "/v1/chat/completions", json=body) as response:
                    assert next(response.iter_lines()).startswith("data: ")
            else:  # give up waiting for the whole reply
                with pytest.raises(httpx.ReadTimeout):
                    session.post("/v1/chat/completions", json=body)
        deadline = time.monotonic() + 10
        while not any(event.finish_reason for event in events):
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        del engine.step
    assert events[-1].finish_reason == "cancelled"
    assert 0 < len([event for event in events if event.token is not None]) < 300


def test_engine_failure_is_a_500_and_the_server_goes_on(client, app, http, healthy):
    worker = app.state.served.worker

    def broken():
        raise RuntimeError("simulated failure")

    for stream in (False, True):
        worker.engine.step = broken  # the next engine, made after the failure, is sound
        body = {"model": NAME, "messages": user("hello"), "max_tokens": 4, "stream": stream}
        response = http.post("/v1/chat/completions", json=body)
        if stream:
            assert response.status_code == 200  # the headers were sent before the failure
            (error,) = [json.loads(line[6:])["error"] for line in response.text.splitlines() if '"error"' in line]
            assert error["type"] == "server_error" and "simulated" not in response.text
        else:
            assert check_error(response, 500)["type"] == "server_error" and "simulated" not in response.text
        reply = client.chat.completions.create(model=NAME, messages=user("hello"), max_tokens=4)
        assert reply.usage.completion_tokens == 4


# ------------------------------------------------------------------------------------------------------ bad input
LONG = "word " * (CONTEXT + 10)


@pytest.mark.parametrize(
    "path, body, status, param, code",
    [
        ("/v1/chat/completions", {"messages": user("hi"), "temperature": -0.5}, 400, "temperature", None),
        ("/v1/chat/completions", {"messages": user("hi"), "top_p": 0}, 400, "top_p", None),
        ("/v1/chat/completions", {"messages": user("hi"), "top_p": 1.5}, 400, "top_p", None),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role", None),
        ("/v1/chat/completions", {"messages": []}, 400, "messages", None),
        ("/v1/chat/completions", {"messages": user("hi"), "max_tokens": 0}, 400, "max_tokens", None),
        ("/v1/chat/completions", {"messages": user("hi"), "n": 2}, 400, "n", None),
        ("/v1/chat/completions", {"messages": user("hi"), "response_format": {"type": "json_object"}}, 400,
         "response_format.type", None),
        ("/v1/chat/completions", {"messages": user("hi"), "reasoning_effort": "max"}, 400, "reasoning_effort", None),
        ("/v1/chat/completions", {"messages": user("hi"), "model": "gpt-5"}, 404, "model", "model_not_found"),
        ("/v1/chat/completions", {"messages": user(LONG)}, 400, "messages", "context_length_exceeded"),
        ("/v1/chat/completions", {"messages": user("hi"), "max_tokens": CONTEXT}, 400, "max_tokens",
         "context_length_exceeded"),
        ("/v1/chat/completions", {"messages": user("hi"), "temperature": "hot"}, 400, "temperature", None),
        ("/v1/chat/completions", {"messages": [{"role": "tool", "tool_call_id": "call_1", "content": "42"}]}, 400,
         "messages[0].tool_call_id", None),
        ("/v1/completions", {"prompt": LONG}, 400, "prompt", "context_length_exceeded"),
        ("/v1/completions", {"prompt": [5, 10**6]}, 400, "prompt", None),
        ("/v1/responses", {"input": [{"type": "image", "url": "x"}]}, 400, None, None),
        ("/v1/responses", {"input": "hi", "previous_response_id": "resp_1"}, 400, "previous_response_id", None),
        ("/v1/responses", {"input": "hi", "model": "gpt-5"}, 404, "model", "model_not_found"),
        ("/v1/chat/completions", [1, 2], 400, None, None),
    ],
)  # fmt: skip
def test_bad_input_is_an_openai_error(http, healthy, path, body, status, param, code):
    check_error(http.post(path, json=body), status, param, code)


def test_bad_json_unknown_paths_and_methods(http, healthy):
    check_error(http.post("/v1/chat/completions", content=b'{"messages": [', headers={"content-type":
                "application/json"}), 400, code="invalid_json")  # fmt: skip
    check_error(http.post("/v1/chat/completions", content=b"\xff\xfe"), 400, code="invalid_json")
    check_error(http.get("/v1/nothing"), 404)
    check_error(http.get("/v1/chat/completions"), 405)


def test_the_openai_client_sees_the_errors(client, healthy):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=NAME, messages=user("hi"), temperature=-1)
    with pytest.raises(openai.NotFoundError, match="gpt-5"):
        client.chat.completions.create(model="gpt-5", messages=user("hi"))


# ------------------------------------------------------------------------------- a plain model: completions, queue
@pytest.fixture(scope="module")
def plain():
    torch.manual_seed(1)
    model = GPTOSSForCausalLM(tiny_config(vocab_size=257, tokenizer="bytes", eos_token_id=256)).eval()
    app = create_app(model, ByteTokenizer(), "tiny-bytes", max_batch=2, max_queue=1, max_length=CONTEXT)
    with serving(app) as base:
        yield model, base


def test_completions_equal_generate_batch(plain):
    model, base = plain
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    tokenizer = ByteTokenizer()
    prompt = "Once upon a time"
    (expected,) = generate_batch(model, [tokenizer.encode(prompt)], 20, eos_token_id=tokenizer.eot_token_id)
    text = tokenizer.decode([t for t in expected if t != tokenizer.eot_token_id])
    reply = client.completions.create(model="tiny-bytes", prompt=prompt, max_tokens=20, temperature=0)
    assert reply.choices[0].text == text
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(prompt), len(expected))
    chunks = list(client.completions.create(model="tiny-bytes", prompt=prompt, max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert chunks[-1].usage.model_dump() == reply.usage.model_dump()


def test_chat_needs_a_chat_model(plain):
    _, base = plain
    check_error(httpx.post(f"{base}/v1/chat/completions", json={"messages": user("hi")}), 400, "messages")


def test_full_queue_is_a_429_until_a_row_frees(plain):
    _, base = plain
    body = {"prompt": "Go on and on", "max_tokens": CONTEXT - 20, "stream": True}
    with httpx.Client(base_url=base, timeout=60) as session:
        with session.stream("POST", "/v1/completions", json=body) as one, \
                session.stream("POST", "/v1/completions", json=body) as two, \
                session.stream("POST", "/v1/completions", json=body) as three:  # fmt: skip
            for response in (one, two, three):  # two rows, one place in the queue
                assert response.status_code == 200
            full = session.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            error = check_error(full, 429, code="queue_full")
            assert int(full.headers["Retry-After"]) >= 1 and error["type"] == "rate_limit_error"
        deadline = time.monotonic() + 10  # the three streams were closed: their rows free at the next step
        while session.get("/health").json()["requests"]:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert session.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


# ----------------------------------------------------------------------------------------------------------- CLI
def test_cli_says_what_to_install_without_the_serve_extra(monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else find_spec(name, *a)
    )
    assert main(["serve", "--checkpoint", "nowhere"]) == 2
    assert "pip install 'ossgpt[serve]'" in capsys.readouterr().err


def test_cli_rejects_bad_flags_and_missing_checkpoints(capsys):
    assert main(["serve", "--checkpoint", "nowhere", "--max-batch", "0"]) == 2
    assert "--max-batch must be at least 1" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", "nowhere"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_checks_the_memory_of_the_kv_cache(tmp_path, monkeypatch, capsys):
    """--max-length defaults to the model's context up to CHECKED_CONTEXT (8192 of this model's 16384); a KV cache of
    --max-batch x --max-length larger than the memory available is a one-line error, before it is allocated."""
    config = tiny_config(vocab_size=257, tokenizer="bytes", eos_token_id=256, max_position_embeddings=16384)
    GPTOSSForCausalLM(config).save_pretrained(tmp_path / "m")
    needed = cache_bytes(config, 4, 8192, torch.float32)
    monkeypatch.setattr("ossgpt.cli.serve.available_memory", lambda: needed - 1)
    assert main(["serve", "--checkpoint", str(tmp_path / "m"), "--device", "cpu", "--max-batch", "4"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"--max-batch 4 x --max-length 8192 tokens needs {needed / GB:.1f} GB" in error and "lower" in error


def test_cli_serves_a_checkpoint(tmp_path):
    torch.manual_seed(2)
    GPTOSSForCausalLM(tiny_config(vocab_size=257, tokenizer="bytes", eos_token_id=256)).save_pretrained(tmp_path / "m")
    with socket.socket() as sock:  # a free port (released for the server to take)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "ossgpt", "serve", "--checkpoint", str(tmp_path / "m"), "--port", str(port),
               "--max-batch", "2", "--max-length", "64", "--temperature", "0"]  # fmt: skip
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stderr.read()
            assert time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"][0]["id"] == "m"
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "abc", "max_tokens": 3}).json()
        assert reply["usage"]["completion_tokens"] <= 3 and reply["choices"][0]["finish_reason"] in ("stop", "length")
    finally:
        server.send_signal(signal.SIGINT)
        _, errors = server.communicate(timeout=30)
    assert server.returncode == 0 and "serving m at http://127.0.0.1" in errors and "Traceback" not in errors
