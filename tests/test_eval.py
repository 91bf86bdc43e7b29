"""Evaluation: bits per byte against hand-computed values, windows, expert load, baselines, `ossgpt eval`."""

import bz2
import gzip
import json
import lzma
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ossgpt import GPTOSSConfig, GPTOSSForCausalLM
from ossgpt.checkpoint.run_dir import resolve_checkpoint
from ossgpt.cli import main
from ossgpt.errors import UserError
from ossgpt.eval import (
    compression_bits_per_byte,
    evaluate_text,
    evaluate_tokens,
    tokenize_documents,
    train_token_counts,
    unigram_bits_per_byte,
)
from ossgpt.inference.loading import load_model_and_tokenizer
from ossgpt.tokenizer import ByteTokenizer

TEXT = "Héllo wörld! A short text to score, with a few non-ASCII bytes: 🙂 café."
VOCAB = 260  # the byte tokenizer's 257 ids, plus padding rows as a real checkpoint might have


def tiny_model(max_positions: int = 64) -> GPTOSSForCausalLM:
    torch.manual_seed(0)
    config = GPTOSSConfig(tokenizer="bytes", vocab_size=VOCAB, eos_token_id=256, hidden_size=16, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_local_experts=4,
                          num_experts_per_tok=2, intermediate_size=12, max_position_embeddings=max_positions,
                          sliding_window=8, tie_word_embeddings=False)  # fmt: skip
    return GPTOSSForCausalLM(config).eval()


