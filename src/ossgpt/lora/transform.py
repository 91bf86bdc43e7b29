"""Adding adapters to a GPTOSS model, listing them, and folding them back in.

    add_lora(model, config)      every targeted module replaced by its adapted twin, the base frozen (in place)
    lora_parameters(model)       [(name, parameter)] of the adapters: what an optimizer gets
    adapter_state_dict(model)    {name: tensor} of the adapters, e.g. "layers.0.self_attn.q_proj.lora_A",
                                 "layers.0.mlp.experts.gate_up_proj_lora_B", "embed_tokens.tokens.delta"
    merge_lora(model)            the plain model again, every update folded into its weight (in place)

A *site* is one adapted weight of the base, named as the base names it ("layers.0.self_attn.q_proj",
"layers.0.mlp.router", "layers.0.mlp.experts.down_proj"), with the shape of the weight it adapts in the base's
layout: [out, in] for a linear map, [E, in, out] for experts (whether stored dense or packed). An adapter fits
any base with the same sites: one trained on a packed base loads onto the dense one, and the other way round.
With LoRAConfig.tokens, the embedding table is a site too ("embed_tokens", [V, H]), and an untied LM head
("lm_head", [V, H]): its rows of those tokens train (ossgpt.lora.tokens).
"""

from __future__ import annotations

import torch
from torch import nn

from ossgpt.lora.config import ATTENTION_TARGETS, EXPERT_TARGETS, LORA_TARGETS, LoRAConfig
from ossgpt.lora.experts import LoRAExperts, expert_weight_shape
from ossgpt.lora.linear import LoRALinear, LoRARouter
from ossgpt.lora.tokens import TokenEmbedding, TokenHead, add_token_rows, merge_token_rows, token_ids

ADAPTED = (LoRALinear, LoRARouter, LoRAExperts)
TOKEN_SITES = ("embed_tokens", "lm_head")  # the modules whose rows of LoRAConfig.tokens train


def add_lora(model: nn.Module, config: LoRAConfig, seed: int = 0, dtype: torch.dtype | None = None) -> nn.Module:
    """Give `model` (a GPTOSS, dense or with MXFP4 experts) adapters on config.targets in every layer; in place.

    Every base parameter gets requires_grad False: only the adapters train. B starts at zero, so the adapted model
    computes exactly what the base does; A is drawn from a generator seeded with `seed` (the same adapters for the
    same seed, on any device). dtype: the adapters' (default: the base's); float32 adapters on a bfloat16 base
    run under autocast. config.tokens' rows of the embedding (and LM head) train too, from zero deltas."""
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters; merge_lora(model) first, or start from a fresh base")
    base_sites(model, config.targets, config.tokens)  # raises, before anything changes, on what cannot be adapted
    for param in model.parameters():
        param.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    rank, alpha = config.rank, config.alpha
    for layer in model.layers:
        attention, moe = layer.self_attn, layer.mlp
        for name in ATTENTION_TARGETS:
            if name in config.targets:
                setattr(attention, name, LoRALinear(getattr(attention, name), rank, alpha, generator, dtype))
        if "router" in config.targets:
            moe.router = LoRARouter(moe.router, model.config, rank, alpha, generator, dtype)
        projections = tuple(name for name in EXPERT_TARGETS if name in config.targets)
        if projections:
            moe.experts = LoRAExperts(moe.experts, model.config, rank, alpha, projections, generator, dtype)
    if config.tokens:
        add_token_rows(model, config.tokens, dtype)
    return model


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(module, (*ADAPTED, TokenEmbedding, TokenHead)) for module in model.modules())


def lora_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The adapters' parameters (and trained token rows) with their names in the model's state dict, in the model's
    order; a tied embedding and LM head's rows once, under the embedding's name."""
    return [(name, p) for name, p in model.named_parameters() if name.endswith(("lora_A", "lora_B", "tokens.delta"))]


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name: tensor} of the adapters only (detached, not copied)."""
    return {name: p.detach() for name, p in lora_parameters(model)}


