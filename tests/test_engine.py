"""Continuous batching (ossgpt.inference.engine): requests joining and leaving a running batch get exactly what they
get decoded alone; stop tokens, cancellation and row reuse, length checks, per-request seeded sampling, the loop
thread; and the per-row KV cache columns underneath (ossgpt.model.cache)."""

import queue
import random
import threading

import pytest
import torch

from ossgpt import GPTOSSConfig, GPTOSSForCausalLM
from ossgpt.inference.engine import Engine, Event, Request, cache_bytes
from ossgpt.inference.generate import DecodeSession, generate_batch
from ossgpt.inference.sampling import Sampler
from ossgpt.model.cache import KVCache
from ossgpt.options import RuntimeOptions

WINDOW = 6  # the sliding layer's window: shorter than most sequences below, so its ring buffer wraps


def tiny_model(attention: str = "sdpa") -> GPTOSSForCausalLM:
    torch.manual_seed(0)
    config = GPTOSSConfig(vocab_size=257, eos_token_id=256, tie_word_embeddings=False, hidden_size=32,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                          num_local_experts=4, num_experts_per_tok=2, intermediate_size=24,
                          sliding_window=WINDOW, max_position_embeddings=96,
                          rope_theta=10000.0, rope_type="default", rope_factor=1.0)  # fmt: skip
    assert config.layer_types == ["sliding_attention", "full_attention"]
    model = GPTOSSForCausalLM(config, RuntimeOptions(attention=attention)).eval()
    with torch.no_grad():  # larger scales: sharper attention, whose output weighs more, so every cached key and value
        model.lm_head.weight.mul_(20)  # of the context changes the next token (a sharper test)
        for layer in model.layers:
            for projection, scale in (("q_proj", 8), ("k_proj", 8), ("v_proj", 4), ("o_proj", 4)):
                getattr(layer.self_attn, projection).weight.mul_(scale)
    return model


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def model(request):
    return tiny_model(request.param)


def run_to_end(engine: Engine, submissions: dict[int, list[Request]]) -> tuple[dict[int, list[Event]], int]:
    """Step until idle, submitting submissions[s] before step s. Returns each request's events (by the index of the
    request in submission order) and the most rows a decode step ran."""
    ids, events, most_rows, step = {}, {}, 0, 0
    while step <= max(submissions) or not engine.idle:
        for request in submissions.get(step, []):
            ids[engine.submit(request)] = len(ids)
        for event in engine.step():
            events.setdefault(ids[event.request_id], []).append(event)
        most_rows = max(most_rows, len(engine.rows))
        step += 1
    return events, most_rows


def tokens(events: list[Event]) -> list[int]:
    return [e.token for e in events if e.token is not None]


def random_prompts(count: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(256) for _ in range(rng.randint(1, 20))], rng.randint(1, 25)) for _ in range(count)]


# --------------------------------------------------------------------------------------------------- greedy
def test_requests_joining_and_leaving_get_what_they_get_alone(model):
    """16 requests of 1-20 prompt tokens and 1-25 new tokens, one submitted every other step (and three at once),
    through 5 rows: each greedy output equals the prompt decoded alone, though rows join, finish and move."""
    jobs = random_prompts(16)
    submissions = {2 * i: [Request(prompt, n)] for i, (prompt, n) in enumerate(jobs[:13])}
    submissions[5] = submissions.get(5, []) + [Request(prompt, n) for prompt, n in jobs[13:]]
    order = [r for s in sorted(submissions) for r in submissions[s]]
    events, most_rows = run_to_end(Engine(model, max_batch=5, max_length=48), submissions)
    assert most_rows == 5  # the batch was full at times: requests waited for rows
    for i, request in enumerate(order):
        alone = generate_batch(model, [request.prompt], request.max_new_tokens)[0]
        assert tokens(events[i]) == alone, i
        assert [e.finish_reason for e in events[i]] == [None] * (len(alone) - 1) + ["length"]
        assert all(e.prompt_tokens == len(request.prompt) for e in events[i])


def test_requests_admitted_together_get_what_they_get_alone(model):
    """Seven requests waiting at once, with prompts shorter and longer than the window (and than each other), are
    prefilled in one forward into rows that still hold finished requests; each then decodes as alone. The admitting
    step returns each one's first token only; the next step decodes every row."""
    engine = Engine(model, max_batch=7, max_length=64)
    run_to_end(engine, {0: [Request(list(range(40, 60)), 9), Request([3], 12)]})  # rows to be reused
    prompts = [[7], list(range(100, 120)), [9, 8, 7, 6, 5], list(range(60, 66)), list(range(1, 8)), [200, 3], [5] * 13]
    ids = [engine.submit(Request(prompt, 8)) for prompt in prompts]
    first = engine.step()
    assert [e.request_id for e in first] == ids and len(engine.rows) == len(prompts)
    second = engine.step()
    assert [e.request_id for e in second] == ids
    events = first + second
    while not engine.idle:
        events += engine.step()
    for request_id, prompt in zip(ids, prompts):
        assert tokens([e for e in events if e.request_id == request_id]) == generate_batch(model, [prompt], 8)[0]


