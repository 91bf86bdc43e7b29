"""The Python API's model class: `GPTOSSForCausalLM` is ossgpt.model's `GPTOSS` with the methods people expect
from a Hugging Face model, each delegating to the package that implements it.

    model = GPTOSSForCausalLM(config)                       # or the prototype's keywords: num_layers=..., ...
    model = GPTOSSForCausalLM.from_pretrained("gpt-oss-20b")  # ossgpt.checkpoint; a run or LoRA run directory too
    model.save_pretrained("my-model")                        # ossgpt.checkpoint
    output = model.generate(input_ids, max_new_tokens=50)    # ossgpt.inference.generate
    for token in model.stream(input_ids, max_new_tokens=50): ...

The model package computes and imports nothing above it; loading, saving and generating sit above the model, so
this class, which gathers them, sits above all three.
"""

from __future__ import annotations

from ossgpt.checkpoint import from_pretrained, save_pretrained
from ossgpt.checkpoint.adapted import is_adapted, load_adapted
from ossgpt.checkpoint.run_dir import resolve_checkpoint
from ossgpt.config import GPTOSSConfig, GPTOSSConfigMini
from ossgpt.inference.generate import generate, stream
from ossgpt.model import GPTOSS
from ossgpt.options import RuntimeOptions


class GPTOSSForCausalLM(GPTOSS):
    def __init__(self, config: GPTOSSConfig | None = None, options: RuntimeOptions | None = None, **prototype_names):
        """`GPTOSSForCausalLM(config, options)`, or the prototype's keywords (`num_layers=`, `num_experts=`, ...)
        over the `mini` preset (see `GPTOSSConfigMini`)."""
        if config is None:
            config = GPTOSSConfigMini(**prototype_names)
        elif prototype_names:
            raise TypeError("pass either a config or keyword arguments, not both")
        super().__init__(config, options)

    @classmethod
    def from_pretrained(cls, directory, **kwargs) -> GPTOSSForCausalLM:
        """Load an ossgpt, Hugging Face or original gpt-oss directory, or a training run's (its checkpoint); see
        ossgpt.checkpoint.from_pretrained for the keywords. A LoRA fine-tune (`ossgpt sft`'s run or checkpoint)
        loads as its base with the adapters on, trainable and not merged, as PEFT's from_pretrained does (see
        ossgpt.checkpoint.adapted.load_adapted; `base=` names a base that moved); ossgpt.lora.merge_lora(model)
        folds them in."""
        directory = resolve_checkpoint(directory)
        if is_adapted(directory):
            return load_adapted(directory, model_class=cls, **kwargs)
        return from_pretrained(directory, model_class=cls, **kwargs)

    def save_pretrained(self, directory, **kwargs) -> None:
        """Write `model.safetensors` + `config.json`; see ossgpt.checkpoint.save_pretrained."""
        save_pretrained(self, directory, **kwargs)

    def generate(self, input_ids, **kwargs):
        """Autoregressive generation with a KV cache -> [B, T + new]; see ossgpt.inference.generate.generate."""
        return generate(self, input_ids, **kwargs)

    def stream(self, input_ids, **kwargs):
        """An iterator over the new tokens, one [B] tensor per step; see ossgpt.inference.generate.stream."""
        return stream(self, input_ids, **kwargs)
