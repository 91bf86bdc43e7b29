"""ossgpt: GPT-OSS from scratch — a readable, exact and fast PyTorch implementation.

The public names: GPTOSSConfig, GPTOSSConfigMini, RuntimeOptions, GPTOSSForCausalLM, CausalLMOutput and
HarmonyTokenizer.
"""

__version__ = "0.3.0"

from ossgpt.api import GPTOSSForCausalLM  # noqa: E402 - after __version__, which modules below read
from ossgpt.config import GPTOSSConfig, GPTOSSConfigMini  # noqa: E402
from ossgpt.model import CausalLMOutput  # noqa: E402
from ossgpt.options import RuntimeOptions  # noqa: E402


def __getattr__(name):
    # The tokenizer pulls in tiktoken; import it only when asked for.
    if name == "HarmonyTokenizer":
        from ossgpt.tokenizer import HarmonyTokenizer

        return HarmonyTokenizer
    raise AttributeError(f"module 'ossgpt' has no attribute {name!r}")


__all__ = [
    "CausalLMOutput", "GPTOSSConfig", "GPTOSSConfigMini", "GPTOSSForCausalLM", "HarmonyTokenizer", "RuntimeOptions",
]  # fmt: skip
