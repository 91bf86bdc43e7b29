"""What GPT-OSS computes, written once and plainly, one concept per module:

    norms.py      RMSNorm
    rope.py       rotary position embedding, YaRN
    attention.py  grouped-query attention with sinks and a sliding window
    moe.py        router, experts (clamped SwiGLU), load-balancing and z losses
    block.py      one transformer block
    cache.py      the KV cache for decoding
    model.py      the causal language model and its loss

The fast versions of attention, experts and loss live in ossgpt.kernels, chosen by RuntimeOptions (ossgpt.options).
"""

from ossgpt.model.model import GPTOSS, CausalLMOutput

__all__ = ["CausalLMOutput", "GPTOSS"]