def test_prefill_budget(model):
    """An admission prefills at most prefill_tokens tokens, padding included: two prompts of 8 tokens fit in 20,
    a third does not; a prompt longer than the budget is admitted alone; a short one after it waits for the next
    admission, after a decode step. Outputs are as decoded alone, and requests finishing at their first token leave
    the rows to the others."""
    engine = Engine(model, max_batch=8, max_length=48, prefill_tokens=20)
    prompts = [list(range(10, 18)), list(range(20, 28)), list(range(30, 38)), list(range(40, 65)), [1, 2]]
    ids = [engine.submit(Request(prompt, 6)) for prompt in prompts]
    once = engine.submit(Request([4, 5, 6], 1))
    events, admitted, started = [], [], set()  # admitted[s]: the requests whose first token came at step s
    while not engine.idle:
        step = engine.step()
        events += step
        admitted.append([e.request_id for e in step if e.request_id not in started])
        started.update(admitted[-1])
    assert admitted[:7] == [ids[:2], [], ids[2:3], [], ids[3:4], [], [ids[4], once]]  # a decode step after each
    assert [e.finish_reason for e in events if e.request_id == once] == ["length"]
    for request_id, prompt in zip(ids, prompts):
        assert tokens([e for e in events if e.request_id == request_id]) == generate_batch(model, [prompt], 6)[0]
    with pytest.raises(ValueError, match="prefill_tokens must be at least 1"):
        Engine(model, prefill_tokens=0)


def test_cache_bytes(model):
    engine = Engine(model, max_batch=3, max_length=40)
    tensors = [t for layer in engine.cache.layers for t in (layer.keys, layer.values, layer.positions)]
    assert cache_bytes(model.config, 3, 40, model.dtype) == sum(t.numel() * t.element_size() for t in tensors)


def test_equals_a_decode_session_past_the_window(model):
    prompt = list(range(30, 50))  # 20 tokens, past the window of 6, then 30 more
    session = DecodeSession(model)
    session.extend(prompt)
    alone = list(session.generate(30))
    events, _ = run_to_end(Engine(model, max_batch=3), {0: [Request(prompt, 30), Request([7, 8], 40)]})
    assert tokens(events[0]) == alone


def test_stop_tokens_end_a_request_and_are_included(model):
    prompt = [5, 9, 77]
    free = generate_batch(model, [prompt], 20)[0]
    stop = free[6]
    first = free.index(stop)
    other = [40, 41, 42]
    stopping = Request(prompt, 20, stop_token_ids=(1000, stop))
    events, _ = run_to_end(Engine(model, max_batch=2), {0: [stopping, Request(other, 20)]})
    assert tokens(events[0]) == free[: first + 1]
    assert events[0][-1].finish_reason == "stop"
    assert tokens(events[1]) == generate_batch(model, [other], 20)[0]


def test_cancel_frees_the_row_for_a_later_request(model):
    """Cancelling a long request (past the window) mid-way frees its row, the waiting request that takes it over
    decodes as alone; a request cancelled while waiting never runs."""
    engine = Engine(model, max_batch=2, max_length=64)
    long, short, later, dropped = list(range(100, 125)), [9, 10], [200, 201, 202], [1, 2]
    a = engine.submit(Request(long, 30))
    b = engine.submit(Request(short, 30))
    c = engine.submit(Request(later, 12))
    d = engine.submit(Request(dropped, 5))
    events = []
    for _ in range(4):
        events += engine.step()
    assert [r.id for r in engine.rows] == [a, b]
    engine.cancel(a)
    engine.cancel(d)
    engine.cancel(12345)  # unknown or already finished: ignored
    while not engine.idle:
        events += engine.step()
    by_id = {i: [e for e in events if e.request_id == i] for i in (a, b, c, d)}
    assert by_id[a][-1] == Event(a, None, "cancelled", len(long)) and len(by_id[a]) == 5  # 1 + 3 tokens, then cancelled
    assert by_id[d] == [Event(d, None, "cancelled", len(dropped))]
    assert tokens(by_id[b]) == generate_batch(model, [short], 30)[0]
    assert tokens(by_id[c]) == generate_batch(model, [later], 12)[0]


