"""examples/chat_data.py and examples/chat_eval.py, the scripts of `make chat-demo`: the conversation set (disjoint,
seeded splits whose answers are right and readable by `ossgpt sft`) and the grading of replies."""

import json
import math
import random
import re
import sys
from pathlib import Path

import pytest

from ossgpt.chat.harmony import Harmony
from ossgpt.tokenizer import CompactTokenizer

ROOT = Path(__file__).resolve().parents[1]
CL100K_FILE = ROOT.parent / "shared" / "tokenizers" / "cl100k_base.tiktoken"
sys.path.insert(0, str(ROOT / "examples"))

import chat_data  # noqa: E402
import chat_eval  # noqa: E402


@pytest.fixture(scope="module")
def harmony() -> Harmony:
    """Harmony on a compact cl100k vocabulary, as the tiny preset's models have it."""
    if not CL100K_FILE.is_file():
        pytest.skip(f"cl100k_base ranks not found at {CL100K_FILE}")
    text = "What is the answer? The letters are a b c. Ones: 1 + 2 = 3. So it is larger."
    return Harmony(CompactTokenizer.fit("cl100k_base", [text], 32, vocab_file=CL100K_FILE))


def solve(question: str) -> str:
    """The answer to a question of chat_data, computed here from its text alone."""
    if m := re.fullmatch(r"What is (\d+) \+ (\d+)\?", question):
        return str(int(m[1]) + int(m[2]))
    if m := re.fullmatch(r"Which is larger, (\d+) or (\d+)\?", question):
        return str(max(int(m[1]), int(m[2])))
    if m := re.fullmatch(r"Reverse the letters: (.*)", question):
        return " ".join(m[1].split()[::-1])
    if m := re.fullmatch(r"How many times does (\w) appear in: (.*)\?", question):
        return str(m[2].split().count(m[1]))
    raise AssertionError(f"unknown question {question!r}")


# ------------------------------------------------------------------------------------------------------- the data
def test_splits_are_disjoint_seeded_and_balanced():
    train, heldout = chat_data.make_splits(400, 40, seed=3)
    assert len(train) == 400 and len(heldout) == 40
    assert not {e.question for e in train} & {e.question for e in heldout}
    assert len({e.question for e in train}) == 400  # no question twice
    assert [e.task for e in heldout[:4]] == list(chat_data.TASKS)
    assert all(sum(e.task == t for e in train) == 100 for t in chat_data.TASKS)
    again = chat_data.make_splits(40, 40, seed=3)
    assert again[1] == heldout  # the held-out set depends on the seed only, not on the train size
    assert chat_data.make_splits(400, 40, seed=4)[1] != heldout


def test_answers_reasoning_and_chance_levels():
    train, _ = chat_data.make_splits(2000, 4, seed=0)
    seen_carry = seen_equal_tens = False
    for e in train:
        assert e.answer == solve(e.question), e
        assert e.thinking.endswith(f"{e.answer}.")  # the reasoning ends at the answer it gives
        task, chance = chat_data.describe(e.question)
        assert task == e.task
        if task == "add":
            assert chance == 1 / 179
            seen_carry |= "carry 1" in e.thinking
        elif task == "compare":
            assert chance == 1 / 2
            seen_equal_tens |= "both" in e.thinking
        elif task == "reverse":
            assert len(set(e.answer.split())) == 4 and chance == 1 / math.factorial(4)
        else:
            assert len(e.question.split(":")[1].split()) == 5 and chance == 1 / 6
    assert seen_carry and seen_equal_tens
    with pytest.raises(ValueError, match="not a question"):
        chat_data.describe("What is 1 + 2?")


def test_files_are_what_ossgpt_sft_reads(harmony, tmp_path):
    from ossgpt.training.sft_data import read_examples

    chat_data.main(["--out", str(tmp_path / "data"), "--train", "8", "--heldout", "4", "--seed", "1"])
    lines = (tmp_path / "data" / "heldout.jsonl").read_text().splitlines()
    assert len(lines) == 4 and set(json.loads(lines[0])) == {"messages"}
    for name in ("train.jsonl", "heldout.jsonl"):
        examples = read_examples(tmp_path / "data" / name, harmony)
        assert len(examples) == (8 if name == "train.jsonl" else 4) and all(e.targets > 0 for e in examples)
    assert [e["answer"] for e in chat_eval.read_heldout(tmp_path / "data" / "heldout.jsonl")] == [
        json.loads(line)["messages"][1]["content"] for line in lines
    ]


# ------------------------------------------------------------------------------------------------------- grading
def reply(harmony: Harmony, text: str) -> list[int]:
    """Model output tokens from text that spells the special tokens."""
    return harmony.tokenizer.encode(text, allowed_special="all")


