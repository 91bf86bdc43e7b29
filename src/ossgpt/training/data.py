"""Training and validation batches from a prepared data folder (see ossgpt.data.prepare).

    meta = read_meta(data_dir)                            # ossgpt.data.prepare
    train = TrainBatches(open_split(data_dir, "train", seq_len), batch_size, seq_len, seed, grad_accum_steps,
                         rank, world_size)
    input_ids = train.batch(step, micro_step)             # [batch_size / world_size, seq_len] int64
    val = validation_batches(open_split(data_dir, "val", seq_len), batch_size, seq_len, num_batches, rank, world_size)

Training batches are windows of seq_len tokens; the labels are the inputs themselves (the model shifts them).
The windows are drawn in epochs, without replacement: each epoch cuts the split into back-to-back windows from
a random offset (so that window boundaries move from one epoch to the next) and visits them in a random order;
epoch after epoch forms one stream of windows, and each batch takes the next batch_size of them. Drawing every
window at a random offset instead (with replacement) would leave e^-1.7 = 18% of the text unseen after 1.7 epochs'
worth of windows, the tiny preset's 8-minute run, while showing other parts three times or more.
A batch's windows depend only on (seed, step, micro_step), so a run's position in the data is its step counter:
resuming needs no loader state and sees the very batches an uninterrupted run would. Every process computes the
windows of the whole global batch and reads rows rank, rank + world_size, ... of it, so N processes with
batch_size / N rows each see exactly the batch of one process with batch_size rows.

Validation is a fixed set of windows spread evenly over the split: the same at every evaluation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ossgpt.data.tokens import read_tokens
from ossgpt.errors import UserError


def open_split(data_dir: str | Path, split: str, seq_len: int) -> np.ndarray:
    """The tokens of `split` ("train" or "val") [N], memory-mapped; UserError if fewer than seq_len + 1."""
    path = Path(data_dir) / f"{split}.bin"
    tokens = read_tokens(path)
    if len(tokens) < seq_len + 1:
        hint = " (val.bin holds the last --val-fraction of each document)" if split == "val" else ""
        raise UserError(
            f"{path} holds {len(tokens)} tokens, fewer than --seq-len + 1 = {seq_len + 1}: lower --seq-len "
            f"or add text{hint}"
        )
    return tokens


def windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> torch.Tensor:
    """tokens [N], starts [B] -> int64 [B, seq_len], row i = tokens[starts[i] : starts[i] + seq_len]."""
    rows = np.stack([tokens[s : s + seq_len] for s in starts.tolist()])
    return torch.from_numpy(rows.astype(np.int64))


class TrainBatches:
    """Training windows drawn in shuffled epochs, a pure function of (seed, step, micro_step); this process's rows.

    An epoch holds windows_per_epoch back-to-back windows starting at a random offset in [0, max_offset]: as many
    as fit for any offset below seq_len, so that every epoch's boundaries can move by up to a whole window.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        seq_len: int,
        seed: int,
        grad_accum_steps: int = 1,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size % world_size:
            raise UserError(f"--batch-size {batch_size} must be divisible by the number of processes ({world_size})")
        self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed
        self.grad_accum_steps, self.rank, self.world_size = grad_accum_steps, rank, world_size
        self.windows_per_epoch = max(1, (len(tokens) - seq_len + 1) // seq_len)
        self.max_offset = len(tokens) - self.windows_per_epoch * seq_len
        self._epoch, self._epoch_starts = None, None  # the latest epoch's order: one permutation per epoch

    def epoch_starts(self, epoch: int) -> np.ndarray:
        """[windows_per_epoch] start of each window of `epoch`, in the order the epoch visits them."""
        if epoch != self._epoch:  # a large split has millions of windows: shuffle them once, not every batch
            rng = np.random.default_rng([self.seed, epoch])
            offset = rng.integers(0, self.max_offset + 1)
            self._epoch, self._epoch_starts = epoch, offset + rng.permutation(self.windows_per_epoch) * self.seq_len
        return self._epoch_starts

    def batch(self, step: int, micro_step: int) -> torch.Tensor:
        """[batch_size / world_size, seq_len] int64: rows rank::world_size of the global batch."""
        first = (step * self.grad_accum_steps + micro_step) * self.batch_size  # place of the batch in the stream
        epoch, index = np.divmod(first + np.arange(self.batch_size), self.windows_per_epoch)
        starts = {e: self.epoch_starts(e) for e in np.unique(epoch).tolist()}
        batch_starts = np.array([starts[e][i] for e, i in zip(epoch.tolist(), index.tolist())])
        return windows(self.tokens, batch_starts[self.rank :: self.world_size], self.seq_len)


def validation_batches(
    tokens: np.ndarray, batch_size: int, seq_len: int, num_batches: int, rank: int = 0, world_size: int = 1
) -> list[torch.Tensor]:
    """num_batches batches [batch_size / world_size, seq_len] of windows spread evenly over `tokens` (they overlap
    when the split is short); this process's rows of each."""
    starts = np.linspace(0, len(tokens) - seq_len, batch_size * num_batches).round().astype(np.int64)
    return [windows(tokens, batch[rank::world_size], seq_len) for batch in starts.reshape(num_batches, batch_size)]
