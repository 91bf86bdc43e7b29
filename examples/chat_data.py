"""Conversations that a tiny model can learn to answer in the Harmony chat format in a few CPU minutes.

    python examples/chat_data.py --out runs/chat/data    # train.jsonl (4,000) and heldout.jsonl (200), seed 0

Four tasks. The user asks; the assistant reasons step by step in `thinking` (Harmony's analysis channel) and gives
the answer alone in `content` (the final channel):

    task     user                                          thinking (abridged)                    content
    add      What is 47 + 38?                              Ones: 7 + 8 = 15, write 5, carry 1...  85
    compare  Which is larger, 47 or 82?                    Tens: 4 and 8; 8 is larger. So 82.     82
    reverse  Reverse the letters: d o g s                  The letters are d o g s. Backwards...  s g o d
    count    How many times does a appear in: b a n a n?   Tally: b 0, a 1, n 1, a 2, n 2. So 2.  2

Each step is something a small transformer does well (look up a one-digit sum or comparison, copy a token from a
position, add one to a tally), and every step the answer needs is written out before it. Letters are written
apart ("c a t") so that each is one token (" a"), as the digits of a number are in the tiny preset's vocabulary.
All questions of a task have the same shape (2-digit numbers, 4 or 5 letters), so what the reply copies from the
question is always the same number of tokens back and can be fetched by position alone: a model pretrained for
minutes on novels cannot yet find a token by its content (it has no induction heads: `make demo`'s model continues
"Mr. Darcy said to Mr. Bingley that Mr. Dar" with "ms").

The chance level of an example is the probability that a uniform guess among the answers its question allows is
right, what accuracy must be compared with:

    add      1/179        the sum of two numbers of 10..99 is one of 20..198
    compare  1/2          one of the two numbers (never equal)
    reverse  1/k! = 1/24  an ordering of the k = 4 distinct letters
    count    1/(k+1)      0..k times in k = 5 letters (drawn from 3 letters, so that counts vary)

Both files hold what `ossgpt sft --data` reads: one {"messages": [user, assistant]} a line, the assistant message
with `thinking` and `content`. heldout.jsonl's questions are never train.jsonl's; `describe(question)` gives a
question's task and chance level back, for examples/chat_eval.py. Both files are the same for the same --seed.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ossgpt.atomic import atomic_directory

# The letters of the word tasks: not q, u, x and z, too rare in English as one-letter words for a compact vocabulary
# fitted on English text (the tiny preset's) to keep them as tokens " q": split into " " and "q" they are harder
# to copy than the others.
LETTERS = "abcdefghijklmnoprstvwy"


@dataclass(frozen=True)
class Example:
    task: str
    question: str
    thinking: str
    answer: str

    def messages(self) -> list[dict]:
        """The conversation in the OpenAI chat format, reasoning in `thinking`."""
        return [
            {"role": "user", "content": self.question},
            {"role": "assistant", "thinking": self.thinking, "content": self.answer},
        ]


# ------------------------------------------------------------------------------------------------------- tasks
def add(rng: random.Random) -> Example:
    """Two 2-digit numbers added column by column, the carry written out."""
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    ones = a % 10 + b % 10
    carry = ones // 10
    if carry:
        steps = f"Ones: {a % 10} + {b % 10} = {ones}, write {ones % 10}, carry 1. Tens: {a // 10} + {b // 10} + 1"
    else:
        steps = f"Ones: {a % 10} + {b % 10} = {ones}, write {ones}. Tens: {a // 10} + {b // 10}"
    thinking = f"{steps} = {a // 10 + b // 10 + carry}. So {a} + {b} = {a + b}."
    return Example("add", f"What is {a} + {b}?", thinking, str(a + b))


def compare(rng: random.Random) -> Example:
    """The larger of two different 2-digit numbers: tens first, ones when the tens are equal."""
    a, b = rng.sample(range(10, 100), 2)
    larger = max(a, b)
    if a // 10 != b // 10:
        thinking = f"Tens: {a // 10} and {b // 10}; {max(a // 10, b // 10)} is larger. So {larger}."
    else:
        thinking = f"Tens: both {a // 10}. Ones: {a % 10} and {b % 10}; {max(a % 10, b % 10)} is larger. So {larger}."
    return Example("compare", f"Which is larger, {a} or {b}?", thinking, str(larger))


def reverse(rng: random.Random) -> Example:
    """4 distinct letters, backwards."""
    letters = rng.sample(LETTERS, 4)
    forward, backward = " ".join(letters), " ".join(reversed(letters))
    thinking = f"The letters are {forward}. Backwards: {backward}."
    return Example("reverse", f"Reverse the letters: {forward}", thinking, backward)


def count(rng: random.Random) -> Example:
    """How often a letter occurs in 5 letters drawn from 3, tallied letter by letter."""
    alphabet = rng.sample(LETTERS, 3)
    letters = [rng.choice(alphabet) for _ in range(5)]
    target = rng.choice(alphabet)
    tally, steps = 0, []
    for letter in letters:
        tally += letter == target
        steps.append(f"{letter} {tally}")
    question = f"How many times does {target} appear in: {' '.join(letters)}?"
    thinking = f"Tally: {', '.join(steps)}. So {tally}."
    return Example("count", question, thinking, str(tally))


TASKS: dict[str, Callable[[random.Random], Example]] = {"add": add, "compare": compare, "reverse": reverse,
                                                        "count": count}  # fmt: skip
# Each task's questions, and the chance level of one (the module docstring's table) from its letters.
QUESTIONS: dict[str, tuple[re.Pattern, Callable[[list[str]], float]]] = {
    "add": (re.compile(r"What is \d\d \+ \d\d\?"), lambda letters: 1 / (198 - 20 + 1)),
    "compare": (re.compile(r"Which is larger, \d\d or \d\d\?"), lambda letters: 1 / 2),
    "reverse": (
        re.compile(r"Reverse the letters: ([a-z](?: [a-z])*)"),
        lambda letters: 1 / math.factorial(len(letters)),
    ),
    "count": (
        re.compile(r"How many times does [a-z] appear in: ([a-z](?: [a-z])*)\?"),
        lambda letters: 1 / (len(letters) + 1),
    ),
}


def describe(question: str) -> tuple[str, float]:
    """(task, chance level) of a question this module writes; ValueError for any other text."""
    for task, (pattern, chance) in QUESTIONS.items():
        match = pattern.fullmatch(question)
        if match:
            return task, chance(match.group(1).split() if match.groups() else [])
    raise ValueError(f"not a question of examples/chat_data.py: {question!r}")


def make_splits(n_train: int, n_heldout: int, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """(train, heldout): the tasks in turn, every question distinct, so no held-out question is ever trained on.

    Each list has n // len(TASKS) examples of every task (n rounded down to a multiple of the task count)."""
    rng = random.Random(seed)
    seen: set[str] = set()

    def draw(n: int) -> list[Example]:
        examples = []
        for _ in range(n // len(TASKS)):
            for name, task in TASKS.items():
                for _ in range(1000):  # a new question is nearly always found at once
                    example = task(rng)
                    if example.question not in seen:
                        break
                else:
                    raise ValueError(f"cannot draw {n // len(TASKS)} more distinct {name} questions; ask for fewer")
                seen.add(example.question)
                examples.append(example)
        return examples

    heldout = draw(n_heldout)  # first, so that the held-out set does not depend on the size of the train set
    return draw(n_train), heldout


def write_splits(out: Path, train: list[Example], heldout: list[Example]) -> None:
    """out/train.jsonl and out/heldout.jsonl, one conversation a line; the folder appears whole or not at all."""
    with atomic_directory(out) as tmp:
        for name, examples in (("train.jsonl", train), ("heldout.jsonl", heldout)):
            (tmp / name).write_text("".join(json.dumps({"messages": e.messages()}) + "\n" for e in examples))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for train.jsonl and heldout.jsonl")
    parser.add_argument("--train", type=int, default=4000, help="training conversations (default: %(default)s)")
    parser.add_argument("--heldout", type=int, default=200, help="held-out conversations (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for flag in ("train", "heldout"):
        if getattr(args, flag) < len(TASKS):
            parser.error(f"--{flag} must be at least {len(TASKS)}, one conversation per task")
    train, heldout = make_splits(args.train, args.heldout, args.seed)
    write_splits(args.out, train, heldout)
    print(f"wrote {len(train)} training and {len(heldout)} held-out conversations ({', '.join(TASKS)}) to {args.out}")


if __name__ == "__main__":
    main()
