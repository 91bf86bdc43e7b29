"""Supervised fine-tuning data: JSONL conversations -> Harmony tokens with a loss mask -> packed training windows.

    examples = read_examples("chats.jsonl", harmony)     # one Example per line: tokens [n], labels [n]
    train, held_out = split_examples(examples, val_fraction=0.05)
    kept, notes = fit_examples(train, seq_len, "training")  # drops (and counts) what cannot be trained on
    batches = SFTBatches(kept, batch_size, seq_len, seed, pad_id, grad_accum_steps, rank, world_size)
    input_ids, labels, weight = batches.batch(step, micro_step)  # [b, seq_len] int64 each, and a float
    val, windows = sft_validation_batches(held_out, batch_size, seq_len, num_batches, pad_id, rank, world_size)

Each line of the file is one conversation in the OpenAI chat format (ossgpt.chat.conversation reads it); it is
rendered in Harmony with a loss mask: True on the tokens the model must write in assistant turns. The labels are
the tokens where the mask is True and -100 (IGNORE_INDEX: no loss) elsewhere, so the loss is the next-token loss
on assistant tokens only. A conversation's first token is never a target: nothing of the conversation precedes it.

Packing. A training window holds whole conversations, back to back, never a part of one: in each epoch the
conversations are shuffled (a function of (seed, epoch)) and laid into windows in that order, each into the current
window if it fits, else into a new one; what a window has left is padding, label -100. A conversation longer than
seq_len cannot be trained on whole: it is skipped and counted (`fit_examples`), and the log says so, as it does
for conversations with nothing to learn (no assistant turn). Conversations packed into one window share it as in
common packing practice: positions run on across the window and a conversation's tokens may attend to the
conversations before it in the window (the model's mask is causal over positions; separating documents would need
a block-diagonal mask it does not take). The loss never crosses them: the first token of every conversation is
context, and its targets are its own assistant tokens.

Loss weights. The model's loss is the mean over a micro-batch's targets, and windows hold very different numbers
of assistant tokens. `weight` rescales each micro-batch's mean so that an optimizer step's loss is the mean over
all the step's targets (every micro-step, every process), as one big batch would give: weight = targets in this
process's micro-batch * grad_accum_steps * world_size / targets in the step.

Like training.data's windows, a batch depends only on (seed, step, micro_step): resuming needs no loader state.
Validation: the held-out conversations packed in file order, the same windows at every evaluation, each batch
weighted so that the evaluation's loss is the mean over all held-out assistant tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ossgpt.chat.conversation import ConversationError, conversation_from_json, harmony_messages, render_training
from ossgpt.chat.harmony import Harmony
from ossgpt.errors import UserError
from ossgpt.kernels.loss import IGNORE_INDEX


class Example(NamedTuple):
    """One conversation, rendered: tokens [n] and labels [n] (int64; IGNORE_INDEX where not supervised)."""

    line: int  # its line in the file (1-based)
    tokens: np.ndarray
    labels: np.ndarray

    @property
    def targets(self) -> int:
        """How many tokens the loss is taken on."""
        return int((self.labels != IGNORE_INDEX).sum())


# ----------------------------------------------------------------------------------------------- reading and rendering
def read_examples(path: str | Path, harmony: Harmony) -> list[Example]:
    """Every conversation of a JSONL file, rendered. UserError naming the file and line of the first bad one."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; pass a JSONL file of conversations, one per line") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a folder; pass a JSONL file of conversations, one per line") from None
    examples = []
    for number, raw in enumerate(text.splitlines(), start=1):
        where = f"{path}, line {number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise UserError(f"{where}: not UTF-8 text (byte {err.start + 1}); save the file as UTF-8") from None
        if not line.strip():  # blank lines (a trailing newline, a separator) hold no conversation
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{where}: not valid JSON ({err.msg}, column {err.colno})") from None
        try:
            messages, tools, effort = conversation_from_json(record)
            effort = {"reasoning_effort": effort} if effort is not None else {}  # else harmony_messages' default
            tokens, mask = render_training(harmony, harmony_messages(messages, tools, **effort))
        except ConversationError as err:
            raise UserError(f"{where}: {err}") from None
        tokens = np.asarray(tokens, dtype=np.int64)
        labels = np.where(np.asarray(mask, dtype=bool), tokens, IGNORE_INDEX)
        labels[:1] = IGNORE_INDEX  # nothing of the conversation precedes its first token
        examples.append(Example(number, tokens, labels))
    if not examples:
        raise UserError(f"{path} holds no conversations; write one JSON object per line")
    return examples


