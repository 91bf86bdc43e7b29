"""A LoRA run is accepted wherever a model is, and exports keep the model's tokenizer.

`ossgpt merge --format hf` and `ossgpt convert` keep a compact vocabulary (its spec in config.json, its token table
in tokenizer.json): `ossgpt generate` and `ossgpt chat` run on the result, and transformers computes what ossgpt
does. A LoRA run loads through GPTOSSForCausalLM.from_pretrained (adapters on, not merged), starts a pretraining
run (`ossgpt train --init-from`: merged) and converts (merged, the very files `ossgpt merge` writes).

The run and its base are test_sft's (tiny, in a compact vocabulary with Harmony's chat tokens); the data folder is
test_training's, in the byte ids every compact vocabulary starts with.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import test_sft
from ossgpt import GPTOSSForCausalLM
from ossgpt.chat.harmony import Harmony
from ossgpt.checkpoint import from_pretrained, load_config
from ossgpt.checkpoint.adapted import load_adapted, load_whole_model
from ossgpt.cli import main
from ossgpt.errors import UserError
from ossgpt.inference.loading import load_model_and_tokenizer
from ossgpt.lora import lora_parameters, merge_lora
from ossgpt.lora.experts import LoRAExperts
from test_chat_cli import chat, script, special
from test_sft import IDS, fails
from test_training import make_data, write_meta

transformers = pytest.importorskip("transformers", reason="transformers (the export oracle) is not installed")

# test_sft's fixtures, which pytest finds here by name: the compact vocabulary, a base in it, chats, a LoRA run.
tokenizer, base, chats, lora_run = test_sft.tokenizer, test_sft.base, test_sft.chats, test_sft.lora_run

pytestmark = pytest.mark.usefixtures("one_thread")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def equal_files(a, b) -> bool:
    """Whether two model folders hold the same config.json, tokenizer.json and tensors."""
    same_text = all((a / name).read_text() == (b / name).read_text() for name in ("config.json", "tokenizer.json"))
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return same_text and x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def merged_hf(lora_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged") / "hf"
    assert main(["merge", "--checkpoint", str(lora_run), "--out", str(out), "--format", "hf"]) == 0
    return out


# --------------------------------------------------------------------------------- (c) exports keep the tokenizer
def test_merged_hf_loads_with_its_compact_tokenizer_and_as_transformers_computes(merged_hf, tokenizer, fake_vocab,
                                                                                  tmp_path):  # fmt: skip
    assert json.loads((merged_hf / "config.json").read_text())["ossgpt_tokenizer"] == tokenizer.spec
    model, loaded = load_model_and_tokenizer(merged_hf, vocab_file=fake_vocab, quantization="none")
    assert loaded.spec == tokenizer.spec and loaded.vocab_size == tokenizer.vocab_size == 268
    text = "<|start|>user<|message|>hello hell<|end|>"
    assert loaded.encode(text, allowed_special="all") == tokenizer.encode(text, allowed_special="all")
    hf = transformers.GptOssForCausalLM.from_pretrained(merged_hf, attn_implementation="eager").eval()
    with torch.no_grad():
        assert relative_error(hf(IDS).logits, model(IDS).logits) < 1e-5
    # A model saved by transformers again (fine-tuned there, say) keeps the spec: transformers writes it back.
    hf.save_pretrained(tmp_path / "resaved")
    shutil.copyfile(merged_hf / "tokenizer.json", tmp_path / "resaved" / "tokenizer.json")
    assert load_config(tmp_path / "resaved").tokenizer == tokenizer.spec


def test_generate_and_chat_run_on_the_merged_hf_model(merged_hf, tokenizer, fake_vocab, monkeypatch, capsys):
    argv = ["generate", "--checkpoint", merged_hf, "--vocab-file", fake_vocab, "--prompt", "hello",
            "--max-new-tokens", "4", "--seed", "0"]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    capsys.readouterr()
    script(monkeypatch, special(Harmony(tokenizer), "<|channel|>final<|message|>hello<|return|>"))
    argv = ["--checkpoint", str(merged_hf), "--vocab-file", str(fake_vocab)]
    code, out, err = chat(monkeypatch, capsys, argv, "hi\n")
    assert code == 0 and out == ">>> hello\n>>> \n", err
    assert "no Harmony chat tokens" not in err  # the compact vocabulary chats in Harmony


def test_convert_keeps_the_tokenizer_through_hf_and_back(base, tokenizer, tmp_path, capsys):
    assert main(["convert", "--from", str(base), "--to", str(tmp_path / "hf"), "--format", "hf"]) == 0
    assert main(["convert", "--from", str(tmp_path / "hf"), "--to", str(tmp_path / "back"), "--format", "ossgpt"]) == 0
    assert load_config(tmp_path / "back") == load_config(base)  # the tokenizer spec included
    assert (tmp_path / "back" / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()


# ------------------------------------------------------------------------- (d) a LoRA run wherever a model goes
def test_from_pretrained_loads_a_lora_run_as_its_base_with_the_adapters_on(lora_run):
    model = GPTOSSForCausalLM.from_pretrained(lora_run)
    assert isinstance(model, GPTOSSForCausalLM) and isinstance(model.layers[0].mlp.experts, LoRAExperts)
    adapters = dict(lora_parameters(model))
    assert {name for name, p in model.named_parameters() if p.requires_grad} == set(adapters)  # as PEFT's
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, load_adapted(lora_run / "checkpoint")(IDS).logits)
        assert torch.equal(GPTOSSForCausalLM.from_pretrained(lora_run / "checkpoint")(IDS).logits, model(IDS).logits)


def test_save_pretrained_refuses_adapters_and_saves_the_merged_model(lora_run, tmp_path):
    model = GPTOSSForCausalLM.from_pretrained(lora_run)
    with pytest.raises(ValueError, match=r"has LoRA adapters: fold them in first \(ossgpt.lora.merge_lora"):
        model.save_pretrained(tmp_path / "adapted")
    assert not (tmp_path / "adapted").exists()
    with torch.no_grad():
        expected = model(IDS).logits
        merge_lora(model).save_pretrained(tmp_path / "merged")
        assert relative_error(GPTOSSForCausalLM.from_pretrained(tmp_path / "merged")(IDS).logits, expected) < 1e-5


def test_from_pretrained_takes_a_run_directory(base, tmp_path):
    shutil.copytree(base, tmp_path / "run" / "checkpoint")
    with torch.no_grad():
        assert torch.equal(GPTOSSForCausalLM.from_pretrained(tmp_path / "run")(IDS).logits,
                           from_pretrained(base)(IDS).logits)  # fmt: skip


def test_train_init_from_a_lora_run_starts_from_the_merged_model(lora_run, base, tokenizer, tmp_path):
    data = make_data(tmp_path / "data")  # byte ids and <|endoftext|>: the first 257 ids of every compact vocabulary
    tokenizer.save(data)
    write_meta(data, tokenizer=tokenizer.spec, vocab_size=tokenizer.vocab_size)
    argv = ["train", "--data", data, "--out", tmp_path / "run", "--init-from", lora_run, "--device", "cpu",
            "--batch-size", "2", "--seq-len", "64", "--eval-batches", "1", "--max-steps", "1", "--learning-rate",
            "1e-12", "--min-lr", "0"]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    trained = load_file(tmp_path / "run" / "checkpoint" / "model.safetensors")
    merged = load_whole_model(lora_run / "checkpoint").state_dict()
    assert trained.keys() == merged.keys() and all((trained[k] - merged[k]).abs().max() < 1e-6 for k in merged)
    assert not torch.equal(merged["layers.0.self_attn.q_proj.weight"],
                           load_file(base / "model.safetensors")["layers.0.self_attn.q_proj.weight"])  # fmt: skip
    assert load_config(tmp_path / "run" / "checkpoint") == load_config(base)


def test_convert_merges_a_lora_run_into_the_files_merge_writes(lora_run, merged_hf, tmp_path, capsys):
    capsys.readouterr()
    assert main(["convert", "--from", str(lora_run), "--to", str(tmp_path / "hf"), "--format", "hf"]) == 0
    assert "LoRA adapters merged into their base" in capsys.readouterr().out
    assert equal_files(tmp_path / "hf", merged_hf)


def test_a_moved_base_is_one_error_line_for_convert_and_train(lora_run, tmp_path, capsys):
    moved = tmp_path / "run" / "checkpoint"
    shutil.copytree(lora_run / "checkpoint", moved)
    (moved / "base.json").write_text(json.dumps({"base": str(tmp_path / "gone")}))
    fails(["convert", "--from", moved.parent, "--to", tmp_path / "out", "--format", "hf"], capsys, "not there any more")
    data = make_data(tmp_path / "data")
    fails(["train", "--data", data, "--out", tmp_path / "t", "--init-from", moved.parent], capsys, "not there any more")
    with pytest.raises(UserError, match="not there any more"):
        GPTOSSForCausalLM.from_pretrained(moved.parent)
