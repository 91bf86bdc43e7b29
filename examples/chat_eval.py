"""Does a model answer in the Harmony chat format, and correctly? Greedy replies to held-out conversations.

    python examples/chat_eval.py base=runs/demo full=runs/chat/full --data runs/chat/data/heldout.jsonl

For every held-out conversation of examples/chat_data.py the model gets the prompt that `ossgpt sft` trains it
to answer (`render_prompt`: the system message, the user's question, then `<|start|>assistant`) and writes
greedily until it ends its turn (<|return|> or <|call|>) or --max-new-tokens runs out. Two measures per reply:

  well-formed  the reply is what a chat client can read: an analysis message, then a final message closed by
               <|return|>, nothing else (parsed strictly, as openai-harmony does: ossgpt.chat.harmony)
  correct      the text of its last final-channel message, parsed leniently as a chat shows it, is the
               conversation's answer; beside it the chance level (examples/chat_data.py), averaged over examples

Prints a markdown table (one row per checkpoint, per-task accuracy, chance beside every accuracy) and one reply of
each task per checkpoint; --json writes the same numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
from chat_data import describe

from ossgpt.atomic import atomic_output
from ossgpt.chat.conversation import harmony_messages, render_prompt
from ossgpt.chat.harmony import Harmony, StreamParser
from ossgpt.inference.generate import generate_batch
from ossgpt.inference.loading import load_model_and_tokenizer


def read_heldout(path: Path) -> list[dict]:
    """A heldout.jsonl's conversations as {"messages": the prompt's messages, "answer", "task", "chance"}."""
    examples = []
    for line in path.read_text().splitlines():
        *prompt, reply = json.loads(line)["messages"]
        task, chance = describe(prompt[-1]["content"])
        examples.append({"messages": prompt, "answer": reply["content"], "task": task, "chance": chance})
    return examples


def well_formed(harmony: Harmony, reply: list[int]) -> bool:
    """An analysis message, then a final message, the reply closed by <|return|> (reply: the tokens after the
    prompt's `<|start|>assistant`, the stop token included)."""
    if not reply or reply[-1] != harmony.return_:
        return False
    try:
        messages = harmony.parse(reply, role="assistant", strict=True)
    except ValueError:
        return False
    return [(m.role, m.channel, m.recipient, m.content_type) for m in messages] == [
        ("assistant", "analysis", None, None),
        ("assistant", "final", None, None),
    ]


def final_answer(harmony: Harmony, reply: list[int]) -> str | None:
    """The text of the reply's last final-channel message, as a lenient chat parser reads it; None if none."""
    parser = StreamParser(harmony, role="assistant", strict=False)
    for token in reply:
        parser.process(token)
    parser.finish()
    finals = [m.content for m in parser.messages if m.role == "assistant" and m.channel == "final"]
    return finals[-1].strip() if finals else None


def evaluate(model, tokenizer, examples: list[dict], max_new_tokens: int, batch_size: int) -> dict:
    """Greedy replies to every example, graded: {"well_formed", "accuracy", "chance", "tasks": {...},
    "samples": {task: the first reply's text}}."""
    harmony = Harmony(tokenizer)
    prompts = [render_prompt(harmony, harmony_messages(e["messages"])) for e in examples]
    replies = []
    for start in range(0, len(prompts), batch_size):
        replies += generate_batch(model, prompts[start : start + batch_size], max_new_tokens,
                                  eos_token_id=list(harmony.stop_token_ids))  # fmt: skip
    by_task = defaultdict(lambda: {"n": 0, "well_formed": 0, "correct": 0, "chance": 0.0})
    samples = {}
    for example, reply in zip(examples, replies, strict=True):
        row = by_task[example["task"]]
        row["n"] += 1
        row["well_formed"] += well_formed(harmony, reply)
        row["correct"] += final_answer(harmony, reply) == example["answer"]
        row["chance"] += example["chance"]
        samples.setdefault(example["task"], harmony.decode(reply))
    n = len(examples)
    tasks = {
        task: {"n": r["n"], "well_formed": r["well_formed"] / r["n"], "accuracy": r["correct"] / r["n"],
               "chance": r["chance"] / r["n"]}
        for task, r in by_task.items()
    }  # fmt: skip
    return {
        "well_formed": sum(r["well_formed"] for r in by_task.values()) / n,
        "accuracy": sum(r["correct"] for r in by_task.values()) / n,
        "chance": sum(r["chance"] for r in by_task.values()) / n,
        "tasks": tasks,
        "samples": samples,
    }


def markdown_table(results: list[dict]) -> str:
    """One row per evaluated checkpoint: well-formed share, accuracy (chance), per-task accuracy (chance)."""
    tasks = list(results[0]["tasks"])
    pct = "{:.0%}".format
    header = ["model", "well-formed", "accuracy (chance)", *tasks]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        cells = [
            f"{r['name']} (`{r['checkpoint']}`)",
            pct(r["well_formed"]),
            f"{pct(r['accuracy'])} ({r['chance']:.1%})",
        ]
        cells += [f"{pct(r['tasks'][t]['accuracy'])} ({r['tasks'][t]['chance']:.1%})" for t in tasks]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", metavar="[NAME=]CHECKPOINT", help="checkpoints to evaluate")
    parser.add_argument("--data", type=Path, required=True, help="a heldout.jsonl of examples/chat_data.py")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N conversations only")
    parser.add_argument(  # the data's replies are at most 90 tokens in the tiny preset's vocabulary
        "--max-new-tokens", type=int, default=100, help="tokens per reply at most (default: %(default)s)"
    )
    parser.add_argument("--batch-size", type=int, default=200, help="replies generated together (default: %(default)s)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if not args.data.is_file():
        parser.error(f"{args.data} not found; write it with `python examples/chat_data.py --out DIR`")
    examples = read_heldout(args.data)[: args.limit]
    torch.manual_seed(0)
    results = []
    for spec in args.checkpoints:
        name, _, path = spec.rpartition("=")
        model, tokenizer = load_model_and_tokenizer(path, device="cpu", quantization="none")  # the model as trained
        print(f"{name or path}: {len(examples)} greedy replies...", file=sys.stderr)
        result = evaluate(model, tokenizer, examples, args.max_new_tokens, args.batch_size)
        results.append({"name": name or Path(path).name, "checkpoint": path, **result})
    print(markdown_table(results))
    for r in results:
        print(f"\n{r['name']}'s replies:")
        for task, text in r["samples"].items():
            print(f"  {task:8s} {text!r}")
    if args.json is not None:
        with atomic_output(args.json) as tmp:
            tmp.write_text(
                json.dumps({"data": str(args.data), "examples": len(examples), "results": results}, indent=2)
            )


if __name__ == "__main__":
    main()
