"""Loading a trained model and its tokenizer for inference (`ossgpt eval`, `ossgpt generate`).

A checkpoint path may name a model directory (config.json + weights, ossgpt's, Hugging Face's or OpenAI's
original layout) or a training run directory (see ossgpt.checkpoint.run_dir). A LoRA fine-tune's checkpoint
(ossgpt.checkpoint.adapted) loads as its base with the adapters folded in, or, on a base whose experts stay packed,
beside them (folding would dequantize the experts): decoding then runs the adapters' thin products too, without int8.

Context extension (`context_extension`): config overrides that set YaRN for F times the length a run trained on,
used at load time by `ossgpt eval` and as the starting point of a long-context fine-tune by `ossgpt train`.

How the weights are held (`--mxfp4`, `--quantize` of `ossgpt generate` and `ossgpt chat`), each "auto" by default:
  * MXFP4 experts (the published gpt-oss checkpoints) stay packed on the CPU (ossgpt.quant.mxfp4), where
    dequantizing them would need ~4x (bfloat16) to ~8x (float32) the memory; on a GPU they are dequantized.
  * `quantize`: the int8 copy of ossgpt.quant.int8 for decoding, weight-only (`int8`) or with each product's
    input quantized too (`int8-dynamic`), or `none`. "auto" picks int8-dynamic on the CPU, where decoding is bound
    by the bytes of weights read per token: every big matrix is then read in 8 bits per weight (4.25 for packed
    MXFP4 experts) by the native kernels, ~4x fewer bytes than float32, at a cost measured on the trained demo
    model of +0.0001 bits/byte (BENCHMARKS.md); none on a GPU, and `--quantize none` decodes exactly on the CPU.
    Scoring whole sequences (`decoding=False`: `ossgpt eval`) measures the model as stored: there "auto" is none
    (and scoring is bound by arithmetic, not by reading weights).
`describe_weights(model)` says in one line what was chosen; the CLI prints it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ossgpt.checkpoint import load_config
from ossgpt.checkpoint.adapted import is_adapted, load_adapted, load_whole_model, whole_model_directory
from ossgpt.checkpoint.pretrained import detect_format
from ossgpt.checkpoint.run_dir import resolve_checkpoint, run_record
from ossgpt.devices import resolve_device
from ossgpt.errors import UserError
from ossgpt.inference.memory import MemoryPlan, check_memory
from ossgpt.kernels.native import native
from ossgpt.quant.int8 import Int8Linear, quantize_for_decoding
from ossgpt.quant.mxfp4 import has_mxfp4_experts
from ossgpt.tokenizer import load_tokenizer

QUANTIZE_MODES = ("auto", "none", "int8", "int8-dynamic")
QUANTIZE_HELP = (
    "int8: int8 weights for the LM head, attention and dense experts (weight-only; ~4x fewer bytes per token than "
    "float32); int8-dynamic: the same, and each product quantizes its input at run time too (W8A8), the fastest "
    "on CPU; none: the checkpoint's weights as loaded, exact (default: auto, int8-dynamic on the CPU, none on a "
    "GPU)"
)
# Tokens of context the memory check provides for (the KV cache of a long chat).
CHECKED_CONTEXT = 8192


def quantize(model, mode: str | None, copy: bool = True, dtype: torch.dtype | None = None):
    """`model` itself (mode None or "none"), or its int8 version for decoding (see ossgpt.quant.int8); copy=False
    converts `model` itself; dtype: of the weights left in float (the embedding table keeps its own)."""
    if mode in (None, "none"):
        return model
    if mode not in ("int8", "int8-dynamic"):
        raise UserError(f"unknown quantization {mode!r}; use one of {', '.join(QUANTIZE_MODES)}")
    if model.device.type != "cpu":  # the int8 kernels are CPU ones; elsewhere every call would dequantize
        raise UserError(f"--quantize is for decoding on the CPU, not {model.device.type} (its int8 kernels are "
                        "CPU ones); leave it out there, or add --device cpu")  # fmt: skip
    return quantize_for_decoding(model, dynamic=mode == "int8-dynamic", copy=copy, dtype=dtype)


def describe_weights(model) -> str:
    """One line: how the model's weights are held and which kernels multiply by them."""
    kernels = native()
    isa = f"native {kernels.instruction_set()} kernels" if kernels is not None else "pure-PyTorch kernels"
    # Weights, not bytes: two MXFP4 values per byte of blocks; scales are not weights.
    state = model.state_dict()
    count = sum(t.numel() * (2 if name.endswith("_blocks") else 1) for name, t in state.items()
                if not name.endswith(("_scales", "scales")))  # fmt: skip
    parts = [f"{count / 1e9:.1f}B weights" if count >= 1e9 else f"{count / 1e6:.1f}M weights"]
    if has_mxfp4_experts(model):
        parts.append(f"experts MXFP4 ({isa if model.device.type == 'cpu' else 'dequantized per call'})")
    if isinstance(model.lm_head, Int8Linear):
        kind = "W8A8" if model.lm_head.dynamic else "weight-only"
        blocks = model.layers[0].self_attn.qkv_proj.scales.dim() == 2
        scales = ", attention with a scale per block of 32" if blocks else ""
        parts.append(f"LM head and attention int8 {kind}{scales} ({isa if model.lm_head.dynamic else 'torch kernels'})")
    parts.append(f"embedding {model.embed_tokens.weight.dtype}, {model.dtype} elsewhere".replace("torch.", ""))
    return ", ".join(parts)


