"""ossgpt: GPT-OSS from scratch — a readable, exact and fast PyTorch implementation.

The public names: GPTOSSConfig, GPTOSSConfigMini, GPTOSSForCausalLM, CausalLMOutput and HarmonyTokenizer.
"""

from ossgpt.config import GPTOSSConfig, GPTOSSConfigMini
from ossgpt.model import CausalLMOutput, GPTOSSForCausalLM

__version__ = "0.1.0"


def __getattr__(name):
    # The tokenizer pulls in tiktoken; import it only when asked for.
    if name == "HarmonyTokenizer":
        from ossgpt.tokenizer import HarmonyTokenizer

        return HarmonyTokenizer
    raise AttributeError(f"module 'ossgpt' has no attribute {name!r}")


__all__ = ["CausalLMOutput", "GPTOSSConfig", "GPTOSSConfigMini", "GPTOSSForCausalLM", "HarmonyTokenizer"]
