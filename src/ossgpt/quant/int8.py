"""Faster decoding through int8: a copy of the model whose matmul weights are stored as int8.

Decoding one token reads every weight it uses once and does two FLOPs per weight: it is bound by memory
bandwidth, not arithmetic. For the `mini` preset that is ~255 MB of float32 per token, 80% of it the
100k x 512 LM head. Stored as int8 with one float scale per output channel (symmetric, round to nearest), the
same matrices are 4x smaller, and the products of ossgpt.kernels.int8 multiply by them without materialising the
float weights.

`quantize_for_decoding(model)` returns such a copy (the original is untouched; `copy=False` converts the model
itself, which a loader that owns it does to avoid holding both): the LM head (untied from the embedding, which
stays float32: a lookup reads one row per token), the attention projections (q, k and v stacked into one
product: `Int8Attention`) and dense experts become int8 (weight-only); norms, router, sinks and biases stay as
they were, and so do experts already packed in MXFP4 (ossgpt.quant.mxfp4: 4.25 bits per weight, fewer than
int8's). The copy is for inference: generate with it as with the original (`ossgpt.inference.generate` needs no
change). Its logits differ from float32's by the rounding of the weights (relative error ~1e-2), so greedy decoding
can pick a different token where two are nearly tied. The float32 model is the reference the tests compare against.

`quantize_for_decoding(model, dynamic=True)` also quantizes each product's *input* to int8 at run time (W8A8,
`int8_dynamic_linear`). It adds the activation's rounding (at most half a step of 1/127 of the largest value of
its block or row per element) to the logits' error, and is the fast mode on CPU: with the native kernels
(ossgpt.kernels.native) every product reads its int8 rows at memory speed; without them, torch._int_mm is
about as fast as the weight-only kernel for the small matrices and faster for the LM head
(`python bench/int8_rows.py`; the figures are in BENCHMARKS.md). With the native kernels, the attention
projections also get a weight scale per block of 32 values, as llama.cpp's Q8_0 does: a block's own largest value
sets its step, finer than a row's, for 2 bytes more per 32 weights. Their rounding is what costs gpt-oss most
accuracy; the LM head's per-row rounding costs little, and it is most of a small model's bytes, so it keeps a scale
per row, as do the dense experts (BENCHMARKS.md has both measurements).
"""

from __future__ import annotations

from copy import deepcopy

import torch
import torch.nn.functional as F
from torch import nn

from ossgpt.kernels.int8 import (
    block_scales_available,
    dequantize_int8,
    int8_dynamic_linear,
    int8_linear,
    native_scales,
    quantize_int8,
)
from ossgpt.kernels.native import fused_experts
from ossgpt.model.attention import Attention
from ossgpt.model.moe import Experts
from ossgpt.quant.mxfp4 import MXFP4Experts

BLOCK = 32  # values per scale of a W8A8 weight on the CPU (the native kernel's block)
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")  # the attention's weights that become int8


class Int8Linear(nn.Module):
    """nn.Linear with an int8 weight [out, in] and bfloat16 scales; the bias (if any) stays float.

    dynamic: also quantize the input to int8 at run time (`int8_dynamic_linear`); else weight-only.
    scale_blocks: with dynamic, where the native kernel runs the product (`block_scales_available`), give the weight
    a scale per block of 32 values (scales [out, in / 32], llama.cpp's Q8_0) instead of one per row (scales [out])."""

    def __init__(self, linear: nn.Linear, dynamic: bool = False, scale_blocks: bool = False):
        super().__init__()
        blocks = scale_blocks and dynamic and block_scales_available(linear.weight.device, linear.in_features)
        qweight, scales = quantize_int8(linear.weight, block=BLOCK if blocks else None)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.dynamic = dynamic

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized float32 weight (for code that reads `.weight`, e.g. the chunked loss)."""
        return dequantize_int8(self.qweight, self.scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic:
            return int8_dynamic_linear(x, self.qweight, self.scales, self.bias)
        out = int8_linear(x, self.qweight, self.scales)
        return out if self.bias is None else out + self.bias


class Int8Attention(Attention):
    """`Attention` with int8 projections, q, k and v stacked into one: [(H + 2 K) D, hidden], so that one product
    gives all three, its input read (and in W8A8 quantized) once. Each output row is computed as its own projection
    would compute it (the same int8 row, the same scales): the results are those of three Int8Linear."""

    def __init__(self, attention: Attention, config, layer_idx: int, dynamic: bool = False):
        with torch.device("meta"):
            super().__init__(config, layer_idx, attention.kernel)
        del self.q_proj, self.k_proj, self.v_proj  # replaced by qkv_proj
        projections = [attention.q_proj, attention.k_proj, attention.v_proj]
        self.widths = [p.out_features for p in projections]  # H * D, K * D, K * D
        stacked = nn.Linear(config.hidden_size, sum(self.widths), bias=config.attention_bias, device="meta")
        stacked.weight = nn.Parameter(torch.cat([p.weight.detach() for p in projections]), requires_grad=False)
        if config.attention_bias:
            stacked.bias = nn.Parameter(torch.cat([p.bias.detach() for p in projections]), requires_grad=False)
        self.qkv_proj = Int8Linear(stacked, dynamic=dynamic, scale_blocks=True)
        self.o_proj = Int8Linear(attention.o_proj, dynamic=dynamic, scale_blocks=True)
        self.sinks = attention.sinks

    def project(self, x):
        """x [B, T, hidden] -> q [B, T, H * D], k, v [B, T, K * D]: views of one product's columns."""
        return self.qkv_proj(x).split(self.widths, dim=-1)