# ------------------------------------------------------------------------------------------------- sampling
def test_seeded_sampling_does_not_depend_on_the_batch(model):
    """A seeded request samples the same tokens alone, among other (sampled, penalised, greedy) requests joining at
    other steps, and as generate_batch samples them with that seed; a Sampler reused for a second request
    restarts from its seed."""
    sampler = Sampler(do_sample=True, temperature=1.5, top_p=0.9, seed=7)
    prompt = [11, 12, 13, 14]
    reference = generate_batch(model, [prompt], 30, do_sample=True, temperature=1.5, top_p=0.9, seed=7)[0]
    alone, _ = run_to_end(Engine(model, max_batch=4), {0: [Request(prompt, 30, sampler)]})
    companions = {
        0: [Request([1, 2, 3], 20, Sampler(do_sample=True, seed=1)), Request([4] * 9, 10)],
        2: [Request(prompt, 30, sampler)],
        3: [Request([60, 61], 25, Sampler(do_sample=True, top_k=5, repetition_penalty=1.3, seed=2))],
        6: [Request(prompt, 30, sampler)],
    }
    mixed, _ = run_to_end(Engine(model, max_batch=4), companions)
    assert tokens(alone[0]) == reference
    assert tokens(mixed[2]) == reference and tokens(mixed[4]) == reference


def test_repetition_penalty_per_request(model):
    prompt = [20, 21, 20, 21]
    reference = generate_batch(model, [prompt], 20, repetition_penalty=1.5)[0]
    events, _ = run_to_end(
        Engine(model, max_batch=2), {0: [Request([5], 20), Request(prompt, 20, Sampler(repetition_penalty=1.5))]}
    )
    assert tokens(events[1]) == reference
    assert tokens(events[0]) == generate_batch(model, [[5]], 20)[0]


# ----------------------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    "request_, message",
    [
        (Request([1] * 30, 20), r"prompt \(30 tokens\) \+ max_new_tokens \(20\) exceeds the 48 tokens"),
        (Request([], 5), "prompt is empty"),
        (Request([1, 257], 5), r"must be in \[0, 257\)"),
        (Request([1], 0), "max_new_tokens must be at least 1"),
    ],
)
def test_bad_requests(model, request_, message):
    engine = Engine(model, max_length=48)
    with pytest.raises(ValueError, match=message):
        engine.submit(request_)
    assert engine.idle
    engine.submit(Request([1] * 30, 18))  # exactly fits


def test_bad_engine_arguments(model):
    with pytest.raises(ValueError, match="max_length must be in"):
        Engine(model, max_length=97)  # the context is 96
    with pytest.raises(ValueError, match="max_batch must be at least 1"):
        Engine(model, max_batch=0)
    engine = Engine(model)
    assert engine.max_length == 96
    assert [layer.keys.shape[2] for layer in engine.cache.layers] == [WINDOW, 96]  # sliding layers: the window


# ---------------------------------------------------------------------------------------------------- thread
def test_run_loop_in_a_thread(model):
    """The engine thread loops `run`; requests submitted from this thread finish, as decoded alone."""
    engine = Engine(model, max_batch=2)
    received: queue.Queue[Event] = queue.Queue()
    stop = threading.Event()
    thread = threading.Thread(target=engine.run, args=(stop, lambda events: [received.put(e) for e in events]))
    thread.start()
    try:
        prompts = {engine.submit(Request([i + 1, i + 2], 6)): [i + 1, i + 2] for i in range(3)}
        outputs, finished = {i: [] for i in prompts}, set()
        while len(finished) < len(prompts):
            event = received.get(timeout=30)
            outputs[event.request_id].append(event.token)
            if event.finish_reason is not None:
                finished.add(event.request_id)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive()
    for i, prompt in prompts.items():
        assert outputs[i] == generate_batch(model, [prompt], 6)[0]


# ------------------------------------------------------------------------------------------ per-row cache columns
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_one_step_over_rows_of_different_lengths(attention):
    """Rows prefilled one at a time through one-row views, then one step at per-row columns: each row's logits equal
    a full forward over its own sequence (rows shorter and longer than the window)."""
    model = tiny_model(attention)
    sequences = [list(range(1, 4)), list(range(10, 25)), list(range(30, 39))]
    cache = KVCache(model.config, 3, 40)
    with torch.no_grad():
        for row, sequence in enumerate(sequences):
            view = cache.narrow(row, 1)
            model(torch.tensor([sequence[:-1]]), cache=view)
        columns = torch.tensor([len(s) - 1 for s in sequences])
        view = cache.narrow(0, 3, columns=int(columns.max()) + 1)
        view.seen = columns
        step = model(torch.tensor([[s[-1]] for s in sequences]), positions=columns[:, None], cache=view).logits
        for row, sequence in enumerate(sequences):
            full = model(torch.tensor([sequence])).logits[0, -1]
            assert torch.allclose(step[row, 0], full, atol=1e-5), row
    assert view.seen.tolist() == [3, 15, 9]
    with pytest.raises(ValueError, match="one token per row"):
        cache.layers[0].update(torch.zeros(3, 2, 2, 8), torch.zeros(3, 2, 2, 8), torch.zeros(3, 2), columns)