def load_model(
    path: str | Path,
    device: str | torch.device | None = "cpu",
    dtype: torch.dtype = torch.float32,
    quantization: str | None = "auto",
    keep_mxfp4: bool | None = None,
    decoding: bool = True,
    **config_overrides,
):
    """The model (in eval mode) of the checkpoint at `path` (a model or training run directory), held as the
    options say (see the module doc).

    device: a name for ossgpt.devices.resolve_device ("auto" or None picks CUDA when available). dtype: of the
    float weights. quantization: one of QUANTIZE_MODES (None = "none"). keep_mxfp4: keep MXFP4 experts packed
    (None: on the CPU). decoding: what "auto" is for, decoding tokens (True) or scoring sequences (False).
    config_overrides change non-shape config fields at load time (e.g. RoPE scaling for context extension). On the
    CPU, a model that will not fit in the memory available is a UserError naming the figure, raised before anything
    is loaded.
    """
    directory = resolve_checkpoint(path)
    adapted = is_adapted(directory)
    weights = whole_model_directory(directory)
    device = resolve_device(device)
    packed = detect_format(weights).mxfp4
    keep_mxfp4 = packed and device.type == "cpu" if keep_mxfp4 is None else keep_mxfp4
    if adapted and keep_mxfp4:  # the adapters stay beside the packed experts, unmerged: no int8 copy of them
        if quantization not in ("auto", None, "none"):
            raise UserError(f"--quantize {quantization} needs the LoRA adapters of {directory} folded in: `ossgpt "
                            "merge` the run first, or load with --no-mxfp4")  # fmt: skip
        quantization = "none"
    if quantization == "auto":
        quantization = "int8-dynamic" if device.type == "cpu" and decoding else "none"
    quantizing = quantization not in (None, "none")
    if device.type == "cpu":
        config = load_config(weights, **config_overrides)
        advice = "" if keep_mxfp4 or not packed else "; keep the experts packed: leave out --no-mxfp4"
        # Quantizing keeps the embedding table as stored: bfloat16 in the published (MXFP4) checkpoints; any other
        # checkpoint's table is counted at float32, the most it can take.
        embedding_dtype = (torch.bfloat16 if packed else torch.float32) if quantizing else None
        plan = MemoryPlan.of(config, dtype, keep_mxfp4, quantization, embedding_dtype)
        check_memory(plan, min(CHECKED_CONTEXT, config.max_position_embeddings), str(directory), advice)
    # Quantizing: from the weights as stored (no float32 copy of what becomes int8), then the rest cast to dtype.
    # Not for adapters: they are folded into the weights in place, never into the memory-mapped file.
    as_stored = quantizing and not adapted
    options = dict(dtype=None if as_stored else dtype, device=device, keep_mxfp4=keep_mxfp4, **config_overrides)
    if adapted and keep_mxfp4:
        model = load_adapted(directory, **options)
    else:
        model = load_whole_model(directory, **options)
    model = quantize(model, quantization, copy=False, dtype=dtype)
    if device.type == "cpu":
        hold_input_major(model)
    return model


@torch.no_grad()
def hold_input_major(model: torch.nn.Module) -> None:
    """Hold every float32 nn.Linear weight [out, in] of `model` input-major in memory: the same matrix (shape,
    values, parameter), stored as its transpose [in, out] and seen through a transposed view. F.linear then asks
    the BLAS for x @ W with W untransposed. On the CPU, MKL's float32 product with a transposed weight streams the
    whole weight once per 3 rows when x has 4 to 15 rows (a decode step of a partial batch; BENCHMARKS.md,
    "Serving"), where the untransposed one reads it once at every row count and is as fast for long prompts. A
    tied embedding table shares the layout: a lookup reads its row strided, a cost per token, not per weight."""
    for module in model.modules():
        if type(module) is torch.nn.Linear and module.weight.dtype == torch.float32 and module.weight.is_contiguous():
            module.weight.data = module.weight.data.t().contiguous().t()


def load_model_and_tokenizer(path: str | Path, *args, vocab_file: str | Path | None = None, **options):
    """(model, tokenizer) of the checkpoint at `path`: `load_model(path, *args, **options)` and the tokenizer its
    config names (`config.tokenizer`): a compact vocabulary is rebuilt from the checkpoint's tokenizer.json, a
    tiktoken one read from its cache or `vocab_file`."""
    model = load_model(path, *args, **options)
    directory = resolve_checkpoint(path)
    tokenizer = load_tokenizer(model.config.tokenizer, directory=directory, vocab_file=vocab_file)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(
            f"{directory}: tokenizer {tokenizer.spec} has {tokenizer.vocab_size} tokens but the model only "
            f"{model.config.vocab_size} embeddings; the checkpoint's tokenizer does not belong to its model"
        )
    return model, tokenizer


def context_extension(checkpoint: Path, factor: float | None, no_yarn: bool) -> dict:
    """Config overrides that stretch the model's context `factor` times past the length it was trained on."""
    if factor is None:
        if no_yarn:
            raise UserError("--no-yarn only applies with --context-extension F")
        return {}
    if factor < 1:
        raise UserError(f"--context-extension must be >= 1, got {factor}")
    config = load_config(whole_model_directory(checkpoint))
    if config.rope_type == "yarn" and config.rope_factor > 1:
        raise UserError(f"this model was trained with YaRN factor {config.rope_factor}; extend models trained with "
                        "plain RoPE")  # fmt: skip
    trained = trained_seq_len(checkpoint) or config.max_position_embeddings
    overrides = {"max_position_embeddings": max(config.max_position_embeddings, int(factor * trained))}
    if not no_yarn and factor > 1:
        overrides.update(rope_type="yarn", rope_factor=factor, rope_original_max_position_embeddings=int(trained))
    return overrides


def trained_seq_len(checkpoint: Path) -> int | None:
    """The sequence length a training run's checkpoint was trained on (None for a model directory outside a run)."""
    return run_record(checkpoint).get("seq_len")
