"""The GPT-OSS causal language model: embeddings, N blocks, final norm, LM head.

    input_ids [B, T]
      -> embed_tokens                       [B, T, hidden]
      -> N x Block(attention, MoE)          [B, T, hidden]   (sliding/full attention per config.layer_types)
      -> norm -> lm_head                    [B, T, vocab]
      -> next-token cross-entropy against labels, plus the routers' auxiliary losses

Parameter names match Hugging Face's GptOssForCausalLM without its `model.` prefix, so HF checkpoints map onto
this module one to one. Loading and saving live in ossgpt.checkpoint, generation in ossgpt.inference; the public
`ossgpt.GPTOSSForCausalLM` (ossgpt.api) is this model with those as methods.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ossgpt.config import GPTOSSConfig
from ossgpt.kernels.loss import IGNORE_INDEX, linear_cross_entropy
from ossgpt.model.block import Block
from ossgpt.model.cache import KVCache
from ossgpt.model.moe import Experts, RouterStats
from ossgpt.model.norms import RMSNorm
from ossgpt.model.rope import RotaryEmbedding
from ossgpt.options import RuntimeOptions


@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None  # [B, T, vocab]
    loss: torch.Tensor | None = None  # lm_loss + aux_loss, when labels are given
    lm_loss: torch.Tensor | None = None  # next-token cross-entropy (nats per token)
    aux_loss: torch.Tensor | None = None  # weighted router losses, averaged over layers (None: no labels, no grad)
    router_stats: list[RouterStats] | None = None  # per layer


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits [B, T, vocab], labels [B, T] -> mean cross-entropy of position t predicting labels[t + 1] (HF's
    shift), in float32; targets equal to -100 are ignored."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)


class GPTOSS(nn.Module):
    def __init__(self, config: GPTOSSConfig, options: RuntimeOptions | None = None):
        """config: the architecture (saved with a checkpoint); options: how it runs (ossgpt.options)."""
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.options = options or RuntimeOptions()
        self.loss_workspace: dict = {}  # the chunked loss's logits buffer, reused across steps
        self.reset_parameters()

    @property
    def options(self) -> RuntimeOptions:
        return self._options

    @options.setter
    def options(self, options: RuntimeOptions) -> None:
        """Set how the model runs; each layer's attention and experts take their kernel from it."""
        self._options = options
        for layer in self.layers:
            layer.self_attn.kernel = options.attention
            layer.mlp.experts.kernel = options.experts

    # ------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, 0.02) weights, zero biases and sinks; the projections that write into the residual
        stream (attention output, expert down-projection) get std / sqrt(2 * layers), as in GPT-2, so the
        residual stream's variance does not grow with depth."""
        std = self.config.initializer_range
        residual_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=residual_std if name.endswith("o_proj") else std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, Experts):
                nn.init.normal_(module.gate_up_proj, std=std)
                nn.init.normal_(module.down_proj, std=residual_std)
                nn.init.zeros_(module.gate_up_proj_bias)
                nn.init.zeros_(module.down_proj_bias)
        for layer in self.layers:
            nn.init.normal_(layer.mlp.router.weight, std=std)
            nn.init.zeros_(layer.mlp.router.bias)
            nn.init.zeros_(layer.self_attn.sinks)
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
        self.norm.weight.fill_(1.0)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (a tied LM head counts once)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed_tokens.weight.numel() if exclude_embeddings else n

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype activations are computed in: the final norm's (a decoding copy may store its embedding table
        in fewer bits, ossgpt.quant.int8)."""
        return self.norm.weight.dtype

    # ------------------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        logits_to_keep: int = 0,
        return_logits: bool = True,
    ) -> CausalLMOutput:
        """input_ids [B, T] -> CausalLMOutput.

        labels [B, T]: targets aligned with input_ids (HF convention: shifted inside, -100 ignored); adds the
            loss to the output.
        attention_mask [B, T]: 1 for real tokens, 0 for (left) padding; padding gets position -1 and is
            never attended to.
        positions [B, T]: explicit absolute positions (decoding with padded rows); default: 0.. (after the
            tokens already in `cache`).
        cache: a KVCache; this call's tokens are appended to it, at column cache.seen of every row, or, when
            cache.seen is a [B] tensor, one token per row at that row's column (continuous batching: give the
            positions then).
        logits_to_keep: if > 0, only compute logits for the last that many positions (decoding).
        return_logits: False (with labels) returns the loss alone, `.logits` None: what training wants, since
            then the [B, T, vocab] logits need never exist (see `_loss`).
        """
        B, T = input_ids.shape
        start = cache.seen if cache is not None else 0
        if positions is None:
            if attention_mask is not None:
                positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, -1)
            else:
                positions = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(positions.clamp(min=0), x.dtype)

        all_stats = []
        for i, layer in enumerate(self.layers):
            layer_cache = cache[i] if cache is not None else None
            if self.options.gradient_checkpointing and self.training:
                x, stats = checkpoint(layer, x, cos, sin, positions, layer_cache, start, use_reentrant=False)
            else:
                x, stats = layer(x, cos, sin, positions, layer_cache, start)
            all_stats.append(stats)
        if cache is not None:
            cache.seen = start + T
        x = self.norm(x)

        out = CausalLMOutput(logits=None, router_stats=all_stats)
        if labels is not None or torch.is_grad_enabled():  # decoding (no grad, no labels) skips the router losses
            out.aux_loss = self.aux_loss(all_stats)
        if labels is not None and not return_logits:
            out.lm_loss = self._loss(x, labels)
        else:
            out.logits = self.lm_head(x[:, -logits_to_keep:] if logits_to_keep else x)
            if labels is not None:
                out.lm_loss = next_token_loss(out.logits, labels)
        if labels is not None:
            out.loss = out.lm_loss + out.aux_loss
        return out

    def _loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The next-token loss from the final hidden states x [B, T, hidden]: by the chunked kernel, which forms
        options.loss_chunk_size rows of logits at a time (ossgpt.kernels.loss), or, with 0, the plain way."""
        if not self.options.loss_chunk_size:
            return next_token_loss(self.lm_head(x), labels)
        hidden = x[:, :-1].reshape(-1, x.shape[-1])  # position t predicts labels[t + 1]
        # A head adapted from outside may train a few rows beside its frozen weight (ossgpt.lora.tokens): it gives
        # them as `rows`, (ids, delta), which the kernel adds; a plain nn.Linear has none.
        rows = getattr(self.lm_head, "rows", None)
        return linear_cross_entropy(hidden, self.lm_head.weight, labels[:, 1:].reshape(-1),
                                    self.options.loss_chunk_size, workspace=self.loss_workspace, rows=rows)  # fmt: skip

    def aux_loss(self, stats: list[RouterStats]) -> torch.Tensor:
        """Config-weighted load-balancing + z-loss, averaged over layers (so coefficients do not scale with depth)."""
        c = self.config
        per_layer = [c.router_aux_loss_coef * s.load_balancing_loss + c.router_z_loss_coef * s.z_loss for s in stats]
        return torch.stack(per_layer).mean()