class Int8Experts(Experts):
    """`Experts` with int8 weights: gate_up [E, 2I, H] and down [E, H, I] (output channels first), bf16 scales.

    dynamic: quantize each product's input at run time too (`int8_dynamic_linear`); else weight-only."""

    def __init__(self, experts: Experts, config, dynamic: bool = False):
        with torch.device("meta"):
            super().__init__(config)
        del self.gate_up_proj, self.down_proj  # replaced by the int8 buffers
        gate_up = [quantize_int8(w.T) for w in experts.gate_up_proj.unbind(0)]
        down = [quantize_int8(w.T) for w in experts.down_proj.unbind(0)]
        self.register_buffer("gate_up_qweight", torch.stack([q for q, _ in gate_up]))
        self.register_buffer("gate_up_scales", torch.stack([s for _, s in gate_up]))
        self.register_buffer("down_qweight", torch.stack([q for q, _ in down]))
        self.register_buffer("down_scales", torch.stack([s for _, s in down]))
        self.gate_up_proj_bias = nn.Parameter(experts.gate_up_proj_bias.detach().clone(), requires_grad=False)
        self.down_proj_bias = nn.Parameter(experts.down_proj_bias.detach().clone(), requires_grad=False)
        self.product = int8_dynamic_linear if dynamic else int8_linear

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, H], indices/weights [N, k] -> [N, H]: the loop of `Experts.loop`, with int8 experts; with dynamic
        (W8A8) products, a few tokens (decoding) in one fused native call where there is one (`fused_experts`)."""
        if self.product is int8_dynamic_linear:
            fused = fused_experts("int8_experts", x, indices, weights,
                                  (self.gate_up_qweight, native_scales(self.gate_up_scales), self.gate_up_proj_bias),
                                  (self.down_qweight, native_scales(self.down_scales), self.down_proj_bias),
                                  self.alpha, self.limit)  # fmt: skip
            if fused is not None:
                return fused
        return self.loop(x, indices, weights)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's MLP on its tokens: x [n, H] -> [n, H]."""
        h = self.activation(
            self.product(x, self.gate_up_qweight[e], self.gate_up_scales[e]) + self.gate_up_proj_bias[e]
        )
        return self.product(h, self.down_qweight[e], self.down_scales[e]) + self.down_proj_bias[e]


class StoredEmbedding(nn.Module):
    """An embedding table kept in the dtype it was stored in (bfloat16 for gpt-oss), each looked-up row widened to
    `dtype`. A lookup reads one row per token, so a narrow table costs no speed, only less memory."""

    def __init__(self, embedding: nn.Embedding, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(embedding.weight.detach(), requires_grad=False)
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [...] -> [..., hidden] in `dtype`."""
        return F.embedding(ids, self.weight).to(self.dtype)


class StoredLinear(nn.Linear):
    """A frozen nn.Linear whose weight stays in the dtype it was stored in (bfloat16 for gpt-oss), each product in
    `dtype`: x [..., in] -> [..., out]. Held so for LoRA training (training.sft.hold_frozen_base), an LM head is only
    multiplied by in the chunked loss, which reads `.weight` and widens it a slice of rows at a time
    (ossgpt.kernels.loss); calling the module (all the logits) widens the whole weight for that product."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        self.weight = nn.Parameter(linear.weight.detach(), requires_grad=False)
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(self.dtype), self.bias)


@torch.no_grad()
def quantize_for_decoding(
    model: nn.Module, dynamic: bool = False, copy: bool = True, dtype: torch.dtype | None = None
) -> nn.Module:
    """`model` with int8 LM head, attention projections and dense experts, in eval mode; see the module doc.

    dynamic: every product quantizes its input too (W8A8, `int8_dynamic_linear`). copy: convert a deep copy
    (the default) or, False, the model itself (its float weights are freed as they are replaced). dtype: cast
    the weights left in float (norms, biases, router, sinks) to it, while the embedding table stays as it is
    (`StoredEmbedding`): a loader quantizes from the checkpoint's bfloat16 and computes in float32 so."""
    quantized = deepcopy(model) if copy else model
    quantized.eval()
    quantized.loss_workspace = {}  # training scratch, not needed for decoding
    for p in quantized.parameters():
        p.requires_grad_(False)
    # A new module: the embedding keeps its float weight.
    quantized.lm_head = Int8Linear(quantized.lm_head, dynamic=dynamic)
    for i, layer in enumerate(quantized.layers):
        layer.self_attn = Int8Attention(layer.self_attn, quantized.config, i, dynamic=dynamic)
        if not isinstance(layer.mlp.experts, MXFP4Experts):
            layer.mlp.experts = Int8Experts(layer.mlp.experts, quantized.config, dynamic=dynamic)
    if dtype is not None:
        embedding = quantized.embed_tokens
        del quantized.embed_tokens  # kept out of the cast below
        for param in quantized.parameters():  # parameters only: the int8 scales stay bfloat16
            param.data = param.data.to(dtype)
        quantized.embed_tokens = StoredEmbedding(embedding, dtype)
    quantized.options = quantized.options  # the new modules take the model's kernels
    return quantized