def split_examples(examples: list[Example], val_fraction: float) -> tuple[list[Example], list[Example]]:
    """(training, held-out): round(val_fraction * N) conversations (at least one) spread evenly over the file, so
    that the held-out set samples all of it and does not depend on the seed. UserError if none would be left."""
    held = np.unique(np.linspace(0, len(examples) - 1, max(1, round(val_fraction * len(examples)))).round())
    if len(held) >= len(examples):
        raise UserError(
            f"{len(examples)} conversation(s) cannot be split into training and held-out ones (--val-fraction "
            f"{val_fraction}): add conversations, or pass the held-out ones in their own file with --val-data"
        )
    held_set = set(held.astype(int).tolist())
    return (
        [e for i, e in enumerate(examples) if i not in held_set],
        [e for i, e in enumerate(examples) if i in held_set],
    )


def fit_examples(examples: list[Example], seq_len: int, what: str) -> tuple[list[Example], list[str]]:
    """(the examples a window of seq_len tokens can train on, log lines about the others). `what` names the set
    in messages ("training", "held-out"); UserError if none is left."""
    too_long = [e for e in examples if len(e.tokens) > seq_len]
    nothing = [e for e in examples if len(e.tokens) <= seq_len and e.targets == 0]
    kept = [e for e in examples if len(e.tokens) <= seq_len and e.targets > 0]
    notes = []
    if too_long:
        longest = max(too_long, key=lambda e: len(e.tokens))
        notes.append(
            f"skipped {len(too_long)} of {len(examples)} {what} conversations longer than --seq-len {seq_len} "
            f"tokens (the longest: {len(longest.tokens)} tokens, line {longest.line}); raise --seq-len to train on "
            "them"
        )
    if nothing:
        notes.append(
            f"skipped {len(nothing)} {what} conversation(s) without an assistant message to learn (first: line "
            f"{nothing[0].line})"
        )
    if not kept:
        raise UserError(f"no {what} conversation is left to train on: {'; '.join(notes)}")
    return kept, notes


# ------------------------------------------------------------------------------------------------------------ packing
def pack(lengths: np.ndarray, order: np.ndarray, seq_len: int) -> list[list[int]]:
    """Example indices per window: the examples in `order`, each added to the current window if it still fits
    (lengths[i] <= seq_len for every i), else starting a new one."""
    windows, current, used = [], [], 0
    for i in order.tolist():
        if used + lengths[i] > seq_len:
            windows.append(current)
            current, used = [], 0
        current.append(i)
        used += int(lengths[i])
    windows.append(current)
    return windows


def assemble(examples: list[Example], windows: list[list[int]], seq_len: int, pad_id: int) -> tuple:
    """(input_ids, labels) [len(windows), seq_len] int64: each window's examples back to back, then padding."""
    input_ids = torch.full((len(windows), seq_len), pad_id, dtype=torch.int64)
    labels = torch.full((len(windows), seq_len), IGNORE_INDEX, dtype=torch.int64)
    for row, window in enumerate(windows):
        if window:
            n = sum(len(examples[i].tokens) for i in window)
            input_ids[row, :n] = torch.from_numpy(np.concatenate([examples[i].tokens for i in window]))
            labels[row, :n] = torch.from_numpy(np.concatenate([examples[i].labels for i in window]))
    return input_ids, labels