GOOD = "<|channel|>analysis<|message|>So 3.<|end|><|start|>assistant<|channel|>final<|message|>3<|return|>"


@pytest.mark.parametrize(
    ("text", "formed", "answer"),
    [
        (GOOD, True, "3"),
        (GOOD.replace("<|return|>", ""), False, "3"),  # cut off by the token budget
        (GOOD.replace("<|return|>", "<|end|>"), False, "3"),
        ("<|channel|>final<|message|>3<|return|>", False, "3"),  # no reasoning
        ("<|channel|>analysis<|message|>So 3.<|return|>", False, None),  # no final answer
        (GOOD.replace("final", "commentary"), False, None),
        (GOOD.replace("analysis", "final"), False, "3"),  # two finals
        (GOOD.replace("<|start|>assistant", "<|start|>user"), False, None),
        (GOOD.replace("<|start|>", ""), False, None),  # text where a message should start
        (GOOD.replace("final<|message|>", "final to=functions.f<|message|>"), False, "3"),
        ("The answer is 3", False, None),  # plain text, no Harmony at all
        ("<|channel|>analysis<|message|>x<|end|>" + GOOD, False, "3"),  # two analyses
        ("", False, None),
    ],
)
def test_well_formed_and_final_answer(harmony, text, formed, answer):
    tokens = reply(harmony, text)
    assert chat_eval.well_formed(harmony, tokens) is formed
    assert chat_eval.final_answer(harmony, tokens) == answer


def test_well_formed_matches_what_training_teaches(harmony):
    """The reply a trained conversation supervises is well-formed: render_training's assistant tokens."""
    from ossgpt.chat.conversation import harmony_messages, render_training

    example = chat_data.add(random.Random(0))
    tokens, mask = render_training(harmony, harmony_messages(example.messages()))
    start = mask.index(True)
    assert chat_eval.well_formed(harmony, tokens[start:])
    assert chat_eval.final_answer(harmony, tokens[start:]) == example.answer


def test_evaluate_counts_per_task(harmony, monkeypatch):
    """Scripted replies in place of a model: the shares and chance levels that come out are the hand-counted ones."""
    _, heldout = chat_data.make_splits(4, 8, seed=0)
    examples = [
        {"messages": e.messages()[:1], "answer": e.answer, "task": e.task, "chance": chat_data.describe(e.question)[1]}
        for e in heldout
    ]
    right = GOOD.replace(">3<", ">{}<")
    scripted = [
        right.format(examples[0]["answer"]),  # add: well-formed, right
        right.format("wrong"),  # compare: well-formed, wrong
        "<|channel|>final<|message|>{}<|return|>".format(examples[2]["answer"]),  # reverse: malformed, right
        "nonsense",  # count: malformed, wrong
        *[right.format(e["answer"]) for e in examples[4:]],  # all four: well-formed, right
    ]
    prompts_seen = []

    def fake_generate(model, prompts, max_new_tokens, eos_token_id):
        assert eos_token_id == [harmony.return_, harmony.call] and max_new_tokens == 16
        prompts_seen.extend(prompts)
        return [reply(harmony, scripted[len(prompts_seen) - len(prompts) + i]) for i in range(len(prompts))]

    monkeypatch.setattr(chat_eval, "generate_batch", fake_generate)
    result = chat_eval.evaluate(None, harmony.tokenizer, examples, max_new_tokens=16, batch_size=3)
    assert len(prompts_seen) == 8 and harmony.decode(prompts_seen[0]).endswith(
        f"<|start|>user<|message|>{examples[0]['messages'][0]['content']}<|end|><|start|>assistant"
    )
    assert result["well_formed"] == 6 / 8 and result["accuracy"] == 6 / 8
    assert result["tasks"]["add"] == {"n": 2, "well_formed": 1.0, "accuracy": 1.0, "chance": 1 / 179}
    assert result["tasks"]["compare"] == {"n": 2, "well_formed": 1.0, "accuracy": 0.5, "chance": 0.5}
    assert result["tasks"]["reverse"]["well_formed"] == 0.5 and result["tasks"]["reverse"]["accuracy"] == 1.0
    assert result["tasks"]["count"]["well_formed"] == 0.5 and result["tasks"]["count"]["accuracy"] == 0.5
    assert result["chance"] == pytest.approx(sum(e["chance"] for e in examples) / 8)
    assert result["samples"]["count"] == "nonsense"

    table = chat_eval.markdown_table([{"name": "full", "checkpoint": "runs/x", **result}])
    assert table.splitlines()[0] == "| model | well-formed | accuracy (chance) | add | compare | reverse | count |"
    assert table.splitlines()[2].startswith("| full (`runs/x`) | 75% | 75% (")
    assert "| 100% (0.6%) | 50% (50.0%) |" in table
