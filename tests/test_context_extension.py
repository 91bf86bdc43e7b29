"""`ossgpt eval --context-extension`: YaRN set at load time to evaluate past the trained context."""

import json

import pytest

from ossgpt import GPTOSSForCausalLM
from ossgpt.checkpoint import load_config
from ossgpt.cli import main
from ossgpt.errors import UserError
from ossgpt.inference.loading import context_extension
from ossgpt.tokenizer import ByteTokenizer
from test_eval import tiny_model


@pytest.fixture
def run_dir(tmp_path):
    config = tiny_model(max_positions=64).config.replace(rope_type="default", rope_factor=1.0)  # plain RoPE
    GPTOSSForCausalLM(config).save_pretrained(tmp_path / "checkpoint")
    ByteTokenizer().save(tmp_path / "checkpoint")
    (tmp_path / "train_config.json").write_text(json.dumps({"seq_len": 32}))  # trained on windows of 32
    return tmp_path


def test_overrides_scale_from_the_training_length(run_dir):
    checkpoint = run_dir / "checkpoint"
    assert context_extension(checkpoint, None, False) == {}
    assert context_extension(checkpoint, 8, False) == dict(
        max_position_embeddings=256, rope_type="yarn", rope_factor=8, rope_original_max_position_embeddings=32
    )
    assert context_extension(checkpoint, 8, True) == dict(max_position_embeddings=256)  # the plain-RoPE control
    assert load_config(checkpoint, **context_extension(checkpoint, 4, False)).rope_factor == 4


def test_eval_runs_past_the_trained_context(run_dir, tmp_path, capsys):
    text = tmp_path / "long.txt"
    text.write_text("a fairly long held-out text " * 20)
    for extra in ([], ["--no-yarn"]):
        code = main(["eval", "--checkpoint", str(run_dir), str(text), "--context-extension", "8", "--seq-len", "200",
                     "--json", "--no-baselines", *extra])  # fmt: skip
        assert code == 0
        report = json.loads(capsys.readouterr().out)
        assert report["seq_len"] == 200 and len(report["loss_by_position"]) == 200


def test_default_windows_follow_the_training_length(run_dir, tmp_path, capsys):
    text = tmp_path / "long.txt"
    text.write_text("a fairly long held-out text " * 20)
    for extra, expected in (([], 32), (["--context-extension", "4"], 128)):
        assert main(["eval", "--checkpoint", str(run_dir), str(text), "--json", "--no-baselines", *extra]) == 0
        assert json.loads(capsys.readouterr().out)["seq_len"] == expected
    (run_dir / "train_config.json").unlink()  # a bare model directory: its context (64)
    assert main(["eval", "--checkpoint", str(run_dir), str(text), "--json", "--no-baselines"]) == 0
    assert json.loads(capsys.readouterr().out)["seq_len"] == 64


def test_bad_extension_arguments(run_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("some text")
    assert main(["eval", "--checkpoint", str(run_dir), str(text), "--context-extension", "0.5"]) == 2
    assert main(["eval", "--checkpoint", str(run_dir), str(text), "--no-yarn"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error:") for line in err)
    yarn_trained = run_dir / "yarn"
    tiny_model().save_pretrained(yarn_trained)  # YaRN factor 32 already
    with pytest.raises(UserError, match="YaRN factor"):
        context_extension(yarn_trained, 2, False)
