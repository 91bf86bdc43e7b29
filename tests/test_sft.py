"""Supervised fine-tuning: the JSONL data and its errors, labels and packing, LoRA and full runs through the trainer
(frozen base, exact resume), loading a LoRA run, `ossgpt merge` (HF export checked by transformers, MXFP4), and
every bad input of `ossgpt sft` and `ossgpt merge`.

The models are tiny, in a compact vocabulary with Harmony's chat tokens built on a small stand-in for o200k_base's
ranks (no download); `ossgpt` runs in-process through `ossgpt.cli.main`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ossgpt import GPTOSSConfig, GPTOSSForCausalLM
from ossgpt.chat.conversation import harmony_messages, render_training
from ossgpt.chat.harmony import Harmony
from ossgpt.checkpoint import from_pretrained, save_pretrained
from ossgpt.checkpoint.adapted import load_adapted
from ossgpt.cli import main
from ossgpt.errors import UserError
from ossgpt.inference.loading import load_model
from ossgpt.kernels.loss import IGNORE_INDEX
from ossgpt.kernels.mxfp4 import dequantize_experts
from ossgpt.lora import LoRAConfig, add_lora, lora_parameters
from ossgpt.lora.experts import LoRAExperts
from ossgpt.model.model import next_token_loss
from ossgpt.quant.mxfp4 import pack_experts
from ossgpt.tokenizer import CompactTokenizer, HarmonyTokenizer
from ossgpt.training import distributed
from ossgpt.training import sft_data as sft_data_module
from ossgpt.training.sft import SFTConfig, SFTTrainer, hold_frozen_base
from ossgpt.training.sft_data import (
    Example,
    SFTBatches,
    assemble,
    fit_examples,
    pack,
    read_examples,
    sft_validation_batches,
    split_examples,
)

pytestmark = pytest.mark.usefixtures("one_thread")

SEQ_LEN = 384  # a conversation here is ~270 tokens (the system message, byte by byte, is most of it)
IDS = torch.randint(0, 268, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def tokenizer(fake_vocab):
    """A compact vocabulary: 256 bytes, <|endoftext|>, 4 kept tokens, Harmony's 7 chat tokens (268 ids)."""
    return CompactTokenizer(HarmonyTokenizer("o200k_harmony", vocab_file=fake_vocab), [256, 257, 258, 259])


@pytest.fixture(scope="module")
def harmony(tokenizer):
    return Harmony(tokenizer)


