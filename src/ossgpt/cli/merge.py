"""`ossgpt merge --checkpoint RUN --out DIR`: fold a LoRA fine-tune's adapters into its base, as one plain model.

    ossgpt merge --checkpoint runs/chat --out chat-model                      # ossgpt format, float32
    ossgpt merge --checkpoint runs/chat --out chat-hf --format hf --dtype bfloat16
    ossgpt merge --checkpoint runs/20b --out 20b-chat --format hf --mxfp4     # experts packed, as gpt-oss ships

Each adapted weight becomes W + (alpha / r) B A (ossgpt.lora.merge_lora); the result loads anywhere a model does
(transformers' GptOssForCausalLM for --format hf). A base with MXFP4 experts is dequantized exactly; --mxfp4 rounds
the merged experts to MXFP4 again and prints what that rounding costs: against the weights, and against the
fine-tuning's update to them (ossgpt.lora.requantize_error), which it may wipe out. With --mxfp4 the layers are
merged and packed one at a time, so the experts are never all dense at once. DIR appears whole or not at all.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from ossgpt.checkpoint import save_pretrained
from ossgpt.checkpoint.adapted import adapted_base, is_adapted, load_adapted
from ossgpt.checkpoint.pretrained import detect_format
from ossgpt.checkpoint.run_dir import resolve_checkpoint
from ossgpt.devices import DTYPES
from ossgpt.errors import UserError
from ossgpt.kernels.mxfp4 import dequantize_experts
from ossgpt.lora import merge_lora, requantize_error
from ossgpt.lora.experts import LoRAExperts
from ossgpt.lora.transform import lora_config
from ossgpt.quant.mxfp4 import MXFP4Experts, pack_experts
from ossgpt.tokenizer import TOKENIZER_FILE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", required=True, metavar="RUN",
        help="a LoRA fine-tune: its run directory (ossgpt sft --out) or its checkpoint folder",
    )  # fmt: skip
    parser.add_argument("--out", required=True, metavar="DIR", help="directory to write the merged model to")
    parser.add_argument(
        "--format", choices=["ossgpt", "hf"], default="ossgpt",
        help="ossgpt: ossgpt's own; hf: Hugging Face's gpt-oss layout (transformers loads it) (default: ossgpt)",
    )  # fmt: skip
    parser.add_argument(
        "--mxfp4", action="store_true",
        help="round the merged experts to MXFP4 (the published gpt-oss layout; needs --format hf) and print the "
        "error that adds",
    )  # fmt: skip
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32",
                        help="dtype of the written weights (default: float32)")  # fmt: skip
    parser.add_argument("--base", default=None, metavar="DIR",
                        help="the base model, if it is no longer where the run found it")  # fmt: skip
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")


def run(args: argparse.Namespace) -> int:
    checkpoint, target = resolve_checkpoint(args.checkpoint), Path(args.out)
    if not is_adapted(checkpoint):
        raise UserError(
            f"{checkpoint} holds a whole model, not LoRA adapters (a --full fine-tune or a pretrained model): there is "
            f"nothing to merge; rewrite it with `ossgpt convert --from {checkpoint} --to {target} --format hf`"
        )
    if target.exists() and not args.force:
        raise UserError(f"{target} already exists; pass --force to replace it")
    if target.resolve() in (checkpoint.resolve(), checkpoint.parent.resolve()):
        raise UserError("--out must differ from --checkpoint")
    if args.mxfp4 and args.format != "hf":
        raise UserError("--mxfp4 writes the published MXFP4 layout, a Hugging Face one: add --format hf")
    base = Path(args.base) if args.base else adapted_base(checkpoint)
    dtype = DTYPES[args.dtype]
    # Packed experts stay packed while loading when they will be packed again: merged one layer at a time below.
    keep_mxfp4 = args.mxfp4 and detect_format(base).mxfp4
    model = load_adapted(checkpoint, base=base, dtype=dtype, keep_mxfp4=keep_mxfp4)
    lora = lora_config(model)
    rows = f", and the rows of {len(lora.tokens)} tokens" if lora.tokens else ""
    note = ""
    if args.mxfp4:
        note = "; " + repack_experts(model)
    merge_lora(model)
    tokenizer = checkpoint / TOKENIZER_FILE  # a compact vocabulary: the model needs its token table
    save_pretrained(model.eval(), target, format=args.format, tokenizer_file=tokenizer if tokenizer.is_file() else None)
    print(
        f"merged {checkpoint} (LoRA rank {lora.rank}, alpha {lora.alpha:g}, on {', '.join(lora.targets)}{rows}) into "
        f"{base}:"
        f" wrote {target} ({args.format}, {args.dtype}{', experts MXFP4' if args.mxfp4 else ''}){note}"
    )
    return 0


@torch.no_grad()
def repack_experts(model) -> str:
    """Merge each layer's expert adapters and round the experts to MXFP4, a layer at a time; what that costs."""
    update_errors = list(requantize_error(model).values())  # before merging: it compares with the updates
    rounding_sq = weight_sq = 0.0
    for layer in model.layers:
        experts = layer.mlp.experts
        if isinstance(experts, LoRAExperts):
            experts = experts.merged(model.config)
        if not isinstance(experts, MXFP4Experts):  # dense (merged, or a dense base's): round it
            packed = pack_experts(experts, model.config)
            for projection in ("gate_up_proj", "down_proj"):
                weight = getattr(experts, projection).float()
                rounded = dequantize_experts(getattr(packed, f"{projection}_blocks"),
                                             getattr(packed, f"{projection}_scales"))  # fmt: skip
                rounding_sq += (rounded - weight).square().sum().item()
                weight_sq += weight.square().sum().item()
            experts = packed
        layer.mlp.experts = experts
    model.options = model.options  # the new modules take the model's kernels
    text = f"MXFP4 rounding moved the experts' weights by {math.sqrt(rounding_sq / max(weight_sq, 1e-30)):.2%} (RMS)"
    if update_errors:
        text += (
            f", {max(update_errors):.2f} times the size of the fine-tuning's update at worst (mean "
            f"{sum(update_errors) / len(update_errors):.2f}; near 1 or more, the packed model has lost the update: "
            "keep it dense)"
        )
    return text
