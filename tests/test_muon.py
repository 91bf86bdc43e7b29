"""Muon (training/muon.py): Newton-Schulz against its closed form through the SVD, the update rule in closed form,
the AdamW groups against torch.optim.AdamW, and which parameters each optimizer gets."""

from __future__ import annotations

import math

import pytest
import torch

from ossgpt import GPTOSSConfig, GPTOSSForCausalLM
from ossgpt.training.muon import NS_COEFFICIENTS, Muon, orthogonalize, uses_muon
from ossgpt.training.optim import build_optimizer, param_groups


def newton_schulz_by_svd(matrix: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The closed form of `orthogonalize`: each iteration maps every singular value s of the Frobenius-normalised
    matrix to a s + b s^3 + c s^5 and keeps the singular vectors."""
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    s = s / s.square().sum(dim=-1, keepdim=True).sqrt()
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        s = a * s + b * s**3 + c * s**5
    return u @ torch.diag_embed(s) @ vh


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (3, 16, 48), (2, 48, 16), (32, 32)])
def test_orthogonalize_is_the_polynomial_of_the_singular_values(shape):
    matrix = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(orthogonalize(matrix), newton_schulz_by_svd(matrix), rtol=1e-9, atol=1e-9)


def test_orthogonalize_brings_singular_values_near_one():
    # Singular values spread over 2 orders of magnitude all end in Newton-Schulz's band of about [0.7, 1.2]
    # (five iterations multiply the smallest ones by at most 3.4445^5 ~ 490: 3 orders would stay below it).
    u, _ = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(1)))
    v, _ = torch.linalg.qr(torch.randn(128, 64, generator=torch.Generator().manual_seed(2)))
    matrix = u @ torch.diag(torch.logspace(-2, 0, 64)) @ v.T  # [64, 128]
    s = torch.linalg.svdvals(orthogonalize(matrix))
    assert s.min() > 0.6 and s.max() < 1.25
    assert orthogonalize(torch.zeros(4, 8)).abs().max() == 0  # no division by zero


def tiny_model() -> GPTOSSForCausalLM:
    torch.manual_seed(0)
    config = GPTOSSConfig.from_preset("tiny", tokenizer="bytes", vocab_size=320, eos_token_id=256, hidden_size=64,
                                      intermediate_size=64, num_hidden_layers=2, head_dim=16)  # fmt: skip
    return GPTOSSForCausalLM(config).double()


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    model = tiny_model()
    muon, decayed, plain = param_groups(model, 0.1, muon=True)
    names = {id(p): name for name, p in model.named_parameters()}
    muon_names = {names[id(p)] for p in muon["params"]}
    assert muon_names == {f"layers.{i}.{part}" for i in range(2) for part in (
        "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
        "mlp.experts.gate_up_proj", "mlp.experts.down_proj")}  # fmt: skip
    assert {names[id(p)] for p in decayed["params"]} == {"embed_tokens.weight", "layers.0.mlp.router.weight",
                                                          "layers.1.mlp.router.weight"}  # fmt: skip
    assert muon["muon"] and muon["weight_decay"] == decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0
    assert len(muon["params"]) + len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))
    assert uses_muon("module.layers.0.self_attn.q_proj.weight", torch.zeros(4, 4))  # under DDP's prefix
    assert not uses_muon("layers.0.mlp.experts.down_proj_bias", torch.zeros(4, 4))


def set_grads(model, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, dtype=p.dtype, generator=generator)


@pytest.mark.parametrize("ns_steps", [5, 3])
def test_two_muon_steps_in_closed_form(ns_steps):
    model = tiny_model()
    lr, wd, beta = 0.01, 0.1, 0.95
    optimizer = build_optimizer(model, lr, wd, (0.9, 0.95), "muon", ns_steps=ns_steps)
    weight = model.layers[0].mlp.experts.gate_up_proj  # [E, 64, 128]: E matrices, each orthogonalised alone
    scale = 0.2 * math.sqrt(128)  # update RMS of AdamW's
    expected, momentum = weight.detach().clone(), torch.zeros_like(weight)
    for step in range(2):
        set_grads(model, seed=step)
        grad = weight.grad.clone()
        momentum = beta * momentum + (1 - beta) * grad
        nesterov = beta * momentum + (1 - beta) * grad
        expected = expected * (1 - lr * wd) - lr * scale * newton_schulz_by_svd(nesterov, ns_steps)
        optimizer.step()
        torch.testing.assert_close(weight.detach(), expected, rtol=1e-9, atol=1e-9)


def test_adamw_groups_step_as_torch_adamw():
    ours, reference = tiny_model(), tiny_model()
    kwargs = dict(lr=0.01, betas=(0.9, 0.95), eps=1e-8)
    optimizer = Muon([{"params": list(ours.parameters()), "weight_decay": 0.1}], **kwargs)
    torch_adamw = torch.optim.AdamW(reference.parameters(), weight_decay=0.1, **kwargs)
    for step in range(3):
        set_grads(ours, seed=step)
        set_grads(reference, seed=step)
        optimizer.step()
        torch_adamw.step()
    for (name, p), q in zip(ours.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12, msg=name)


def test_muon_trains_a_tiny_model():
    model = tiny_model().float()
    optimizer = build_optimizer(model, 1e-2, 0.0, (0.9, 0.95), "muon")
    input_ids = torch.randint(0, 257, (4, 32), generator=torch.Generator().manual_seed(0))
    for _ in range(60):
        loss = model(input_ids, labels=input_ids, return_logits=False).lm_loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 0.5