def tiny_model(vocabulary, seed: int = 0, **overrides) -> GPTOSSForCausalLM:
    """A random model in the tokenizer `vocabulary`'s ids, biases and sinks not zero (they would hide mapping
    mistakes)."""
    torch.manual_seed(seed)
    values = dict(vocab_size=320, tokenizer=vocabulary.spec, eos_token_id=vocabulary.special_tokens["<|return|>"],
                  hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                  num_local_experts=4, num_experts_per_tok=2, intermediate_size=32, max_position_embeddings=1024,
                  sliding_window=8, tie_word_embeddings=False)  # fmt: skip
    model = GPTOSSForCausalLM(GPTOSSConfig(**{**values, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "sinks" in name:
                p.normal_(0, 0.5 if "sinks" in name else 0.02)
    return model


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer):
    """A base model directory (ossgpt format) with its tokenizer.json."""
    directory = tmp_path_factory.mktemp("base") / "model"
    tiny_model(tokenizer).save_pretrained(directory)
    tokenizer.save(directory)
    return directory


def conversation(a: int, b: int) -> dict:
    return {"messages": [{"role": "user", "content": f"{a}+{b}?"},
                         {"role": "assistant", "thinking": f"{a} plus {b}", "content": str(a + b)}]}  # fmt: skip


def write_jsonl(path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    rng = np.random.default_rng(0)
    records = [conversation(*rng.integers(0, 10, 2).tolist()) for _ in range(24)]
    return write_jsonl(tmp_path_factory.mktemp("data") / "chats.jsonl", records)


def sft_argv(base, chats, out, fake_vocab, *flags) -> list[str]:
    return ["sft", "--checkpoint", str(base), "--data", str(chats), "--out", str(out), "--vocab-file", str(fake_vocab),
            "--device", "cpu", "--seq-len", str(SEQ_LEN), "--batch-size", "2", "--max-steps", "4", "--eval-every", "2",
            "--save-every", "2", "--log-every", "1", "--warmup-steps", "1", "--learning-rate", "1e-2",
            *flags]  # fmt: skip


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, base, chats, fake_vocab):
    """A LoRA run on every target (router included), 4 steps."""
    run = tmp_path_factory.mktemp("runs") / "lora"
    targets = "q_proj,k_proj,v_proj,o_proj,gate_up_proj,down_proj,router"
    assert main(sft_argv(base, chats, run, fake_vocab, "--lora-targets", targets)) == 0
    return run


def fails(argv, capsys, *expected: str) -> str:
    """Run `ossgpt argv`: it must exit with status 2 and one line 'error: ...' holding every `expected` text."""
    capsys.readouterr()  # what came before
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for text in expected:
        assert text in err, err
    return err


def metrics(run) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]


# ------------------------------------------------------------------------------------------------------------ data
@pytest.mark.parametrize(
    "line, message",
    [
        ('{"messages": [', "not valid JSON (Expecting value, column 15)"),
        ("[1, 2]", "a record must be a JSON object"),
        ('{"messages": [{"role": "robot", "content": "hi"}]}', "messages[0].role must be one of"),
        ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}', "messages[1].content is missing"),
        ('{"messages": [{"role": "user", "content": "hi"}], "extra": 1}', "unknown field 'extra'"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "nothing to train on"),
    ],
)
def test_a_bad_line_is_named_by_file_and_line(tmp_path, harmony, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [conversation(1, 2), "", line, conversation(3, 4)])
    with pytest.raises(UserError, match=re.escape(f"{path}, line 3: ") + ".*" + re.escape(message)):
        read_examples(path, harmony)


def test_file_errors(tmp_path, harmony):
    with pytest.raises(UserError, match="does not exist"):
        read_examples(tmp_path / "missing.jsonl", harmony)
    with pytest.raises(UserError, match="is a folder"):
        read_examples(tmp_path, harmony)
    with pytest.raises(UserError, match="holds no conversations"):
        read_examples(write_jsonl(tmp_path / "blank.jsonl", ["", "  "]), harmony)
    (tmp_path / "latin1.jsonl").write_bytes(json.dumps(conversation(1, 2)).encode() + b"\n\xe9\n")
    with pytest.raises(UserError, match=r"latin1.jsonl, line 2: not UTF-8 text \(byte 1\)"):
        read_examples(tmp_path / "latin1.jsonl", harmony)


def test_labels_are_the_assistant_tokens_the_renderer_supervises(tmp_path, harmony):
    record = conversation(2, 3)
    (example,) = read_examples(write_jsonl(tmp_path / "one.jsonl", [record]), harmony)
    tokens, mask = render_training(harmony, harmony_messages(record["messages"]))
    assert example.tokens.tolist() == tokens
    assert example.labels.tolist() == [t if m else IGNORE_INDEX for t, m in zip(tokens, mask)]
    # By hand: what the model must write after the prompt's `<|start|>assistant`, and nothing else.
    supervised = harmony.decode([t for t in example.labels.tolist() if t != IGNORE_INDEX])
    assert supervised == (
        "<|channel|>analysis<|message|>2 plus 3<|end|><|start|>assistant<|channel|>final<|message|>5<|return|>"
    )
    assert example.targets == len(harmony.tokenizer.encode(supervised, allowed_special="all"))


def test_packing_by_hand():
    # Lengths 5, 3, 4, 2 into windows of 8, in the order 0 1 2 3: [0, 1] (8 tokens), then [2, 3] (6).
    assert pack(np.array([5, 3, 4, 2]), np.arange(4), 8) == [[0, 1], [2, 3]]
    assert pack(np.array([5, 3, 4, 2]), np.array([2, 0, 3, 1]), 8) == [[2], [0, 3], [1]]
    examples = [
        Example(1, np.array([10, 11, 12]), np.array([-100, 11, 12])),
        Example(2, np.array([20, 21]), np.array([-100, 21])),
    ]
    input_ids, labels = assemble(examples, [[1, 0], []], seq_len=6, pad_id=0)
    assert input_ids.tolist() == [[20, 21, 10, 11, 12, 0], [0, 0, 0, 0, 0, 0]]
    assert labels.tolist() == [[-100, 21, -100, 11, 12, -100], [-100] * 6]