def uniform_model() -> GPTOSSForCausalLM:
    """A model whose logits are all zero: every next token has probability exactly 1 / VOCAB."""
    model = tiny_model()
    torch.nn.init.zeros_(model.lm_head.weight)
    return model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A training run directory: RUN_DIR/checkpoint (model + tokenizer) and a prepared data folder."""
    root = tmp_path_factory.mktemp("run")
    tiny_model().save_pretrained(root / "checkpoint")
    ByteTokenizer().save(root / "checkpoint")
    data = root / "data"
    data.mkdir()
    train = b"the training text, the end"
    np.frombuffer(train, dtype=np.uint8).astype(np.uint32).tofile(data / "train.bin")
    ByteTokenizer().save(data)
    meta = {"tokenizer": "bytes", "vocab_size": 257, "eot_token_id": 256, "train_tokens": len(train),
            "val_tokens": 0, "val_bytes": 0}  # fmt: skip
    (data / "meta.json").write_text(json.dumps(meta))
    return root


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "heldout.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


# --- metrics ---------------------------------------------------------------------------------------------------
def test_uniform_logits_give_hand_computed_bits_per_byte():
    n_bytes = len(TEXT.encode())  # byte tokenizer: one token per byte
    result = evaluate_text(uniform_model(), ByteTokenizer(), TEXT, seq_len=7, batch_size=3)
    assert result.n_tokens == n_bytes and result.n_bytes == n_bytes
    assert result.loss == pytest.approx(math.log(VOCAB), rel=1e-6)
    assert result.perplexity == pytest.approx(VOCAB, rel=1e-5)
    assert result.bits_per_byte == pytest.approx(n_bytes * math.log(VOCAB) / math.log(2) / n_bytes, rel=1e-6)
    assert result.loss_by_position == pytest.approx([math.log(VOCAB)] * 7, rel=1e-6)


def test_every_token_scored_once_from_a_bos_whatever_the_windows():
    model, tok = tiny_model(max_positions=128), ByteTokenizer()
    ids = tok.encode(TEXT)
    inputs = torch.tensor([[tok.eot_token_id, *ids]])
    nats = F.cross_entropy(model(inputs).logits[0, :-1], inputs[0, 1:], reduction="none").double()

    whole = evaluate_text(model, tok, TEXT, seq_len=len(ids))
    assert whole.total_nats == pytest.approx(nats.sum().item(), rel=1e-6)
    assert whole.loss_by_position == pytest.approx(nats.tolist(), rel=1e-5)
    windows = [evaluate_text(model, tok, TEXT, seq_len=9, batch_size=b) for b in (1, 4)]
    assert windows[0].n_tokens == windows[1].n_tokens == len(ids)
    assert windows[0].total_nats == pytest.approx(windows[1].total_nats, rel=1e-6)
    assert sum(windows[0].position_counts) == len(ids) and len(windows[0].position_counts) == 9


def test_documents_are_separated_by_unscored_eot():
    tok = ByteTokenizer()
    text = tokenize_documents(tok, ["ab", "cde"])
    assert text.tokens.tolist() == [256, 97, 98, 256, 99, 100, 101]
    assert text.text_tokens.tolist() == [97, 98, 99, 100, 101] and text.n_bytes == 5
    result = evaluate_tokens(uniform_model(), text, seq_len=4)
    assert result.n_tokens == 5 and result.loss == pytest.approx(math.log(VOCAB), rel=1e-6)


def test_expert_load_fractions():
    model = tiny_model()
    result = evaluate_text(model, ByteTokenizer(), TEXT, seq_len=16)
    assert len(result.expert_load) == model.config.num_hidden_layers
    for load in result.expert_load:
        # every input token (the BOS and the text but its last token) is routed to k experts
        assert sum(load.counts) == len(TEXT.encode()) * model.config.num_experts_per_tok
        assert sum(load.fractions) == pytest.approx(1.0)
        assert load.cv == pytest.approx(np.std(load.counts) / np.mean(load.counts))
    report = result.to_dict()
    assert [layer["fractions"] for layer in report["expert_load"]] == [e.fractions for e in result.expert_load]


def test_text_too_short_and_bad_windows():
    model, tok = tiny_model(), ByteTokenizer()
    with pytest.raises(UserError, match="at least 2 tokens"):
        evaluate_text(model, tok, "a")
    with pytest.raises(UserError, match="context of 64"):
        evaluate_text(model, tok, TEXT, seq_len=65)
    with pytest.raises(UserError, match="batch size"):
        evaluate_text(model, tok, TEXT, batch_size=0)


# --- baselines -------------------------------------------------------------------------------------------------
def test_compression_baselines_match_the_compressors():
    data = (TEXT * 20).encode()
    expected = {
        "gzip": len(gzip.compress(data, 9)) * 8 / len(data),
        "bzip2": len(bz2.compress(data, 9)) * 8 / len(data),
        "xz": len(lzma.compress(data, preset=9)) * 8 / len(data),
    }
    assert compression_bits_per_byte(data) == pytest.approx(expected)


def test_unigram_add_one_by_hand(tmp_path):
    np.array([0, 0, 1, 2], dtype=np.uint32).tofile(tmp_path / "train.bin")
    counts = train_token_counts(tmp_path / "train.bin", vocab_size=4)
    assert counts.tolist() == [2, 1, 1, 0]
    # p = (count + 1) / (4 tokens + 4 vocab): 3/8, 2/8, 2/8, 1/8; the text is tokens 0 and 3 over 2 bytes
    expected = -(math.log2(3 / 8) + math.log2(1 / 8)) / 2
    assert unigram_bits_per_byte(np.array([0, 3]), 2, counts) == pytest.approx(expected)
    with pytest.raises(UserError, match="another tokenizer"):
        train_token_counts(tmp_path / "train.bin", vocab_size=2)


# --- loading ---------------------------------------------------------------------------------------------------
def test_resolve_checkpoint(run_dir, tmp_path):
    assert resolve_checkpoint(run_dir) == run_dir / "checkpoint"
    assert resolve_checkpoint(run_dir / "checkpoint") == run_dir / "checkpoint"
    with pytest.raises(UserError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(UserError, match="expected a model directory with config.json"):
        resolve_checkpoint(tmp_path)
    model, tok = load_model_and_tokenizer(run_dir)
    assert tok.spec == "bytes" and not model.training


# --- ossgpt eval -----------------------------------------------------------------------------------------------
def test_cli_json(run_dir, text_file, capsys):
    assert main(["eval", "--checkpoint", str(run_dir), str(text_file), "--json", "--seq-len", "16"]) == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("loss", "perplexity", "bits_per_byte", "tokens", "bytes", "baselines", "expert_load"):
        assert key in report
    assert report["tokens"] == report["bytes"] == len(TEXT.encode())
    assert report["bits_per_byte"] == pytest.approx(report["loss"] * report["tokens"] / math.log(2) / report["bytes"])
    assert set(report["baselines"]) == {"gzip", "bzip2", "xz", "unigram"}
    assert report["baselines"]["unigram"] is None  # no --train-data and no train_config.json in this run
    assert all(sum(layer["fractions"]) == pytest.approx(1) and "cv" in layer for layer in report["expert_load"])


def test_cli_unigram_from_train_data_and_from_train_config(run_dir, text_file, capsys, tmp_path):
    args = ["eval", "--checkpoint", str(run_dir), str(text_file), "--json"]
    assert main([*args, "--train-data", str(run_dir / "data")]) == 0
    given = json.loads(capsys.readouterr().out)["baselines"]["unigram"]
    counts = np.bincount(np.fromfile(run_dir / "data" / "train.bin", dtype=np.uint32), minlength=257)
    tokens = np.frombuffer(TEXT.encode(), dtype=np.uint8)
    assert given == pytest.approx(unigram_bits_per_byte(tokens, len(tokens), counts))

    (run_dir / "train_config.json").write_text(json.dumps({"data": str(run_dir / "data")}))
    try:
        assert main(args) == 0
        assert json.loads(capsys.readouterr().out)["baselines"]["unigram"] == pytest.approx(given)
    finally:
        (run_dir / "train_config.json").unlink()


def test_cli_text_report_and_plots(run_dir, tmp_path, capsys):
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text(TEXT)
    second.write_bytes("caf\xe9 in cp1252, not UTF-8".encode("cp1252"))
    plots = tmp_path / "plots"
    assert main(["eval", "--checkpoint", str(run_dir / "checkpoint"), str(first), str(second), "--plot", str(plots),
                 "--seq-len", "16"]) == 0  # fmt: skip
    out, err = capsys.readouterr()
    for expected in ("perplexity", "bits per byte", "gzip -9", "bzip2 -9", "xz -9", "unigram", "CV"):
        assert expected in out
    assert "decoded as cp1252" in err
    for name in ("loss_by_position.png", "expert_load.png"):
        assert (plots / name).read_bytes().startswith(b"\x89PNG")


def test_cli_no_baselines(run_dir, text_file, capsys):
    assert main(["eval", "--checkpoint", str(run_dir), str(text_file), "--json", "--no-baselines"]) == 0
    assert json.loads(capsys.readouterr().out)["baselines"] is None


def test_cli_errors(run_dir, text_file, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "empty.txt").write_text(" \n")
    (tmp_path / "one.txt").write_text("a")
    checkpoint = ["--checkpoint", str(run_dir)]
    cases = {
        "does not exist": ["--checkpoint", str(tmp_path / "nope"), str(text_file)],
        "'llama' model": ["--checkpoint", str(foreign), str(text_file)],
        "missing.txt does not exist": [*checkpoint, str(tmp_path / "missing.txt")],
        "is empty": [*checkpoint, str(tmp_path / "empty.txt")],
        "at least 2 tokens": [*checkpoint, str(tmp_path / "one.txt")],
        "context of 64": [*checkpoint, str(text_file), "--seq-len", "100"],
        "has no train.bin": [*checkpoint, str(text_file), "--train-data", str(tmp_path)],
    }
    for message, args in cases.items():
        assert main(["eval", *args]) == 2, message
        out, err = capsys.readouterr()
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_a_reader_that_goes_away_is_no_error(run_dir, text_file):
    """`ossgpt eval ... | head -3`: when stdout's reader has gone, the command stops quietly (status 141, as cat)."""
    command = [sys.executable, "-m", "ossgpt", "eval", "--checkpoint", str(run_dir), str(text_file), "--no-baselines"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # before the report is written
    err = process.stderr.read().decode()
    assert process.wait(timeout=300) == 141 and "Traceback" not in err
