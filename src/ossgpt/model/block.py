"""One transformer block: pre-norm attention and pre-norm MoE, each added back to the residual stream."""

from torch import nn

from ossgpt.model.attention import Attention
from ossgpt.model.moe import MoE
from ossgpt.model.norms import RMSNorm


class Block(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config)

    def forward(self, x, cos, sin, positions, cache=None, cache_start=0):
        """x [B, T, hidden] -> (x [B, T, hidden], RouterStats)."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, cache, cache_start)
        moe_out, stats = self.mlp(self.post_attention_layernorm(x))
        return x + moe_out, stats