def test_too_long_conversations_are_skipped_and_counted():
    examples = [Example(i + 1, np.arange(n), np.where(np.arange(n) > 0, 1, -100)) for i, n in enumerate([4, 9, 6, 12])]
    kept, notes = fit_examples(examples, 8, "training")
    assert [e.line for e in kept] == [1, 3]
    assert notes == ["skipped 2 of 4 training conversations longer than --seq-len 8 tokens (the longest: 12 tokens, "
                     "line 4); raise --seq-len to train on them"]  # fmt: skip
    with pytest.raises(UserError, match="no held-out conversation is left"):
        fit_examples(examples[1::2], 8, "held-out")


def test_held_out_split_is_spread_and_seed_free(harmony, chats):
    examples = read_examples(chats, harmony)
    train, held = split_examples(examples, 0.125)  # 3 of 24
    assert [e.line for e in held] == [1, 13, 24] and len(train) == 21
    with pytest.raises(UserError, match="cannot be split"):
        split_examples(examples[:1], 0.5)


def test_batches_are_whole_conversations_deterministic_and_split_over_processes(harmony, chats):
    examples = read_examples(chats, harmony)
    seq_len = 2 * SEQ_LEN  # two conversations to a window
    batches = SFTBatches(examples, batch_size=4, seq_len=seq_len, seed=1, pad_id=0, grad_accum_steps=2)
    # Every conversation appears whole, exactly once per epoch, with its own labels.
    epoch = batches.epoch_windows(0)
    assert sorted(i for w in epoch for i in w) == list(range(len(examples)))
    assert all(sum(len(examples[i].tokens) for i in w) <= seq_len for w in epoch)
    assert max(len(w) for w in epoch) == 2
    input_ids, labels, _ = batches.batch(0, 0)
    first = batches.windows(0, 1)[0]
    row = np.concatenate([examples[i].tokens for i in first])
    assert input_ids[0, : len(row)].tolist() == row.tolist() and (labels[0, len(row) :] == IGNORE_INDEX).all()
    # A pure function of (seed, step, micro-step): the same from a fresh object, another with another seed.
    again = SFTBatches(examples, 4, seq_len, seed=1, pad_id=0, grad_accum_steps=2).batch(5, 1)
    assert all(torch.equal(a, b) for a, b in zip(batches.batch(5, 1)[:2], again[:2]))
    other = SFTBatches(examples, 4, seq_len, seed=2, pad_id=0, grad_accum_steps=2).batch(5, 1)
    assert not torch.equal(again[0], other[0])
    # Two processes see the rows of one; the weights are each micro-batch's share of the step's targets.
    halves = [SFTBatches(examples, 4, seq_len, 1, 0, 2, rank, 2).batch(5, 1) for rank in range(2)]
    whole = batches.batch(5, 1)
    assert torch.equal(torch.stack([h[0] for h in halves], 1).flatten(0, 1), whole[0])
    weights = [SFTBatches(examples, 4, seq_len, 1, 0, 2, rank, 2).batch(5, m)[2] for m in range(2) for rank in range(2)]
    assert sum(weights) == pytest.approx(2 * 2)  # grad_accum_steps * world_size
    targets = [int((h[1][:, 1:] != IGNORE_INDEX).sum()) for h in halves]
    assert halves[0][2] / halves[1][2] == pytest.approx(targets[0] / targets[1])


def test_weighted_micro_batches_give_the_mean_over_the_steps_targets(harmony, chats, tokenizer):
    """What the trainer backpropagates, sum over micro-steps of weight * mean loss / accum, is the loss of all the
    step's targets taken together (not the mean of the micro-batches' means)."""
    model = tiny_model(tokenizer)
    batches = SFTBatches(read_examples(chats, harmony), 2, SEQ_LEN, seed=0, pad_id=0, grad_accum_steps=3)
    parts = [batches.batch(4, m) for m in range(3)]
    with torch.no_grad():
        weighted = sum(w * model(ids, labels=labels).lm_loss for ids, labels, w in parts) / 3
        logits = torch.cat([model(ids).logits for ids, _, _ in parts])
        together = next_token_loss(logits, torch.cat([labels for _, labels, _ in parts]))
    assert len({w for _, _, w in parts}) > 1  # the micro-batches do differ in targets
    assert weighted.item() == pytest.approx(together.item(), rel=1e-5)


