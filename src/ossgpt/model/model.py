"""The GPT-OSS causal language model: embeddings, N blocks, final norm, LM head.

    input_ids [B, T]
      -> embed_tokens                       [B, T, hidden]
      -> N x Block(attention, MoE)          [B, T, hidden]   (sliding/full attention per config.layer_types)
      -> norm -> lm_head                    [B, T, vocab]

Parameter names match Hugging Face's GptOssForCausalLM without its `model.` prefix, so HF checkpoints map
onto this module one to one (see ossgpt.checkpoint).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ossgpt.config import SEED_ALIASES, GPTOSSConfig, round_up
from ossgpt.model.block import Block
from ossgpt.model.cache import KVCache
from ossgpt.model.loss import linear_cross_entropy
from ossgpt.model.moe import Experts, RouterStats
from ossgpt.model.norms import RMSNorm
from ossgpt.model.rope import RotaryEmbedding


@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None  # [B, T, vocab]
    loss: torch.Tensor | None = None  # lm_loss + aux_loss, when labels are given
    lm_loss: torch.Tensor | None = None  # next-token cross-entropy (nats per token)
    aux_loss: torch.Tensor | None = None  # weighted router losses, averaged over layers (None: no labels, no grad)
    router_stats: list[RouterStats] | None = None  # per layer


class GPTOSSForCausalLM(nn.Module):
    def __init__(self, config: GPTOSSConfig | None = None, **seed_kwargs):
        """`GPTOSSForCausalLM(config)`, or the seed's keywords (`num_layers=`, `num_experts=`, ...) over `mini`."""
        super().__init__()
        if config is None:
            config = _config_from_seed_kwargs(seed_kwargs)
        elif seed_kwargs:
            raise TypeError("pass either a config or keyword arguments, not both")
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.gradient_checkpointing = config.gradient_checkpointing
        self.loss_workspace: dict = {}  # the chunked loss's logits buffer, reused across steps
        self.reset_parameters()

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

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each block's activations in the backward pass instead of storing them."""
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (a tied LM head counts once)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed_tokens.weight.numel() if exclude_embeddings else n

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

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

        labels [B, T]: targets aligned with input_ids (HF convention: shifted inside, -100 ignored).
        attention_mask [B, T]: 1 for real tokens, 0 for (left) padding; padding gets position -1 and is
            never attended to.
        positions [B, T]: explicit absolute positions (decoding with padded rows); default: 0.. (after the
            tokens already in `cache`).
        cache: a KVCache; this call's tokens are appended to it.
        logits_to_keep: if > 0, only compute logits for the last that many positions (decoding).
        return_logits: with labels, False skips the [B, T, vocab] logits (`.logits` is None) and computes the
            loss chunk by chunk (config.loss_chunk_size rows at a time, see ossgpt.model.loss): what training
            wants. True (default) returns the logits and takes the loss from them, as HF does.
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
            if self.gradient_checkpointing and self.training:
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
        if labels is not None and not return_logits and self.config.loss_chunk_size:
            # Position t predicts labels[t + 1] (HF's shift); -100 targets are ignored.
            hidden = x[:, :-1].reshape(-1, x.shape[-1])
            targets = labels[:, 1:].reshape(-1)
            chunk = self.config.loss_chunk_size
            out.lm_loss = linear_cross_entropy(
                hidden, self.lm_head.weight, targets, chunk, workspace=self.loss_workspace
            )
        else:
            if logits_to_keep:
                x = x[:, -logits_to_keep:]
            logits = self.lm_head(x)
            if labels is not None:
                out.lm_loss = F.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
                )
            out.logits = logits if return_logits or labels is None else None
        if labels is not None:
            out.loss = out.lm_loss + out.aux_loss
        return out

    def aux_loss(self, stats: list[RouterStats]) -> torch.Tensor:
        """Config-weighted load-balancing + z-loss, averaged over layers (so coefficients do not scale with depth)."""
        c = self.config
        per_layer = [c.router_aux_loss_coef * s.load_balancing_loss + c.router_z_loss_coef * s.z_loss for s in stats]
        return torch.stack(per_layer).mean()

    # ------------------------------------------------------------------------------------------------------
    def generate(self, input_ids, **kwargs) -> torch.Tensor:
        """Autoregressive generation with a KV cache; see ossgpt.inference.generate.generate."""
        from ossgpt.inference.generate import generate

        return generate(self, input_ids, **kwargs)

    def stream(self, input_ids, **kwargs):
        """An iterator over the new tokens, one [B] tensor per step; see ossgpt.inference.generate.stream."""
        from ossgpt.inference.generate import stream

        return stream(self, input_ids, **kwargs)

    def save_pretrained(self, directory, **kwargs) -> None:
        """Write `model.safetensors` + `config.json`; see ossgpt.checkpoint.save_pretrained."""
        from ossgpt.checkpoint import save_pretrained

        save_pretrained(self, directory, **kwargs)

    @classmethod
    def from_pretrained(cls, directory, **kwargs) -> GPTOSSForCausalLM:
        """Load an ossgpt or Hugging Face gpt-oss directory; see ossgpt.checkpoint.from_pretrained."""
        from ossgpt.checkpoint import from_pretrained

        return from_pretrained(directory, **kwargs)


def _config_from_seed_kwargs(kwargs: dict) -> GPTOSSConfig:
    """The seed's keyword constructor: its names (num_layers, num_experts, ...) over the mini preset."""
    values = {SEED_ALIASES.get(k, k): v for k, v in kwargs.items()}
    config = GPTOSSConfig.from_preset("mini")
    # The seed passed vocab_size=100256 (cl100k's BPE ranks only); <|endoftext|> (100257) must still be an id.
    if "vocab_size" in values and values["vocab_size"] <= config.eos_token_id and "eos_token_id" not in values:
        values["vocab_size"] = round_up(config.eos_token_id + 1, 128)
    return config.replace(**values)
