"""Loss, perplexity and bits per byte of a model on a text; loss by position in the window; expert load.

    loss            mean nats per scored token (summed in float64)
    perplexity      exp(loss)
    bits_per_byte   total nats / ln 2 / UTF-8 bytes of the text: unlike loss, comparable across tokenizers and
                    with compressors (see ossgpt.eval.baselines)

What is scored. Each document is preceded by <|endoftext|> acting as a beginning-of-sequence token, as in
training, where every document follows the previous one's <|endoftext|>. So the text's first token is predicted
too (from "a document starts here") and every token of the text is scored exactly once. Several documents become

    eot doc1 eot doc2 ...

and the eot separators are context only: they are not part of the text, so they are neither scored nor counted.

Windows. The token stream is cut into windows of seq_len input tokens, each predicting the next seq_len tokens
(as in training): window w reads tokens [wL, (w+1)L) and is scored on [wL + 1, (w+1)L + 1). The windows' targets
do not overlap, so a window's first token is context only (it was the previous window's last target). Every
window starts from an empty context, so position p of a window predicts with p + 1 tokens of context:
`loss_by_position` shows what the model gains from a longer context.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ossgpt.errors import UserError

DEFAULT_MAX_SEQ_LEN = 1024  # the default window is the model's context, capped: attention time grows as its square


@dataclass
class TokenizedText:
    """Documents ready for scoring."""

    tokens: np.ndarray  # [N] int64: eot doc1 eot doc2 ...
    scored: np.ndarray  # [N] bool: True for the documents' tokens, False for the eot before each document
    n_bytes: int  # UTF-8 bytes of the documents

    @property
    def text_tokens(self) -> np.ndarray:
        """[n] the scored tokens, in order."""
        return self.tokens[self.scored]


@dataclass
class ExpertLoad:
    """How one MoE layer spread its token-to-expert assignments (k per token) over its E experts."""

    counts: list[int]  # [E] assignments per expert

    @property
    def fractions(self) -> list[float]:
        """[E] share of the assignments each expert received; sums to 1, uniform routing gives 1/E each."""
        total = sum(self.counts)
        return [c / total for c in self.counts]

    @property
    def cv(self) -> float:
        """Coefficient of variation of the counts, std / mean (population std): 0 when perfectly balanced."""
        counts = np.asarray(self.counts, dtype=np.float64)
        return float(counts.std() / counts.mean())


@dataclass
class EvalResult:
    total_nats: float  # summed over the scored tokens
    n_tokens: int  # scored tokens
    n_bytes: int  # UTF-8 bytes of the text
    seq_len: int  # window length
    position_nats: list[float]  # [seq_len] nats summed at each window position
    position_counts: list[int]  # [seq_len] scored tokens at each window position
    expert_load: list[ExpertLoad]  # per layer

    @property
    def loss(self) -> float:
        return self.total_nats / self.n_tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf  # exp overflows a float beyond ~709

    @property
    def bits_per_byte(self) -> float:
        return self.total_nats / math.log(2) / self.n_bytes

    @property
    def loss_by_position(self) -> list[float]:
        """[seq_len] mean nats at each window position (position p has p + 1 tokens of context); NaN if unscored."""
        return [n / c if c else math.nan for n, c in zip(self.position_nats, self.position_counts)]

    def to_dict(self) -> dict:
        """The result as JSON-ready values (NaN as None)."""
        return {
            "loss": self.loss,
            "perplexity": self.perplexity,
            "bits_per_byte": self.bits_per_byte,
            "tokens": self.n_tokens,
            "bytes": self.n_bytes,
            "seq_len": self.seq_len,
            "loss_by_position": [None if math.isnan(x) else x for x in self.loss_by_position],
            "expert_load": [
                {
                    "layer": i,
                    "counts": e.counts,
                    "fractions": e.fractions,
                    "cv": e.cv,
                }
                for i, e in enumerate(self.expert_load)
            ],
        }


def tokenize_documents(tokenizer, documents: str | Sequence[str]) -> TokenizedText:
    """Tokenize one text or several documents as `eot doc1 eot doc2 ...` (see the module docstring).

    Special-token text inside a document is encoded as ordinary text. UserError if the documents hold fewer
    than 2 tokens in all.
    """
    if isinstance(documents, str):
        documents = [documents]
    tokens, scored = [], []
    for doc in documents:
        ids = tokenizer.encode(doc)
        tokens += [tokenizer.eot_token_id, *ids]
        scored += [False] + [True] * len(ids)
    n_scored = sum(scored)
    if n_scored < 2:
        raise UserError(f"the text is only {n_scored} token(s) long; evaluation needs at least 2 tokens")
    n_bytes = sum(len(doc.encode("utf-8")) for doc in documents)
    return TokenizedText(np.asarray(tokens, dtype=np.int64), np.asarray(scored, dtype=bool), n_bytes)


def window_batches(n_tokens: int, seq_len: int, batch_size: int) -> Iterator[tuple[int, int, int]]:
    """(first token, windows, window length) of each batch over a stream of n_tokens tokens.

    Full windows go batch_size at a time; a shorter last window goes alone, since padding it to full length
    would route padding tokens through the experts and distort the expert counts.
    """
    n_targets = n_tokens - 1
    n_full = n_targets // seq_len
    for first in range(0, n_full, batch_size):
        yield first * seq_len, min(batch_size, n_full - first), seq_len
    if n_targets % seq_len:
        yield n_full * seq_len, 1, n_targets % seq_len


@torch.inference_mode()
def evaluate_tokens(
    model, text: TokenizedText, seq_len: int | None = None, batch_size: int = 8, progress: bool = False
) -> EvalResult:
    """Score `text` with `model` in windows of seq_len tokens (default: its context, at most 1024).

    progress: show a progress bar (on stderr).
    """
    context = model.config.max_position_embeddings
    seq_len = min(context, DEFAULT_MAX_SEQ_LEN) if seq_len is None else seq_len
    if not 1 <= seq_len <= context:
        raise UserError(f"seq len must be between 1 and the model's context of {context} tokens, got {seq_len}")
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    tokens, scored = torch.from_numpy(text.tokens), torch.from_numpy(text.scored)
    position_nats = torch.zeros(seq_len, dtype=torch.float64)
    position_counts = torch.zeros(seq_len, dtype=torch.int64)
    expert_counts = torch.zeros(model.config.num_hidden_layers, model.config.num_local_experts, dtype=torch.int64)

    batches = list(window_batches(len(tokens), seq_len, batch_size))
    was_training = model.training
    model.eval()  # no router jitter, no dropout of any kind
    try:
        for start, rows, length in tqdm(batches, desc="evaluating", unit="batch", disable=not progress):
            end = start + rows * length
            inputs = tokens[start:end].view(rows, length)
            targets = tokens[start + 1 : end + 1].view(rows, length)
            mask = scored[start + 1 : end + 1].view(rows, length)
            out = model(inputs.to(model.device))
            nats = F.cross_entropy(out.logits.float().transpose(1, 2), targets.to(model.device), reduction="none")
            nats = nats.double().cpu().masked_fill(~mask, 0.0)  # [rows, length]
            position_nats[:length] += nats.sum(dim=0)
            position_counts[:length] += mask.sum(dim=0)
            for layer, stats in enumerate(out.router_stats):
                expert_counts[layer] += stats.expert_counts.round().long().cpu()
    finally:
        model.train(was_training)

    return EvalResult(
        total_nats=float(position_nats.sum()),
        n_tokens=int(position_counts.sum()),
        n_bytes=text.n_bytes,
        seq_len=seq_len,
        position_nats=position_nats.tolist(),
        position_counts=position_counts.tolist(),
        expert_load=[ExpertLoad(counts) for counts in expert_counts.tolist()],
    )


def evaluate_text(
    model, tokenizer, text: str | Sequence[str], seq_len: int | None = None, batch_size: int = 8
) -> EvalResult:
    """Loss, perplexity and bits per byte of `model` on `text` (one string, or several documents)."""
    return evaluate_tokens(model, tokenize_documents(tokenizer, text), seq_len, batch_size)