def test_validation_is_the_mean_over_every_held_out_target(harmony, chats, tokenizer):
    """Two processes, 3 windows in batches of 2: the last batch is filled with an empty window (weight 0 on the
    process that gets it); the weighted batches average to the loss of all held-out targets together."""
    model = tiny_model(tokenizer)
    held = read_examples(chats, harmony)[:3]  # conversations of ~260 tokens: one per window of 384
    parts = [sft_validation_batches(held, 2, SEQ_LEN, 10, 0, rank, 2) for rank in range(2)]
    (batches0, windows), (batches1, _) = parts
    assert windows == 3 and len(batches0) == len(batches1) == 2
    assert batches1[1][2] == 0 and (batches1[1][1] == IGNORE_INDEX).all()  # the filler
    with torch.no_grad():
        total = sum(w * model(ids, labels=labels).lm_loss for ids, labels, w in batches0 + batches1 if w)
        ids = torch.cat([b[0] for b in batches0 + batches1])
        together = next_token_loss(model(ids).logits, torch.cat([b[1] for b in batches0 + batches1]))
    assert (total / (2 * 2)).item() == pytest.approx(together.item(), rel=1e-5)


# ------------------------------------------------------------------------------------------------------ training
def test_lora_trains_only_the_adapters_and_leaves_the_base_unchanged(tmp_path, base, chats, fake_vocab):
    config = SFTConfig.create(checkpoint=str(base), data=chats, out=str(tmp_path / "run"), vocab_file=str(fake_vocab),
                              device="cpu", seq_len=SEQ_LEN, batch_size=2, max_steps=3, eval_every=3, save_every=3,
                              warmup_steps=1, learning_rate=1e-2)  # fmt: skip
    trainer = SFTTrainer(config, distributed.setup("none", "cpu"))
    try:
        trainer.run()
    finally:
        trainer.logger.close()
    adapters = dict(lora_parameters(trainer.model))
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in adapters.values()}
    assert all(p.abs().sum() > 0 for name, p in adapters.items() if name.endswith("lora_B"))  # they moved from 0
    original = from_pretrained(base).state_dict()
    state = trainer.model.state_dict()
    assert set(original) == set(state) - set(adapters)
    assert all(torch.equal(state[name], tensor) and not trainer.model.get_parameter(name).requires_grad
               for name, tensor in original.items())  # fmt: skip
    # The checkpoint: adapters, the base's reference and tokenizer, the adapters' optimizer state; no weights.
    checkpoint = tmp_path / "run" / "checkpoint"
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "adapter.safetensors", "adapter_config.json", "base.json", "optimizer.safetensors", "tokenizer.json",
        "trainer_state.json",
    ]  # fmt: skip
    assert json.loads((checkpoint / "base.json").read_text()) == {"base": str(base.resolve())}
    assert {name.rsplit(".", 1)[0] for name in load_file(checkpoint / "optimizer.safetensors")} == set(adapters)
    log = (tmp_path / "run" / "train.log").read_text()
    assert "23 training conversations" in log and "1 held out" in log and "LoRA fine-tuning of" in log


