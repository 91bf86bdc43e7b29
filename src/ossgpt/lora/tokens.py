"""Training chosen tokens' embedding rows beside the frozen base: what LoRA cannot reach on its own.

LoRA keeps the embedding table W [V, H] frozen. A token the base never saw in pretraining (Harmony's <|start|>,
<|channel|>, ... for a model pretrained on plain text) keeps its random initial row there; the low-rank updates of
the projections can only work around it. Here n chosen tokens' rows train too:

    row(id_j) = W[id_j] + delta_j          delta [n, H], zeros at the start: the adapted model is the base exactly

Shapes: V vocabulary, H hidden, n chosen token ids (sorted, unique), N tokens.

    TokenRows        the ids [n] and delta [n, H]
    TokenEmbedding   the input lookup, ids [...] -> [..., H]: W[id], plus delta_j where id = id_j
    TokenHead        the LM head, x [..., H] -> logits [..., V]: x W^T, plus x delta^T at the columns ids. The
                     chunked loss (ossgpt.kernels.loss) gets (ids, delta) from `head.rows` and does the same, a
                     chunk of rows at a time (GPTOSS._loss passes them on)

W + delta, a [V, H] table (1.2 GB in bfloat16 for gpt-oss-20b), is never formed: the extra work per step is a
lookup of [N, H] and products of [N, n], and delta's gradient is [n, H] (not W's [V, H]).

Which rows of the LM head train with them:
  * tied (one table for the lookup and the LM head, as the `tiny` and `mini` presets have): the embedding and the
    head share one TokenRows, as they share W, so a delta row moves the token's input and its logit alike, as
    training that row of W would.
  * untied (gpt-oss): the same ids' rows of the LM head train too, a second TokenRows. The input row lets the
    model read a token, the head's row is what lets it produce one: a chat model must write <|channel|>, <|end|>
    and <|return|> itself. (PEFT's trainable_token_indices trains the input rows only unless the head is named
    as well; here one setting covers both, for 2 n H parameters: 40k for Harmony's 7 tokens in gpt-oss-20b.)

`merged()` gives the plain modules back with delta folded into W's rows in place, W[ids] += delta (in W's dtype:
a bfloat16 table rounds the folded rows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TokenRows(nn.Module):
    """Rows trained beside a frozen table: the token ids [n] (sorted) and their delta [n, H], zeros at first."""

    def __init__(self, ids: tuple[int, ...], hidden: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.token_ids = tuple(ids)  # (also as a tuple: what the config records, readable on the meta device)
        self.register_buffer("ids", torch.tensor(ids, dtype=torch.long, device=device), persistent=False)
        self.delta = nn.Parameter(torch.zeros(len(ids), hidden, dtype=dtype, device=device))

    def lookup(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [...] -> [..., H]: delta_j where input_ids is id_j, zeros elsewhere."""
        slot = torch.searchsorted(self.ids, input_ids.contiguous()).clamp(max=len(self.token_ids) - 1)  # id's place
        chosen = self.ids[slot] == input_ids
        return torch.where(chosen[..., None], self.delta[slot], 0.0)

    @torch.no_grad()
    def fold_into(self, weight: torch.Tensor) -> None:
        """weight[ids] += delta, in place."""
        weight.index_add_(0, self.ids, self.delta.to(weight.dtype))

    def extra_repr(self) -> str:
        return f"{len(self.token_ids)} rows of {self.delta.shape[1]}"


class TokenEmbedding(nn.Module):
    """An embedding (nn.Embedding, or quant.int8's StoredEmbedding, which widens each row from its stored dtype)
    with `rows` trained beside it: ids [...] -> [..., H]."""

    def __init__(self, base: nn.Module, rows: TokenRows):
        super().__init__()
        self.weight = base.weight  # [V, H], frozen: the base's own tensor under its own name
        self.dtype = getattr(base, "dtype", None)  # StoredEmbedding's: what each looked-up row is widened to
        self.tokens = rows
        # The base module, outside the module tree (its weight is registered above): what merging gives back.
        self.__dict__["base"] = base

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = F.embedding(input_ids, self.weight)
        x = x.to(self.dtype) if self.dtype is not None else x
        return x + self.tokens.lookup(input_ids).to(x.dtype)

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """The base embedding module computing the same lookup: delta folded into the table's rows (in place)."""
        self.tokens.fold_into(self.weight)
        self.base.weight = self.weight  # the same tensor (loading with assign=True may have replaced it)
        return self.base

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, {self.weight.shape[1]}"


class TokenHead(nn.Module):
    """The LM head (an nn.Linear without bias, or quant.int8's StoredLinear, whose weight is widened for each
    product) with `rows` trained beside it: x [..., H] -> logits [..., V].

    tied: the head's weight is the embedding's table, and `rows` the embedding's too (folded once, by it)."""

    def __init__(self, base: nn.Linear, rows: TokenRows, tied: bool):
        super().__init__()
        if base.bias is not None:
            raise ValueError("trained token rows need an LM head without bias")
        self.weight = base.weight  # [V, H], frozen
        self.dtype = getattr(base, "dtype", None)  # quant.int8's StoredLinear's: what its weight is widened to
        self.tokens, self.tied = rows, tied
        self.__dict__["base"] = base  # as TokenEmbedding's

    @property
    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [n], delta [n, H]): what the chunked loss adds to the frozen weight (see the module doc)."""
        return self.tokens.ids, self.tokens.delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x, self.weight.to(self.dtype) if self.dtype is not None else self.weight)
        # In place: the product's backward needs its inputs, not its output.
        return logits.index_add_(-1, self.tokens.ids, F.linear(x, self.tokens.delta.to(x.dtype)).to(logits.dtype))

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base nn.Linear computing the same logits: its own delta folded into its rows in place (a tied head's
        rows are the embedding's, folded there)."""
        if not self.tied:
            self.tokens.fold_into(self.weight)
        self.base.weight = self.weight
        return self.base

    def extra_repr(self) -> str:
        return f"in={self.weight.shape[1]}, out={self.weight.shape[0]}, tied={self.tied}"


def add_token_rows(model: nn.Module, ids: tuple[int, ...], dtype: torch.dtype | None = None) -> None:
    """Give `model` (a GPTOSS, frozen) trainable rows for the tokens `ids` in its embedding and LM head, in place.

    dtype: delta's (default: the embedding's output dtype, the head's product dtype: StoredEmbedding's and
    StoredLinear's `dtype`, else their weight's)."""
    embedding, head = model.embed_tokens, model.lm_head
    tied = head.weight is embedding.weight
    table = embedding.weight
    rows = TokenRows(ids, table.shape[1], dtype or getattr(embedding, "dtype", None) or table.dtype, table.device)
    head_dtype = dtype or getattr(head, "dtype", None) or head.weight.dtype
    head_rows = rows if tied else TokenRows(ids, head.weight.shape[1], head_dtype, head.weight.device)
    model.embed_tokens = TokenEmbedding(embedding, rows)
    model.lm_head = TokenHead(head, head_rows, tied)


def merge_token_rows(model: nn.Module) -> None:
    """Fold trained rows into the embedding and LM head of `model` and remove them (in place)."""
    if isinstance(model.embed_tokens, TokenEmbedding):
        model.embed_tokens = model.embed_tokens.merged()
    if isinstance(model.lm_head, TokenHead):
        model.lm_head = model.lm_head.merged()


def token_ids(model: nn.Module) -> tuple[int, ...]:
    """The ids whose rows `model` trains (empty if none)."""
    embedding = model.embed_tokens
    return embedding.tokens.token_ids if isinstance(embedding, TokenEmbedding) else ()
