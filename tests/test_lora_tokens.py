"""Trained token rows beside LoRA (ossgpt.lora.tokens, LoRAConfig.tokens, `ossgpt sft --lora-tokens`), against
independent references in float64 on tiny models, tied and untied:

adapted model              == the base at the start (zero deltas); == the merged model (rows folded into W) after
delta's gradients          vs finite differences (gradcheck), and vs autograd through the formed weight W + delta
the chunked loss's rows    vs the plain loss of the formed weight, values and gradients, and no [V, H] kept
training                   the base unchanged, only the chosen rows move (after merging too)
files                      save/load round trip, old configs, and the errors of a wrong base
`ossgpt sft`               --lora-tokens harmony trains the chat tokens' rows; the loaders pick them up; bad values
                           and resuming with another value are one-line errors
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.func import functional_call

from ossgpt import RuntimeOptions
from ossgpt.chat.harmony import SPECIAL_TOKENS
from ossgpt.checkpoint import from_pretrained
from ossgpt.checkpoint.adapted import load_adapted
from ossgpt.cli import main
from ossgpt.inference.loading import load_model
from ossgpt.kernels.loss import linear_cross_entropy
from ossgpt.lora import LoRAConfig, add_lora, load_adapters, lora_parameters, merge_lora, save_adapters
from ossgpt.lora.tokens import TokenEmbedding, TokenHead
from ossgpt.lora.transform import adapter_shapes, base_sites, lora_config
from ossgpt.quant.int8 import StoredEmbedding
from ossgpt.training.sft import hold_frozen_base
from test_lora import base_models, randomize_b
from test_sft import base, chats, fails, sft_argv, tiny_model, tokenizer  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENS = (5, 17, 90)
CONFIG = LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "down_proj"), tokens=(90, 5, 17))  # sorted by the config
# The chosen tokens as inputs and as targets, among others; longer than the window of 6.
IDS = torch.tensor([[5, 90, 17, 5, 3, 90, 40, 17, 1], [2, 17, 60, 5, 90, 8, 9, 17, 11]])
DELTAS = {"embed_tokens.tokens.delta", "lm_head.tokens.delta"}
TIED = pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])


def base_model(tied: bool, **overrides):
    """A float64 base (dense experts), its embedding tied to the LM head or not."""
    return base_models(tie_word_embeddings=tied, **overrides)[0]


def adapted(original, config: LoRAConfig = CONFIG, chunk: int = 4, lora: bool = True):
    """`original` (copied) with adapters and token rows, the rows nonzero, and the adapters too unless `lora` is False
    (then the model is the base with the rows changed); the chunked loss in chunks of `chunk` rows (0: plain)."""
    model = add_lora(copy.deepcopy(original), config)
    model.options = options(chunk)
    if lora:
        randomize_b(model)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in lora_parameters(model):
            if name in DELTAS:
                p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def options(chunk: int) -> RuntimeOptions:
    return RuntimeOptions(attention="eager", experts="loop", loss_chunk_size=chunk)


def formed_weights(original, deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The independent way: the base's tables with the deltas added to the chosen rows, W.index_add(0, ids, delta),
    for functional_call (a tied base's LM head is its embedding: one table)."""
    ids = torch.tensor(TOKENS)
    state = original.state_dict()
    return {f"{site}.weight": state[f"{site}.weight"].index_add(0, ids, deltas[f"{site}.tokens.delta"])
            for site in ("embed_tokens", "lm_head") if f"{site}.tokens.delta" in deltas}  # fmt: skip


def deltas_of(model) -> dict[str, torch.Tensor]:
    return {name: p for name, p in lora_parameters(model) if name in DELTAS}