class SFTBatches:
    """Packed training windows in shuffled epochs, a pure function of (seed, step, micro_step); this process's rows.

    Every process packs every epoch the same way and takes rows rank, rank + world_size, ... of each global batch
    of batch_size windows, as training.data.TrainBatches does.
    """

    def __init__(
        self,
        examples: list[Example],
        batch_size: int,
        seq_len: int,
        seed: int,
        pad_id: int,
        grad_accum_steps: int = 1,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size % world_size:
            raise UserError(f"--batch-size {batch_size} must be divisible by the number of processes ({world_size})")
        self.examples, self.batch_size, self.seq_len, self.seed, self.pad_id = (
            examples, batch_size, seq_len, seed, pad_id,
        )  # fmt: skip
        self.grad_accum_steps, self.rank, self.world_size = grad_accum_steps, rank, world_size
        self.lengths = np.array([len(e.tokens) for e in examples])
        self.targets = np.array([e.targets for e in examples])
        self.epoch_ends = []  # epoch_ends[e]: windows in epochs 0..e together
        self._packed: dict[int, list[list[int]]] = {}  # the latest epochs' windows

    def epoch_windows(self, epoch: int) -> list[list[int]]:
        """The windows of `epoch` (example indices each), in the order the epoch visits them."""
        if epoch not in self._packed:
            if len(self._packed) > 1:  # a batch spans at most two epochs: keep the latest ones only
                del self._packed[min(self._packed)]
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
            self._packed[epoch] = pack(self.lengths, order, self.seq_len)
        return self._packed[epoch]

    def windows(self, first: int, count: int) -> list[list[int]]:
        """Windows first..first+count-1 of the stream that the epochs form, one after the other."""
        found = []
        for index in range(first, first + count):
            while not self.epoch_ends or self.epoch_ends[-1] <= index:
                self.epoch_ends.append(
                    (self.epoch_ends[-1] if self.epoch_ends else 0) + len(self.epoch_windows(len(self.epoch_ends)))
                )
            epoch = int(np.searchsorted(self.epoch_ends, index, side="right"))
            start = self.epoch_ends[epoch - 1] if epoch else 0
            found.append(self.epoch_windows(epoch)[index - start])
        return found

    def batch(self, step: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(input_ids, labels) [batch_size / world_size, seq_len] int64, rows rank::world_size of the global batch,
        and the weight of their mean loss (see the module doc)."""
        accum, size = self.grad_accum_steps, self.batch_size
        step_windows = self.windows(step * accum * size, accum * size)
        mine = step_windows[micro_step * size : (micro_step + 1) * size][self.rank :: self.world_size]
        step_targets = sum(int(self.targets[w].sum()) for w in step_windows)
        weight = sum(int(self.targets[w].sum()) for w in mine) * accum * self.world_size / step_targets
        return *assemble(self.examples, mine, self.seq_len, self.pad_id), weight


def sft_validation_batches(
    examples: list[Example],
    batch_size: int,
    seq_len: int,
    num_batches: int,
    pad_id: int,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[list[tuple[torch.Tensor, torch.Tensor, float]], int]:
    """(batches, windows held out) of the held-out examples packed in file order: at most num_batches batches
    (input_ids, labels, weight) of this process's rows; a last batch short of windows is filled with empty ones
    (weight 0 where a process's rows are all empty), so every process runs as many forward passes."""
    windows = pack(np.array([len(e.tokens) for e in examples]), np.arange(len(examples)), seq_len)
    used = windows[: num_batches * batch_size]
    used += [[]] * (-len(used) % batch_size)
    targets = np.array([e.targets for e in examples])
    total = sum(int(targets[w].sum()) for w in used)
    count = len(used) // batch_size
    batches = []
    for b in range(count):
        mine = used[b * batch_size : (b + 1) * batch_size][rank::world_size]
        weight = sum(int(targets[w].sum()) for w in mine) * count * world_size / total
        batches.append((*assemble(examples, mine, seq_len, pad_id), weight))
    return batches, len(windows)
