"""The GPT-OSS architecture, one concept per module: norms, rope, attention, moe, block, cache, model."""

from ossgpt.model.model import CausalLMOutput, GPTOSSForCausalLM

__all__ = ["CausalLMOutput", "GPTOSSForCausalLM"]