# ----------------------------------------------------------------------------------------------------- the config
def test_config_tokens_are_sorted_checked_and_saved():
    assert CONFIG.tokens == TOKENS and LoRAConfig().tokens == ()
    assert LoRAConfig.from_dict(CONFIG.to_dict()) == CONFIG and CONFIG.to_dict()["tokens"] == list(TOKENS)
    old = {"rank": 4, "alpha": 8.0, "targets": ["q_proj"]}  # as written before `tokens`, and now without tokens
    assert LoRAConfig.from_dict(old).tokens == () and LoRAConfig.from_dict(old).to_dict() == old
    for bad, message in (((-1,), "non-negative integer"), ((True,), "non-negative integer"), ((1.0,), "integer"),
                         ("5", "list of token ids"), ((5, 3, 5), "token 5 twice")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            LoRAConfig(tokens=bad)


# ---------------------------------------------------------------------------------------------------- the forward
@TIED
def test_adapted_model_is_the_base_at_the_start(tied):
    original = base_model(tied)
    model = add_lora(copy.deepcopy(original), CONFIG)
    assert isinstance(model.embed_tokens, TokenEmbedding) and isinstance(model.lm_head, TokenHead)
    assert (model.lm_head.tokens is model.embed_tokens.tokens) == tied  # tied: one set of rows for both
    assert {n for n, _ in lora_parameters(model) if "tokens" in n} == (DELTAS - {"lm_head.tokens.delta"} if tied
                                                                        else DELTAS)  # fmt: skip
    assert all(p.abs().sum() == 0 for p in deltas_of(model).values())
    for chunk in (0, 4):
        original.options = model.options = options(chunk)
        assert torch.equal(model(IDS).logits, original(IDS).logits)
        loss = model(IDS, labels=IDS, return_logits=False).loss
        assert torch.equal(loss, original(IDS, labels=IDS, return_logits=False).loss)


@TIED
def test_adapted_model_equals_the_merged_one(tied):
    original = base_model(tied)
    model = adapted(original)
    deltas = {name: p.detach().clone() for name, p in deltas_of(model).items()}
    logits = model(IDS).logits
    losses = []
    for chunk in (4, 0):
        model.options = options(chunk)
        losses.append(model(IDS, labels=IDS, return_logits=False).lm_loss)
    merged = merge_lora(copy.deepcopy(model))
    assert type(merged.embed_tokens) is torch.nn.Embedding and type(merged.lm_head) is torch.nn.Linear
    assert (merged.lm_head.weight is merged.embed_tokens.weight) == tied
    assert not any("tokens.delta" in name or "lora" in name for name in merged.state_dict())
    torch.testing.assert_close(merged(IDS).logits, logits, rtol=1e-12, atol=1e-12)
    for chunk, loss in zip((4, 0), losses):
        merged.options = options(chunk)
        torch.testing.assert_close(merged(IDS, labels=IDS, return_logits=False).lm_loss, loss, rtol=1e-6, atol=0)
    # The chosen rows moved by exactly their deltas, the others not at all.
    for name, expected in formed_weights(original, deltas).items():
        assert torch.equal(merged.get_parameter(name), expected), name
    others = [i for i in range(original.config.vocab_size) if i not in TOKENS]
    assert torch.equal(merged.embed_tokens.weight[others], original.embed_tokens.weight[others])
    assert torch.equal(merged.lm_head.weight[others], original.lm_head.weight[others])


# -------------------------------------------------------------------------------------------------- the gradients
@TIED
def test_delta_gradients_match_finite_differences(tied):
    """The lookup's and the head's gradients w.r.t. delta (and the head's w.r.t. its input), in float64."""
    model = add_lora(base_model(tied), CONFIG)
    embedding, head = model.embed_tokens, model.lm_head
    g = torch.Generator().manual_seed(0)
    delta, head_delta = (torch.randn(3, 64, dtype=torch.float64, generator=g).requires_grad_() for _ in range(2))
    x = torch.randn(2, 5, 64, dtype=torch.float64, generator=g, requires_grad=True)

    def lookup(delta):
        return functional_call(embedding, {"tokens.delta": delta}, (IDS,))

    def logits(x, delta):
        return functional_call(head, {"tokens.delta": delta}, (x,))

    assert torch.autograd.gradcheck(lookup, (delta,))
    assert torch.autograd.gradcheck(logits, (x, head_delta), fast_mode=True)


@TIED
@pytest.mark.parametrize("chunk", [0, 4])
def test_delta_gradients_equal_autograd_through_the_formed_weight(tied, chunk):
    """The loss's gradient w.r.t. delta, through the chunked kernel's rows (chunk 4) or the head's forward (0), vs
    the base with W + delta formed, differentiated by autograd (the plain loss)."""
    original = base_model(tied)
    model = adapted(original, chunk=chunk, lora=False)  # B = 0: the model is the base with the rows changed
    model(IDS, labels=IDS, return_logits=False).loss.backward()
    deltas = {name: p.detach().clone().requires_grad_() for name, p in deltas_of(model).items()}
    original.options = options(0)
    functional_call(original, formed_weights(original, deltas), (IDS,), {"labels": IDS}).loss.backward()
    for name, delta in deltas_of(model).items():
        assert delta.grad.abs().sum() > 0
        torch.testing.assert_close(delta.grad, deltas[name].grad, rtol=1e-5, atol=1e-8, msg=name)


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunked_loss_with_rows_equals_the_plain_loss_of_the_formed_weight(chunk):
    torch.manual_seed(0)
    N, H, V = 23, 16, 50
    x, w = torch.randn(N, H, requires_grad=True), torch.randn(V, H) * 0.3  # w frozen, as a LoRA base's
    ids, delta = torch.tensor([3, 7, 49]), (torch.randn(3, H) * 0.5).requires_grad_()
    labels = torch.randint(0, V, (N,))
    labels[[0, 4, 5]], labels[[1, 2]] = -100, 7  # some ignored; some targets among the trained rows
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = linear_cross_entropy(x, w, labels, chunk_size=chunk, rows=(ids, delta))
    assert all(t.shape != (V, H) for t in saved if t is not None)  # neither W + delta nor a [V, H] gradient
    grads = torch.autograd.grad(loss * 0.5, (x, delta))
    reference = F.cross_entropy(F.linear(x, w.index_add(0, ids, delta)), labels, ignore_index=-100)
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    for got, expected in zip(grads, torch.autograd.grad(reference * 0.5, (x, delta))):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_chunked_loss_with_rows_under_bf16_autocast():
    torch.manual_seed(0)
    x, w = torch.randn(20, 32), torch.randn(40, 32) * 0.2
    ids, delta, labels = torch.tensor([0, 9, 30]), torch.randn(3, 32) * 0.2, torch.randint(0, 40, (20,))
    results = []
    for chunked in (False, True):
        xg, dg = x.clone().requires_grad_(), delta.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if chunked:
                loss = linear_cross_entropy(xg, w, labels, chunk_size=8, rows=(ids, dg))
            else:
                loss = F.cross_entropy(F.linear(xg, w.index_add(0, ids, dg)).float(), labels)
        loss.backward()
        assert loss.dtype == dg.grad.dtype == torch.float32
        results.append((loss.detach(), xg.grad, dg.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


# ------------------------------------------------------------------------------------------------------- training
@TIED
def test_training_moves_only_the_chosen_rows(tied):
    original = base_model(tied)
    model = add_lora(copy.deepcopy(original), CONFIG)
    model.options = options(4)
    trained = ("lora_A", "lora_B", "tokens.delta")
    frozen = {name: t.clone() for name, t in model.state_dict().items() if not name.endswith(trained)}
    optimizer = torch.optim.AdamW([p for _, p in lora_parameters(model)], lr=1e-2)
    for _ in range(3):
        model(IDS, labels=IDS, return_logits=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(model.state_dict()[name], t) for name, t in frozen.items())  # the base is untouched
    assert all(p.abs().sum() > 0 for p in deltas_of(model).values())
    merged = merge_lora(model)
    for site in ("embed_tokens", "lm_head"):
        changed = (merged.get_parameter(f"{site}.weight") != original.get_parameter(f"{site}.weight")).any(dim=1)
        assert changed.nonzero().flatten().tolist() == list(TOKENS), site


def test_a_stored_bfloat16_embedding_gets_float32_rows_and_merges_back():
    """LoRA training holds an untied table in its stored dtype (hold_frozen_base): the rows train in float32 beside
    it, and merging gives the StoredEmbedding back, the rows folded (rounded) into it."""
    model = base_model(tied=False).to(torch.bfloat16)
    hold_frozen_base(model)
    reference = model.embed_tokens(IDS)
    add_lora(model, CONFIG)
    assert model.embed_tokens.tokens.delta.dtype == torch.float32 and model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(model.embed_tokens(IDS), reference)
    with torch.no_grad():
        model.embed_tokens.tokens.delta.fill_(0.25)
    x = model.embed_tokens(IDS)
    merged = merge_lora(model).embed_tokens
    assert isinstance(merged, StoredEmbedding) and merged.weight.dtype == torch.bfloat16
    torch.testing.assert_close(merged(IDS), x, rtol=1e-2, atol=0)


# ---------------------------------------------------------------------------------------------------------- files
@TIED
def test_save_and_load_round_trip(tmp_path, tied):
    original = base_model(tied)
    model = adapted(original)
    save_adapters(model, tmp_path / "adapters")
    described = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
    assert described["lora"]["tokens"] == list(TOKENS)
    assert ("lm_head" in described["sites"]) == (not tied) and described["sites"]["embed_tokens"] == [97, 64]
    tensors = load_file(tmp_path / "adapters" / "adapter.safetensors")
    sites = base_sites(model, CONFIG.targets, CONFIG.tokens)
    assert {n: tuple(t.shape) for n, t in tensors.items()} == adapter_shapes(sites, CONFIG.rank, len(TOKENS))
    loaded = load_adapters(copy.deepcopy(original), tmp_path / "adapters")
    assert lora_config(loaded) == CONFIG
    loaded.options = model.options
    assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_adapters_without_token_rows_are_written_and_read_as_before(tmp_path):
    """No `tokens` in adapter_config.json (as before LoRAConfig had them), no token sites, no rows."""
    original = base_model(tied=True)
    save_adapters(adapted(original, LoRAConfig(rank=2, targets=("q_proj",))), tmp_path / "old")
    described = json.loads((tmp_path / "old" / "adapter_config.json").read_text())
    assert "tokens" not in described["lora"] and "embed_tokens" not in described["sites"]
    loaded = load_adapters(copy.deepcopy(original), tmp_path / "old")
    assert lora_config(loaded).tokens == () and type(loaded.embed_tokens) is torch.nn.Embedding


def test_loading_onto_a_wrong_base_is_a_clear_error(tmp_path):
    save_adapters(adapted(base_model(tied=True)), tmp_path / "tied")
    save_adapters(adapted(base_model(tied=False)), tmp_path / "untied")
    for directory, other, message in (
        ("tied", base_model(tied=True, vocab_size=64), "token id 90 is outside the model's vocabulary of 64 ids"),
        ("tied", base_model(tied=True, vocab_size=128), "embed_tokens has shape [97, 64]; this model's has [128, 64]"),
        ("tied", base_model(tied=False), "this model has lm_head, which the adapters do not adapt"),
        ("untied", base_model(tied=True), "the adapters adapt lm_head, which this model does not have"),
        ("tied", base_model(tied=True, hidden_size=32, head_dim=8), "has shape"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(message)) as error:
            load_adapters(other, tmp_path / directory)
        assert str(error.value).startswith(f"{tmp_path / directory}: ")
        assert not lora_parameters(other) and type(other.embed_tokens) is torch.nn.Embedding  # nothing changed


# ---------------------------------------------------------------------------------------------------- ossgpt sft
@pytest.fixture(scope="module")
def tied_base(tmp_path_factory, tokenizer):  # noqa: F811
    """A tied base model directory, as the demo's (the `tiny` preset)."""
    directory = tmp_path_factory.mktemp("tied") / "model"
    tiny_model(tokenizer, tie_word_embeddings=True).save_pretrained(directory)
    tokenizer.save(directory)
    return directory


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_sft_trains_the_chat_tokens_rows(tmp_path, request, chats, fake_vocab, tokenizer, tied):  # noqa: F811
    directory = request.getfixturevalue("tied_base" if tied else "base")
    run = tmp_path / "run"
    assert main(sft_argv(directory, chats, run, fake_vocab, "--max-steps", "2", "--lora-tokens", "harmony")) == 0
    harmony_ids = sorted(tokenizer.special_tokens[t] for t in SPECIAL_TOKENS)
    checkpoint = run / "checkpoint"
    assert json.loads((checkpoint / "adapter_config.json").read_text())["lora"]["tokens"] == harmony_ids
    tensors = load_file(checkpoint / "adapter.safetensors")
    assert {n for n in tensors if "tokens" in n} == ({"embed_tokens.tokens.delta"} if tied else DELTAS)
    assert all(tensors[n].shape == (7, 32) and tensors[n].abs().sum() > 0 for n in tensors if "tokens" in n)
    rows = "the embedding rows of 7 tokens" + ("" if tied else " and their LM head rows")
    assert rows in (run / "train.log").read_text()
    # Stopped after a step and resumed: the same rows (their optimizer state was saved and restored).
    resumed = sft_argv(directory, chats, tmp_path / "resumed", fake_vocab, "--max-steps", "1")
    assert main(resumed) == 0 and main([*resumed, "--max-steps", "2", "--resume"]) == 0
    again = load_file(tmp_path / "resumed" / "checkpoint" / "adapter.safetensors")
    assert all(torch.equal(again[n], tensors[n]) for n in tensors if "tokens" in n)
    # What chat, generate and eval load: the base with the rows folded in; only the chat tokens' rows differ (the
    # input rows of the tokens never read, as <|return|>, which ends every conversation, stay as they were).
    base_weights, merged = from_pretrained(directory), load_model(run, quantization="none")
    for site in ("embed_tokens", "lm_head"):
        changed = (merged.get_parameter(f"{site}.weight") != base_weights.get_parameter(f"{site}.weight")).any(dim=1)
        changed = set(changed.nonzero().flatten().tolist())
        if site == "lm_head":  # every chat token's logit has a gradient
            assert changed == set(harmony_ids)
        else:
            assert changed and changed <= set(harmony_ids)
    with torch.no_grad():
        ids = torch.tensor([harmony_ids + [1, 2, 3]])
        expected = load_adapted(checkpoint)(ids).logits
        assert (merged(ids).logits - expected).abs().max() < 1e-5 * expected.abs().max()


def test_sft_lora_tokens_flag(tmp_path, base, chats, fake_vocab, capsys, tokenizer):  # noqa: F811
    out = tmp_path / "run"
    for value, message in (("chat", "expected harmony, none or token ids"), ("5,,6", "expected harmony"),
                           ("-1", "non-negative"), ("5,5", "token 5 twice"),
                           ("3,320", "token id 320 is outside")):  # fmt: skip
        fails(sft_argv(base, chats, out, fake_vocab, "--lora-tokens", value), capsys, "--lora-tokens", message)
    assert not out.exists()
    assert main(sft_argv(base, chats, out, fake_vocab, "--max-steps", "1", "--lora-tokens", "3,300")) == 0
    assert json.loads((out / "checkpoint" / "adapter_config.json").read_text())["lora"]["tokens"] == [3, 300]
    assert "the embedding rows of 2 tokens" in (out / "train.log").read_text()
    fails(sft_argv(base, chats, out, fake_vocab, "--max-steps", "2", "--resume", "--lora-tokens", "harmony"), capsys,
          "was trained with --lora-tokens '3,300'")  # fmt: skip
    both = tmp_path / "both"
    assert main(sft_argv(base, chats, both, fake_vocab, "--max-steps", "1", "--lora-tokens", "300,harmony")) == 0
    harmony_ids = [tokenizer.special_tokens[t] for t in SPECIAL_TOKENS]
    assert json.loads((both / "checkpoint" / "adapter_config.json").read_text())["lora"]["tokens"] == sorted(
        [*harmony_ids, 300]
    )
    fails(sft_argv(base, chats, out, fake_vocab, "--lora-tokens", f"harmony,{harmony_ids[0]}"), capsys,
          "--lora-tokens", f"token {harmony_ids[0]} twice")  # fmt: skip


def test_sft_without_token_rows_and_a_run_from_before_them(tmp_path, base, chats, fake_vocab, capsys):  # noqa: F811
    """--lora-tokens none trains the adapters alone; a run saved before the flag existed resumes as `none`."""
    out = tmp_path / "run"
    assert main(sft_argv(base, chats, out, fake_vocab, "--max-steps", "1", "--lora-tokens", "none")) == 0
    assert not any("tokens" in name for name in load_file(out / "checkpoint" / "adapter.safetensors"))
    assert "embedding rows" not in (out / "train.log").read_text()
    state_file = out / "checkpoint" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["train_config"]["lora_tokens"]
    state_file.write_text(json.dumps(state))
    fails(sft_argv(base, chats, out, fake_vocab, "--max-steps", "2", "--resume"), capsys,
          "was trained with --lora-tokens 'none'")  # fmt: skip
    assert main(sft_argv(base, chats, out, fake_vocab, "--max-steps", "2", "--resume", "--lora-tokens", "none")) == 0