def test_resumed_lora_run_equals_an_uninterrupted_one(tmp_path, base, chats, fake_vocab, monkeypatch):
    flags = ["--grad-accum-steps", "2", "--lora-targets", "q_proj,gate_up_proj,router"]
    assert main(sft_argv(base, chats, tmp_path / "straight", fake_vocab, *flags)) == 0
    batch = SFTBatches.batch

    def batch_or_stop(self, step, micro_step):
        if step == 2:
            raise KeyboardInterrupt
        return batch(self, step, micro_step)

    with monkeypatch.context() as patch:
        patch.setattr(sft_data_module.SFTBatches, "batch", batch_or_stop)
        assert main(sft_argv(base, chats, tmp_path / "resumed", fake_vocab, *flags)) == 130  # after the step-2 save
    torch.manual_seed(12345)  # as a new process would: the checkpoint restores the RNG states
    assert main(sft_argv(base, chats, tmp_path / "resumed", fake_vocab, *flags, "--resume")) == 0
    timing = {"tokens_per_sec", "elapsed_s"}
    (straight, straight_evals), (resumed, resumed_evals) = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(straight, resumed):
        assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}
    assert straight_evals == resumed_evals
    for name in ("adapter.safetensors", "optimizer.safetensors"):
        a, b = (load_file(tmp_path / run / "checkpoint" / name) for run in ("straight", "resumed"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_full_fine_tuning_writes_a_whole_model(tmp_path, base, chats, fake_vocab, capsys):
    run = tmp_path / "full"
    assert main(sft_argv(base, chats, run, fake_vocab, "--full", "--max-steps", "2")) == 0
    tuned, original = from_pretrained(run / "checkpoint"), from_pretrained(base)
    assert not torch.equal(tuned.layers[0].self_attn.q_proj.weight, original.layers[0].self_attn.q_proj.weight)
    assert (run / "checkpoint" / "tokenizer.json").is_file()
    fails(["merge", "--checkpoint", run, "--out", tmp_path / "merged"], capsys, "nothing to merge", "ossgpt convert")
    fails(sft_argv(base, chats, run, fake_vocab, "--max-steps", "2", "--resume"), capsys,
          "was trained with --full True")  # fmt: skip


def test_a_lora_run_loads_as_base_plus_adapters(lora_run, base, tokenizer):
    adapted = load_adapted(lora_run / "checkpoint")
    assert isinstance(adapted.layers[0].mlp.experts, LoRAExperts)
    merged = load_model(lora_run, quantization="none")  # what chat and generate load: the adapters folded in
    assert not any("lora" in name for name in merged.state_dict())
    with torch.no_grad():
        expected = adapted(IDS).logits
        assert (merged(IDS).logits - expected).abs().max() < 1e-5 * expected.abs().max()
        assert not torch.allclose(from_pretrained(base)(IDS).logits, expected)  # the adapters do change it


# ---------------------------------------------------------------------------------------------------------- merge
def test_merge_exports_hf_that_transformers_runs_as_the_adapted_model(lora_run, tmp_path, capsys):
    transformers = pytest.importorskip("transformers", reason="transformers (the export oracle) is not installed")
    assert main(["merge", "--checkpoint", str(lora_run), "--out", str(tmp_path / "hf"), "--format", "hf"]) == 0
    assert "LoRA rank 8, alpha 16, on q_proj, k_proj, v_proj, o_proj, gate_up_proj, down_proj, router" in (
        capsys.readouterr().out
    )
    hf = transformers.GptOssForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    adapted = load_adapted(lora_run / "checkpoint")
    with torch.no_grad():
        expected = adapted(IDS).logits
        assert ((hf(IDS).logits - expected).abs().max() / expected.abs().max()).item() < 1e-5
    assert (tmp_path / "hf" / "tokenizer.json").is_file()


def test_merge_to_mxfp4_reports_the_rounding_it_adds(lora_run, tmp_path, capsys):
    out = tmp_path / "packed"
    assert main(["merge", "--checkpoint", str(lora_run), "--out", str(out), "--format", "hf", "--mxfp4"]) == 0
    printed = capsys.readouterr().out
    percent = float(re.search(r"moved the experts' weights by ([0-9.]+)% \(RMS\)", printed)[1])
    assert re.search(r"[0-9.]+ times the size of the fine-tuning's update at worst", printed)
    # Independently: the merged dense experts against what the file holds, dequantized.
    dense = load_adapted(lora_run / "checkpoint")
    rounding = total = 0.0
    packed = load_file(out / "model.safetensors")
    for i, layer in enumerate(dense.layers):
        merged = layer.mlp.experts.merged(dense.config)
        for name in ("gate_up_proj", "down_proj"):
            prefix = f"model.layers.{i}.mlp.experts.{name}"
            rounded = dequantize_experts(packed[prefix + "_blocks"], packed[prefix + "_scales"])
            rounding += (rounded - getattr(merged, name)).square().sum().item()
            total += getattr(merged, name).square().sum().item()
    assert 0 < percent == pytest.approx(100 * math.sqrt(rounding / total), abs=0.006)
    assert from_pretrained(out, keep_mxfp4=True).layers[0].mlp.experts.gate_up_proj_blocks.dtype == torch.uint8


def test_lora_on_a_packed_base_keeps_its_experts_packed(tmp_path, tokenizer, fake_vocab, chats, capsys):
    """A base in the published MXFP4 layout (o200k_harmony's 201,088 ids): its experts stay packed while the expert
    adapters train, and the run loads, merges and re-packs."""
    model = tiny_model(tokenizer, vocab_size=201_088, tokenizer="o200k_harmony", eos_token_id=200_002)
    for layer in model.layers:
        layer.mlp.experts = pack_experts(layer.mlp.experts, model.config)
    save_pretrained(model, tmp_path / "packed-base", format="hf")
    run = tmp_path / "run"
    argv = sft_argv(tmp_path / "packed-base", chats, run, fake_vocab, "--batch-size", "1", "--max-steps", "2",
                    "--loss-chunk-size", "64", "--lora-targets", "gate_up_proj,down_proj")  # fmt: skip
    assert main(argv) == 0
    adapted = load_adapted(run / "checkpoint", keep_mxfp4=True)
    experts = adapted.layers[1].mlp.experts
    assert experts.packed and experts.gate_up_proj_lora_B.abs().sum() > 0
    assert torch.equal(experts.gate_up_proj_blocks, model.layers[1].mlp.experts.gate_up_proj_blocks)
    assert main(["merge", "--checkpoint", str(run), "--out", str(tmp_path / "repacked"), "--format", "hf",
                 "--mxfp4"]) == 0  # fmt: skip
    assert "times the size of the fine-tuning's update" in capsys.readouterr().out


def test_a_base_held_for_bfloat16_autocast_keeps_its_stored_matrices_and_trains_the_same(tokenizer):
    """hold_frozen_base(matrices=bfloat16), as `ossgpt sft` holds a bfloat16 base when it computes in bfloat16: the
    linear layers' weights stay bfloat16 as stored (half the memory), and under bfloat16 autocast the loss and the
    adapters' gradients are exactly those of the base held in float32, whose weights autocast rounds to the same
    bfloat16 values for every product."""
    narrow = tiny_model(tokenizer).to(torch.bfloat16)
    wide = copy.deepcopy(narrow)
    hold_frozen_base(narrow, matrices=torch.bfloat16)
    hold_frozen_base(wide)
    linear = {name for name, mod in narrow.named_modules() if type(mod) is torch.nn.Linear and name != "lm_head"}
    assert linear and all(narrow.get_submodule(name).weight.dtype == torch.bfloat16 for name in linear)
    assert all(wide.get_submodule(name).weight.dtype == torch.float32 for name in linear)
    rest = [p for name, p in narrow.named_parameters()
            if name.rsplit(".", 1)[0] not in linear and not name.startswith(("embed_tokens.", "lm_head."))]  # fmt: skip
    assert rest and all(p.dtype == torch.float32 for p in rest)
    results = []
    for model in (narrow, wide):
        add_lora(model, LoRAConfig(rank=2))
        with torch.no_grad():
            for _, param in lora_parameters(model):
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(3)) * 0.1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model.train()(IDS, labels=IDS, return_logits=False).loss
        loss.backward()
        results.append((loss.detach(), [param.grad for _, param in lora_parameters(model)]))
    (loss, grads), (wide_loss, wide_grads) = results
    assert torch.equal(loss, wide_loss)
    assert all(torch.equal(grad, wide_grad) for grad, wide_grad in zip(grads, wide_grads, strict=True))


@pytest.mark.parametrize("tokens", [(3, 300), ()], ids=["token rows", "no token rows"])
def test_a_held_base_keeps_its_table_and_head_narrow_and_trains_as_in_float32(tokenizer, tokens):
    """hold_frozen_base on a bfloat16 base with an untied head: the embedding table and the LM head stay bfloat16,
    every other weight becomes float32, no logits buffer is kept between steps; the adapted model's loss, gradients
    (adapters and token rows) and logits are those of the same base wholly in float32."""
    narrow = tiny_model(tokenizer).to(torch.bfloat16)
    wide = copy.deepcopy(narrow).float()
    hold_frozen_base(narrow)
    config = LoRAConfig(rank=2, tokens=tokens)
    results = []
    for model in (narrow, wide):
        add_lora(model, config)
        with torch.no_grad():
            for _, param in lora_parameters(model):  # B and the rows start at zero: make every gradient flow
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(3)) * 0.1)
        loss = model.train()(IDS, labels=IDS, return_logits=False).loss
        loss.backward()
        with torch.no_grad():
            logits = model.eval()(IDS).logits
        results.append((loss.detach(), logits, [param.grad for _, param in lora_parameters(model)]))
    assert narrow.embed_tokens.weight.dtype == narrow.lm_head.weight.dtype == torch.bfloat16
    narrow_weights = ("embed_tokens.weight", "lm_head.weight")
    assert all(p.dtype == torch.float32 for name, p in narrow.named_parameters() if name not in narrow_weights)
    assert narrow.loss_workspace is None
    (loss, logits, grads), (wide_loss, wide_logits, wide_grads) = results
    torch.testing.assert_close(loss, wide_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(logits, wide_logits, rtol=1e-6, atol=1e-6)
    for grad, wide_grad in zip(grads, wide_grads, strict=True):
        torch.testing.assert_close(grad, wide_grad, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------------ bad input
def test_show_marks_the_supervised_tokens(base, chats, fake_vocab, capsys):
    assert main(["sft", "--show", chats, "--checkpoint", str(base), "--vocab-file", str(fake_vocab)]) == 0
    out = capsys.readouterr().out
    assert out.count("--- ") == 24 and re.search(r"--- .*chats.jsonl, line 1: \d+ tokens, \d+ supervised\n", out)
    assert "<|start|>user<|message|>" in out and "[[<|channel|>analysis<|message|>" in out


def test_sft_bad_input(tmp_path, base, chats, fake_vocab, capsys, tokenizer, lora_run):
    out = tmp_path / "run"
    fails(["sft", "--data", chats], capsys, "--checkpoint, --out required")
    fails(["sft", "--show", chats], capsys, "--show needs --checkpoint")
    fails(sft_argv(base, chats, out, fake_vocab, "--lora-rank", "0"), capsys, "--lora-rank", "positive integer")
    fails(sft_argv(base, chats, out, fake_vocab, "--lora-targets", "q_proj,mlp"), capsys, "--lora-targets",
          "unknown LoRA target 'mlp'")  # fmt: skip
    fails(sft_argv(base, chats, out, fake_vocab, "--lora-alpha", "-1"), capsys, "--lora-alpha")
    fails(sft_argv(base, chats, out, fake_vocab, "--val-fraction", "0"), capsys, "--val-fraction must be in (0, 1)")
    fails(sft_argv(base, chats, out, fake_vocab, "--seq-len", "4096"), capsys, "exceeds", "context of 1024")
    fails(sft_argv(base, chats, out, fake_vocab, "--seq-len", "64"), capsys, "no training conversation is left",
          "longer than --seq-len 64")  # fmt: skip
    fails(sft_argv(base, tmp_path / "none.jsonl", out, fake_vocab), capsys, "none.jsonl does not exist")
    bad = write_jsonl(tmp_path / "bad.jsonl", [conversation(1, 1), '{"messages": []}'])
    fails(sft_argv(base, bad, out, fake_vocab), capsys, f"{bad}, line 2: messages must be a non-empty list")
    fails(sft_argv(base, chats, out, fake_vocab, "--val-data", bad), capsys, f"{bad}, line 2")
    fails(sft_argv(tmp_path / "nowhere", chats, out, fake_vocab), capsys, "does not exist")
    fails(sft_argv(lora_run, chats, out, fake_vocab), capsys, "holds LoRA adapters, not a whole model")
    plain = tmp_path / "bytes-model"
    tiny_model(tokenizer, tokenizer="bytes", vocab_size=320, eos_token_id=256).save_pretrained(plain)
    fails(sft_argv(plain, chats, out, fake_vocab), capsys, "lacks Harmony's special tokens")
    assert not out.exists()  # nothing was written by any of them


def test_resuming_with_other_lora_settings_is_refused(tmp_path, base, chats, fake_vocab, capsys):
    run = tmp_path / "run"
    assert main(sft_argv(base, chats, run, fake_vocab, "--max-steps", "2")) == 0
    fails(sft_argv(base, chats, run, fake_vocab, "--max-steps", "2", "--resume", "--lora-rank", "4"), capsys,
          "was trained with --lora-rank 8")  # fmt: skip
    fails(sft_argv(base, chats, run, fake_vocab, "--max-steps", "2"), capsys, "already holds a run")


def test_merge_bad_input(lora_run, tmp_path, tokenizer, capsys):
    fails(["merge", "--checkpoint", lora_run, "--out", tmp_path / "m", "--mxfp4"], capsys, "--mxfp4", "--format hf")
    (tmp_path / "taken").mkdir()
    fails(["merge", "--checkpoint", lora_run, "--out", tmp_path / "taken"], capsys, "already exists", "--force")
    fails(["merge", "--checkpoint", tmp_path / "nowhere", "--out", tmp_path / "m"], capsys, "does not exist")
    # Adapters onto a base of another shape: refused, the differing weight named.
    other = tmp_path / "other-base"
    tiny_model(tokenizer, hidden_size=64).save_pretrained(other)
    fails(["merge", "--checkpoint", lora_run, "--out", tmp_path / "m", "--base", other], capsys,
          "layers.0.self_attn.q_proj has shape", "do not fit the base model")  # fmt: skip
    assert not (tmp_path / "m").exists()


def test_a_moved_base_is_a_clear_error(lora_run, tmp_path, capsys):
    moved = tmp_path / "run"
    (moved / "checkpoint").mkdir(parents=True)
    for path in (lora_run / "checkpoint").iterdir():
        (moved / "checkpoint" / path.name).write_bytes(path.read_bytes())
    (moved / "checkpoint" / "base.json").write_text(json.dumps({"base": str(tmp_path / "gone")}))
    fails(["merge", "--checkpoint", moved, "--out", tmp_path / "m"], capsys, "not there any more", "--base PATH")
    fails(["generate", "--checkpoint", moved, "--prompt", "hi"], capsys, "not there any more")


def test_two_fsdp_processes_match_one(tmp_path, tokenizer, chats, fake_vocab):
    """torchrun, FSDP2: the adapters are sharded with the frozen base, gathered for the checkpoint by rank 0 alone;
    the steps are one process's (no load-balancing loss: it is computed per batch, so it differs between halves)."""
    base = tmp_path / "base"
    tiny_model(tokenizer, router_aux_loss_coef=0.0).save_pretrained(base)
    tokenizer.save(base)
    # float32: the runs must agree to float32 rounding (--dtype auto is bfloat16 on a CPU with native bfloat16 matmuls)
    flags = sft_argv(base, chats, tmp_path / "one", fake_vocab, "--max-steps", "3", "--eval-every", "3",
                     "--grad-accum-steps", "2", "--batch-size", "4", "--dtype", "float32")[1:]  # fmt: skip
    assert main(["sft", *flags]) == 0
    out = flags.index("--out") + 1
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ossgpt",
               "sft", *flags[:out], str(tmp_path / "two"), *flags[out + 1 :], "--distributed", "fsdp"]  # fmt: skip
    result = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (steps, evals), (ref_steps, ref_evals) = metrics(tmp_path / "two"), metrics(tmp_path / "one")
    assert [r["step"] for r in steps] == [1, 2, 3] and len(evals) == 1  # one writer
    for row, ref in zip(steps, ref_steps):
        for key in ("loss", "lm_loss", "grad_norm"):
            assert row[key] == pytest.approx(ref[key], rel=1e-5), key
    assert evals[0]["val_loss"] == pytest.approx(ref_evals[0]["val_loss"], rel=1e-5)
    adapters, ref_adapters = (load_file(tmp_path / run / "checkpoint/adapter.safetensors") for run in ("two", "one"))
    assert adapters.keys() == ref_adapters.keys()