def lora_config(model: nn.Module) -> LoRAConfig:
    """The LoRAConfig an adapted model was built with, read back from its modules."""
    adapted = {name.rsplit(".", 1)[-1]: m for name, m in model.named_modules() if isinstance(m, ADAPTED)}
    if not adapted:
        raise ValueError("the model has no LoRA adapters; add_lora(model, config) adds them")
    targets = {name for name in adapted if name != "experts"}  # q_proj, ..., router
    targets |= set(getattr(adapted.get("experts"), "projections", ()))
    first = next(iter(adapted.values()))
    return LoRAConfig(rank=first.lora_rank, alpha=first.lora_alpha, targets=tuple(targets), tokens=token_ids(model))


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and remove it: `model` is a plain GPTOSS again (in place).

    Packed MXFP4 experts become dense `Experts` (dequantized to their biases' dtype, plus the update); to pack
    them again, see `requantize_error`. Trained token rows are added to the embedding's (and LM head's) rows. The
    base parameters stay frozen (requires_grad False)."""
    merge_token_rows(model)
    for layer in model.layers:
        attention, moe = layer.self_attn, layer.mlp
        for name in ATTENTION_TARGETS:
            if isinstance(getattr(attention, name), LoRALinear):
                setattr(attention, name, getattr(attention, name).merged())
        if isinstance(moe.router, LoRARouter):
            moe.router = moe.router.merged(model.config)
        if isinstance(moe.experts, LoRAExperts):
            moe.experts = moe.experts.merged(model.config)
    return model


def base_sites(
    model: nn.Module, targets: tuple[str, ...] = LORA_TARGETS, tokens: tuple[int, ...] = ()
) -> dict[str, tuple[int, ...]]:
    """{site name: shape of the weight it adapts} for `targets` in every layer, and the embedding and untied LM
    head when `tokens` has ids (see the module doc); the same for the base and for the model adapted on it.
    ValueError names the first module that cannot be adapted, or a token id outside the vocabulary."""
    sites = {}
    for i, layer in enumerate(model.layers):
        prefix = f"layers.{i}."
        for name in ATTENTION_TARGETS:
            module = getattr(layer.self_attn, name, None)  # None: a decoding copy, which stacks q, k and v
            if name in targets:
                if not isinstance(module, (nn.Linear, LoRALinear)):
                    found = f".{name} is a {type(module).__name__}, not" if module is not None else f" has no {name},"
                    raise ValueError(f"{prefix}self_attn{found} an nn.Linear: adapt the float model, not one "
                                     "quantized for decoding")  # fmt: skip
                sites[f"{prefix}self_attn.{name}"] = tuple(module.weight.shape)
        if "router" in targets:
            sites[f"{prefix}mlp.router"] = tuple(layer.mlp.router.weight.shape)
        for name in EXPERT_TARGETS:
            if name in targets:
                shape = expert_weight_shape(layer.mlp.experts, name)
                if shape is None:
                    raise ValueError(f"{prefix}mlp.experts is a {type(layer.mlp.experts).__name__}: LoRA adapts dense "
                                     "or MXFP4-packed experts only")  # fmt: skip
                sites[f"{prefix}mlp.experts.{name}"] = shape
    if tokens:
        sites.update(token_sites(model, tokens))
    return sites


def token_sites(model: nn.Module, tokens: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """{"embed_tokens": [V, H]}, and "lm_head" too when it is not tied to the embedding; ValueError for a token id
    outside the vocabulary or an LM head that is not a float nn.Linear."""
    embedding, head = model.embed_tokens, model.lm_head
    vocab = embedding.weight.shape[0]
    if max(tokens) >= vocab:
        raise ValueError(f"token id {max(tokens)} is outside the model's vocabulary of {vocab} ids")
    if not isinstance(head, (nn.Linear, TokenHead)):
        raise ValueError(f"lm_head is a {type(head).__name__}, not an nn.Linear: adapt the float model, not one "
                         "quantized for decoding")  # fmt: skip
    sites = {"embed_tokens": tuple(embedding.weight.shape)}
    if head.weight is not embedding.weight:
        sites["lm_head"] = tuple(head.weight.shape)
    return sites


def adapter_shapes(sites: dict[str, tuple[int, ...]], rank: int, tokens: int = 0) -> dict[str, tuple[int, ...]]:
    """{adapter tensor name: shape} that add_lora creates at these sites: A [r, in] and B [out, r] beside a linear
    map's weight [out, in]; A [E, in, r] and B [E, r, out] beside experts' [E, in, out]; delta [tokens, H] beside
    the embedding table's or LM head's [V, H]."""
    shapes = {}
    for site, shape in sites.items():
        if site in TOKEN_SITES:
            shapes[f"{site}.tokens.delta"] = (tokens, shape[1])
        elif len(shape) == 2:
            out_features, in_features = shape
            shapes[f"{site}.lora_A"], shapes[f"{site}.lora_B"] = (rank, in_features), (out_features, rank)
        else:
            E, in_features, out_features = shape
            shapes[f"{site}_lora_A"], shapes[f"{site}_lora_B"] = (E, in_features, rank), (E, rank, out_features)
    return shapes
