"""`ossgpt generate`: the same tokens as model.generate, exact streamed text, one-line errors."""

import io

import pytest
import torch

from ossgpt import GPTOSSConfig, GPTOSSForCausalLM
from ossgpt.cli import generate as generate_cli
from ossgpt.cli import main
from ossgpt.errors import UserError
from ossgpt.inference import loading
from ossgpt.inference.loading import load_model, quantize
from ossgpt.quant.int8 import Int8Linear, quantize_for_decoding
from ossgpt.tokenizer import ByteTokenizer, TextStream

PROMPT = "Once upon a time"
SMILE = "héllo 🙂"  # 1-, 2- and 4-byte UTF-8 characters


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A model directory holding a tiny random model over the byte tokenizer, with a 32-token context."""
    directory = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    config = GPTOSSConfig(tokenizer="bytes", vocab_size=257, eos_token_id=256, hidden_size=16, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_local_experts=4,
                          num_experts_per_tok=2, intermediate_size=12, max_position_embeddings=32,
                          sliding_window=8)  # fmt: skip
    GPTOSSForCausalLM(config).save_pretrained(directory)
    ByteTokenizer().save(directory)
    return directory


class Terminal(io.StringIO):
    """A stdout that says it is a terminal, so the CLI streams."""

    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("flag, mode", [([], "int8-dynamic"), (["--quantize", "none"], None),
                                        (["--quantize", "int8"], "int8"),
                                        (["--quantize", "int8-dynamic"], "int8-dynamic")])  # fmt: skip
def test_greedy_matches_model_generate(checkpoint, capsys, flag, mode):
    """The CLI's tokens are those of the model as --quantize holds it: int8 W8A8 on the CPU by default, float32
    exactly with `none`; the loading line says which."""
    assert main(["generate", "--checkpoint", str(checkpoint), "--prompt", PROMPT, "--greedy",
                 "--max-new-tokens", "10", *flag]) == 0  # fmt: skip
    printed, err = capsys.readouterr()
    assert ("int8 W8A8" in err) == (mode == "int8-dynamic") and ("weight-only" in err) == (mode == "int8"), err

    tok, model = ByteTokenizer(), GPTOSSForCausalLM.from_pretrained(checkpoint)
    if mode is not None:
        model = quantize_for_decoding(model, dynamic=mode == "int8-dynamic")
    ids = torch.tensor([[tok.eot_token_id, *tok.encode(PROMPT)]])  # the CLI starts the prompt with <|endoftext|>
    new = model.generate(ids, max_new_tokens=10, eos_token_id=tok.eot_token_id)[0, ids.shape[1] :].tolist()
    new = new[: new.index(tok.eot_token_id)] if tok.eot_token_id in new else new
    assert printed == PROMPT + tok.decode(new) + "\n"


def test_auto_is_int8_for_decoding_on_the_cpu_and_the_stored_weights_for_scoring(checkpoint):
    decoding, scoring = load_model(checkpoint), load_model(checkpoint, decoding=False)  # `ossgpt eval` scores
    assert isinstance(decoding.lm_head, Int8Linear) and decoding.lm_head.dynamic
    assert type(scoring.lm_head) is torch.nn.Linear and scoring.lm_head.weight.dtype == torch.float32


def test_the_memory_check_counts_what_the_int8_default_holds(checkpoint, monkeypatch):
    """The plan checked before loading covers the tensors loaded (a float32 checkpoint keeps its float32 embedding
    beside the int8 copies), their scales included."""
    plans = []
    monkeypatch.setattr(loading, "check_memory", lambda plan, *args, **kwargs: plans.append(plan))
    model = load_model(checkpoint)
    tensors = {t.data_ptr(): t for t in (*model.parameters(), *model.buffers())}.values()  # tied ones once
    assert model.embed_tokens.weight.dtype == torch.float32
    assert sum(t.nbytes for t in tensors) <= plans[0].steady


def test_quantize_refuses_other_devices_and_unknown_modes():
    model = GPTOSSForCausalLM(GPTOSSConfig(vocab_size=64, eos_token_id=0, hidden_size=32, intermediate_size=32,
                                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                           head_dim=16, num_local_experts=2, num_experts_per_tok=1))  # fmt: skip
    with pytest.raises(UserError, match="unknown quantization"):
        quantize(model, "int4")
    with pytest.raises(UserError, match="for decoding on the CPU, not meta"):
        quantize(model.to("meta"), "int8")


def test_streaming_prints_the_same_text(checkpoint, capsys, monkeypatch):
    args = ["generate", "--checkpoint", str(checkpoint), "--prompt", PROMPT, "--seed", "3", "--max-new-tokens", "12"]
    assert main(args) == 0
    at_end = capsys.readouterr().out
    terminal = Terminal()
    monkeypatch.setattr("sys.stdout", terminal)
    assert main(args) == 0
    assert terminal.getvalue() == at_end  # same seed, same sample, whether streamed or not


def test_text_stream_holds_back_cut_characters():
    pieces = list(TextStream(ByteTokenizer()).add_all(SMILE.encode()))
    assert "".join(pieces) == SMILE
    assert pieces == list(SMILE)  # each character printed once, whole, when its last byte came
    assert "".join(TextStream(ByteTokenizer()).add_all([0xF0, 0x9F, 300])) == "\ufffd\ufffd"  # cut, unknown


def test_streamed_split_utf8_prints_exact_text(checkpoint, monkeypatch):
    """Byte tokens that split characters, then <|endoftext|>: the terminal shows exactly the text."""
    scripted = [*SMILE.encode(), ByteTokenizer().eot_token_id, *b"never shown"]
    monkeypatch.setattr(generate_cli, "stream", lambda *args, **kwargs: (torch.tensor([t]) for t in scripted))
    terminal = Terminal()
    monkeypatch.setattr("sys.stdout", terminal)
    assert main(["generate", "--checkpoint", str(checkpoint), "--prompt", "> "]) == 0
    assert terminal.getvalue() == "> " + SMILE + "\n"


def test_max_new_tokens_capped_by_context(checkpoint, capsys):
    assert main(["generate", "--checkpoint", str(checkpoint), "--prompt", "x" * 25, "--greedy"]) == 0
    assert "at most 6 tokens" in capsys.readouterr().err  # 32 context - 26 prompt tokens (with the leading eot)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", "x" * 40], "shorten the prompt"),
        (["--prompt", "hi", "--temperature", "-1"], "temperature must be >= 0"),
        (["--prompt", "hi", "--top-p", "0"], "top_p must be in (0, 1]"),
        (["--prompt", "hi", "--top-p", "1.5"], "top_p must be in (0, 1]"),
        (["--prompt", "hi", "--top-k", "0"], "top_k must be >= 1"),
        (["--prompt", "hi", "--max-new-tokens", "0"], "at least 1"),
    ],
)
def test_errors(checkpoint, capsys, args, message):
    assert main(["generate", "--checkpoint", str(checkpoint), *args]) == 2
    err = capsys.readouterr().err
    *notices, error = err.splitlines()  # a prompt is read after the weights, whose loading line may come first
    assert error.startswith("error: ") and message in error and err.endswith("\n"), err
    assert all(line.startswith("loaded in ") for line in notices) and len(notices) <= 1, err


def test_missing_checkpoint(tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "does not exist" in err
