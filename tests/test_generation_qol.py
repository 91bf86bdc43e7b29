"""Generation conveniences: batches of token lists, stop tokens and strings, repetition penalty, min-p, seeds,
argument checks, and the resumable DecodeSession that the chat keeps across turns."""

import math

import pytest
import torch

from ossgpt import GPTOSSConfig, GPTOSSForCausalLM
from ossgpt.inference.generate import DecodeSession, generate_batch, stream
from ossgpt.inference.sampling import Sampler, apply_repetition_penalty, filter_logits, greedy
from ossgpt.tokenizer import ByteTokenizer


def tiny_model(seed: int = 0, **overrides) -> GPTOSSForCausalLM:
    torch.manual_seed(seed)
    values = dict(vocab_size=257, eos_token_id=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
                  intermediate_size=24, sliding_window=6, max_position_embeddings=512, rope_theta=10000.0,
                  rope_type="default", rope_factor=1.0)  # fmt: skip
    model = GPTOSSForCausalLM(GPTOSSConfig(**{**values, **overrides})).eval()
    with torch.no_grad():  # a larger output scale makes greedy decoding less repetitive, hence a sharper test
        model.lm_head.weight.mul_(20)
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def greedy_reference(model, prompt: list[int], steps: int, penalty: float | None = None) -> list[int]:
    """Greedy decoding by full forward passes, with the repetition penalty applied in closed form."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([seq])).logits[0, -1]
            if penalty is not None:
                for token in set(seq):
                    logits[token] = logits[token] / penalty if logits[token] > 0 else logits[token] * penalty
            seq.append(int(logits.argmax()))
    return seq[len(prompt) :]


# ---------------------------------------------------------------------------------------------------- batching
def test_batch_of_token_lists_equals_one_prompt_at_a_time(model):
    prompts = [[5, 9, 77], list(range(40, 52)), [200], list(range(100, 107))]
    batched = generate_batch(model, prompts, max_new_tokens=15)
    for prompt, output in zip(prompts, batched):
        assert output == greedy_reference(model, prompt, 15)


def test_each_row_stops_at_its_own_stop_token(model):
    prompts = [[5, 9, 77], list(range(40, 52))]
    free = generate_batch(model, prompts, max_new_tokens=15)
    stop = free[0][6]  # a token the first row emits
    first = free[0].index(stop)
    unused = next(t for t in range(257) if t not in free[0] + free[1])
    stopped = generate_batch(model, prompts, max_new_tokens=15, eos_token_id=[unused, stop])
    assert stopped[0] == free[0][: first + 1]
    assert stopped[1] == (free[1][: free[1].index(stop) + 1] if stop in free[1] else free[1])


# ------------------------------------------------------------------------------------------------ stop strings
def test_stop_string_spanning_tokens(model):
    tokenizer = ByteTokenizer()  # one token per byte: a stop string of 2 bytes spans 2 tokens
    prompt = list(b"Once")
    free = generate_batch(model, [prompt], max_new_tokens=20)[0]
    i = next(i for i in range(len(free) - 1) if free[i] < 128 and free[i + 1] < 128)  # two ASCII bytes in a row
    stop = bytes(free[i : i + 2]).decode()
    end = bytes(free).index(stop.encode()) + 2  # its first occurrence
    got = generate_batch(model, [prompt, [1, 2, 3]], max_new_tokens=20, stop_strings=[stop], tokenizer=tokenizer)
    assert got[0] == free[:end]
    ids = torch.tensor([prompt])
    streamed = [int(t) for t in stream(model, ids, 20, stop_strings=[stop], tokenizer=tokenizer)]
    assert streamed == free[:end]
    assert [int(t) for t in model.stream(ids, max_new_tokens=20, stop_strings=[stop], tokenizer=tokenizer)] == streamed
    with pytest.raises(ValueError, match="need a tokenizer"):
        list(stream(model, ids, 5, stop_strings=["x"]))


# --------------------------------------------------------------------------------------- penalties and filters
def test_repetition_penalty_closed_form():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -2.0, 0.5, -3.0]]
    assert apply_repetition_penalty(logits, seen, 0.5).tolist() == [[4.0, -0.5, 0.5, -3.0]]  # < 1 encourages


def test_repetition_penalty_in_generation(model):
    prompt = [5, 9, 77, 5]
    for penalty in (1.3, 3.0):
        got = generate_batch(model, [prompt], max_new_tokens=12, repetition_penalty=penalty)[0]
        assert got == greedy_reference(model, prompt, 12, penalty)
    assert generate_batch(model, [prompt], 12, repetition_penalty=3.0) != generate_batch(model, [prompt], 12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_greedy_is_torch_argmax_with_ties_and_nans(dtype):
    """The greedy pick (numpy's argmax on the CPU) is torch.argmax's: the first of tied maxima, NaN above all."""
    logits = torch.randn(6, 1000, generator=torch.Generator().manual_seed(0)).to(dtype)
    logits[1, [7, 500, 999]] = 50.0  # ties: the first wins
    logits[2, [3, 900]] = float("nan")  # NaN counts as largest, the first one
    logits[3] = float("-inf")
    logits[4, -1] = float("inf")
    picked = greedy(logits)
    assert picked.dtype == torch.int64 and torch.equal(picked, logits.argmax(dim=-1))
    assert picked[:5].tolist()[1:] == [7, 3, 0, 999]
    assert torch.equal(greedy(logits[:, ::2]), logits[:, ::2].argmax(dim=-1))  # a strided view


def test_min_p_closed_form():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    assert filter_logits(logits, min_p=0.5).isfinite().tolist() == [[True, True, False, False]]  # p >= 0.25
    assert filter_logits(logits, min_p=0.0).isfinite().all()
    assert filter_logits(logits, min_p=1.0).isfinite().tolist() == [[True, False, False, False]]
    # With temperature T the probabilities become p^(1/T) (renormalised): keep p_i^(1/T) >= min_p * p_max^(1/T).
    T, min_p = 2.0, 0.5
    kept = [(p / 0.5) ** (1 / T) >= min_p for p in probs[0].tolist()]
    assert filter_logits(logits / T, min_p=min_p).isfinite()[0].tolist() == kept == [True, True, True, False]
    sampler = Sampler(do_sample=True, temperature=T, min_p=min_p, generator=torch.Generator().manual_seed(0))
    draws = {int(sampler(logits)[0]) for _ in range(300)}
    assert draws == {0, 1, 2}


def test_seeded_sampling_is_repeatable(model):
    prompt = torch.tensor([[5, 9, 77]])
    a = [int(t) for t in stream(model, prompt, 12, do_sample=True, temperature=5.0, seed=3)]
    b = [int(t) for t in stream(model, prompt, 12, do_sample=True, temperature=5.0, seed=3)]
    c = [int(t) for t in stream(model, prompt, 12, do_sample=True, temperature=5.0, seed=4)]
    assert a == b != c
    assert generate_batch(model, [[5, 9]], 8, do_sample=True, top_k=50, min_p=0.05, seed=1) == generate_batch(
        model, [[5, 9]], 8, do_sample=True, top_k=50, min_p=0.05, seed=1
    )
    with pytest.raises(ValueError, match="either a generator or a seed"):
        list(stream(model, prompt, 2, seed=1, generator=torch.Generator()))


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(temperature=-0.5), "temperature must be >= 0"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(min_p=-0.1), r"min_p must be in \[0, 1\]"),
        (dict(min_p=1.1), r"min_p must be in \[0, 1\]"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
        (dict(repetition_penalty=-1.0), "repetition_penalty must be > 0"),
    ],
)
def test_bad_arguments(model, bad, message):
    with pytest.raises(ValueError, match=message):
        list(stream(model, torch.tensor([[1, 2]]), 3, do_sample=True, **bad))
    with pytest.raises(ValueError, match=message):
        generate_batch(model, [[1, 2]], 3, **bad)


def test_prompt_longer_than_the_context(model):
    with pytest.raises(ValueError, match="longer than the model's context of 512"):
        generate_batch(model, [list(range(100)) * 6], 1)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generate_batch(model, [list(range(100)) * 5], 20)
    with pytest.raises(ValueError, match="non-empty prompts"):
        generate_batch(model, [[1], []], 3)


# ---------------------------------------------------------------------------------------------- DecodeSession
def test_session_extends_across_turns_like_one_long_sequence(model):
    """Turns of 2..60 tokens, past the sliding window and past the cache's first capacity of 256 columns."""
    g = torch.Generator().manual_seed(0)
    session = DecodeSession(model)
    sequence = []
    with torch.no_grad():
        for length in (60, 2, 150, 1, 45, 30):
            turn = torch.randint(0, 256, (length,), generator=g).tolist()
            session.extend(turn)
            sequence += turn
            expected = model(torch.tensor([sequence])).logits[0, -1]
            assert torch.allclose(session.logits, expected, atol=1e-4), len(sequence)
    assert session.cache.max_length == 512 and session.tokens == sequence

    generated = list(session.generate(10))
    assert generated == greedy_reference(model, sequence, 10)
    assert session.tokens == sequence + generated[:-1]  # the last generated token is left to the caller


def test_session_generation_stops_and_fills_the_context():
    model = tiny_model(max_position_embeddings=40)
    session = DecodeSession(model)
    session.extend(list(range(30)))
    free = list(session.generate(5))
    stop = free[2]
    session = DecodeSession(model)
    session.extend(list(range(30)))
    assert list(session.generate(5, stop_token_ids=[stop])) == free[: free.index(stop) + 1]

    session = DecodeSession(model)
    session.extend(list(range(30)))
    assert len(list(session.generate(50))) == 11  # 10 more fit in the context, plus a last one that is not added
    assert session.room == 0
    with pytest.raises(ValueError, match="more than the context of 40"):
        session.extend([1])


def test_interrupted_forward_leaves_a_consistent_session(model, monkeypatch):
    session = DecodeSession(model)
    session.extend(list(range(50)))
    second_layer = model.layers[1]
    original = type(second_layer).forward

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(second_layer), "forward", interrupted)  # layer 0 stores its keys, then Ctrl-C
    with pytest.raises(KeyboardInterrupt):
        session.extend([7, 8, 9])
    monkeypatch.setattr(type(second_layer), "forward", original)
    assert len(session.tokens) == 50
    session.extend([3, 4])
    with torch.no_grad():
        expected = model(torch.tensor([list(range(50)) + [3, 4]])).logits[0, -1]
    assert torch.allclose(session.logits, expected, atol=1e-4)


def test_session_repetition_penalty(model):
    session = DecodeSession(model)
    session.extend([5, 9, 77, 5])
    got = list(session.generate(8, Sampler(repetition_penalty=2.0)))
    assert got == greedy_reference(model, [5, 9, 77, 5], 8, 2.0)
    assert math.isfinite(float(session.logits.max()))
