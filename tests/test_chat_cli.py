"""`ossgpt chat` end to end with scripted stdin: a tiny random model in gpt-oss's o200k_harmony layout (with a small
stand-in vocabulary file), and a byte-tokenizer model for the plain-transcript fallback.

A random model writes random tokens, so most tests script the sampled tokens instead (Sampler.__call__), which
pins down what is shown, what is hidden, and exactly which tokens the KV cache holds after each turn.
"""

import datetime
import io
import subprocess
import sys

import pytest
import torch

import ossgpt.chat.session as chat_session
from ossgpt import GPTOSSConfig, GPTOSSForCausalLM
from ossgpt.chat.harmony import Harmony, Message, developer_content, system_content
from ossgpt.cli import main
from ossgpt.inference.sampling import Sampler
from ossgpt.tokenizer import ByteTokenizer, HarmonyTokenizer


def tiny_model(**overrides) -> GPTOSSForCausalLM:
    torch.manual_seed(0)
    values = dict(vocab_size=201_088, tokenizer="o200k_harmony", eos_token_id=200_002, hidden_size=32,
                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_local_experts=2,
                  num_experts_per_tok=1, intermediate_size=32, max_position_embeddings=2048, sliding_window=8,
                  tie_word_embeddings=True)  # fmt: skip
    return GPTOSSForCausalLM(GPTOSSConfig(**{**values, **overrides}))


@pytest.fixture(scope="module")
def harmony_checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gpt-oss-tiny")
    tiny_model().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def harmony(fake_vocab):
    return Harmony(HarmonyTokenizer("o200k_harmony", vocab_file=fake_vocab))


@pytest.fixture
def sessions(monkeypatch):
    """Every DecodeSession the chat creates, and the token counts of each `extend` call."""
    created = []

    class Recorded(chat_session.DecodeSession):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.extends = []
            created.append(self)

        def extend(self, ids):
            self.extends.append(len(ids))
            super().extend(ids)

    monkeypatch.setattr(chat_session, "DecodeSession", Recorded)
    return created


def script(monkeypatch, tokens):
    """Make sampling return these tokens in order (an exception instance is raised instead)."""
    queue = list(tokens)

    def scripted(self, logits, seen=None):
        token = queue.pop(0)
        if isinstance(token, BaseException):
            raise token
        return torch.tensor([token])

    monkeypatch.setattr(Sampler, "__call__", scripted)


def chat(monkeypatch, capsys, argv, stdin: str):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(["chat", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def special(harmony, text):
    return harmony.tokenizer.encode(text, allowed_special="all")


def system_message():
    return Message("system", system_content("medium", datetime.date.today().isoformat()))


# ------------------------------------------------------------------------------------------------------ Harmony
def test_random_model_end_to_end_in_a_subprocess(harmony_checkpoint, fake_vocab):
    result = subprocess.run(
        [sys.executable, "-m", "ossgpt", "chat", "--checkpoint", str(harmony_checkpoint), "--vocab-file",
         str(fake_vocab), "--max-new-tokens", "8", "--seed", "0"],
        input="Hello there\nAnd now?\n", capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(">>> ") == 3 and result.stdout.endswith(">>> \n")  # two replies, then Ctrl-D
    assert "chatting with" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("show", [False, True])
def test_reasoning_hidden_or_shown_and_cache_kept_across_turns(
    harmony_checkpoint, fake_vocab, harmony, sessions, monkeypatch, capsys, show
):
    turn1 = ("<|channel|>analysis<|message|>secret thoughts<|end|><|start|>assistant<|channel|>final<|message|>"
             "hello world<|return|>")  # fmt: skip
    turn2 = "<|channel|>final<|message|>bye<|return|>"
    script(monkeypatch, special(harmony, turn1) + special(harmony, turn2))
    argv = ["--checkpoint", str(harmony_checkpoint), "--vocab-file", str(fake_vocab), "--system", "Be nice."]
    code, out, err = chat(monkeypatch, capsys, argv + ["--show-reasoning"] * show, "Hi\nAgain\n")
    assert code == 0
    reply1 = "[reasoning] secret thoughts\nhello world" if show else "hello world"
    assert out == f">>> {reply1}\n>>> bye\n>>> \n"

    # The cache holds the whole conversation, the chain of thought included; the <|return|> that ended each reply
    # is stored as <|end|> (the last one is added with the next message).
    (session,) = sessions
    conversation = [
        system_message(), Message("developer", developer_content("Be nice.")), Message("user", "Hi"),
        Message("assistant", "secret thoughts", channel="analysis"),
        Message("assistant", "hello world", channel="final"),
        Message("user", "Again"), Message("assistant", "bye", channel="final"),
    ]  # fmt: skip
    assert session.tokens == harmony.render_conversation(conversation, drop_analysis=False)[:-1]
    prompts = [n for n in session.extends if n > 1]  # every other call adds one generated token
    second = 1 + len(harmony.render(Message("user", "Again"))) + 1 + len(harmony.text("assistant"))
    assert prompts[1] == second  # the second turn runs the new tokens only


def test_ctrl_c_stops_a_reply_and_the_next_turn_continues(
    harmony_checkpoint, fake_vocab, harmony, sessions, monkeypatch, capsys
):
    turn1 = special(harmony, "<|channel|>final<|message|>partial")
    script(monkeypatch, [*turn1, KeyboardInterrupt(), *special(harmony, "<|channel|>final<|message|>ok<|return|>")])
    argv = ["--checkpoint", str(harmony_checkpoint), "--vocab-file", str(fake_vocab)]
    code, out, _ = chat(monkeypatch, capsys, argv, "first\nsecond\n")
    assert code == 0
    assert out == ">>> partial\n[interrupted]\n>>> ok\n>>> \n"
    conversation = [system_message(), Message("user", "first"), Message("assistant", "partial", channel="final"),
                    Message("user", "second"), Message("assistant", "ok", channel="final")]  # fmt: skip
    assert sessions[0].tokens == harmony.render_conversation(conversation)[:-1]  # the cut message was closed


def test_ctrl_c_or_ctrl_d_at_the_prompt_quits(harmony_checkpoint, fake_vocab, monkeypatch, capsys):
    def interrupt(prompt):
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr("builtins.input", interrupt)
        assert main(["chat", "--checkpoint", str(harmony_checkpoint), "--vocab-file", str(fake_vocab)]) == 0
    assert capsys.readouterr().out == "\n"
    code, out, _ = chat(monkeypatch, capsys, ["--checkpoint", str(harmony_checkpoint), "--vocab-file",
                                              str(fake_vocab)], "")  # fmt: skip
    assert code == 0 and out == ">>> \n"


# ------------------------------------------------------------------------------------------- plain transcripts
@pytest.fixture(scope="module")
def bytes_checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bytes-tiny")
    tiny_model(vocab_size=257, tokenizer="bytes", eos_token_id=256, max_position_embeddings=64).save_pretrained(
        directory
    )
    return directory


def test_plain_transcript_for_other_tokenizers(bytes_checkpoint, sessions, monkeypatch, capsys):
    script(monkeypatch, [*b"Hi!\nUser:", *b" Fine.", 256])
    code, out, err = chat(monkeypatch, capsys, ["--checkpoint", str(bytes_checkpoint)], "hello\nagain\n")
    assert code == 0
    assert out == ">>> Hi!\n>>>  Fine.\n>>> \n"  # the model's own "\nUser:" ends its reply and is not shown
    assert err.count("plain 'User: / Assistant:' transcript") == 1
    text = ByteTokenizer().decode(sessions[0].tokens)
    assert text == "<|endoftext|>User: hello\nAssistant:Hi!\nUser: again\nAssistant: Fine."


def test_a_full_context_starts_a_new_conversation(bytes_checkpoint, sessions, monkeypatch, capsys):
    script(monkeypatch, [*b"x" * 30, *b"ok", 256])  # the first reply fills 54 of the 64 positions
    code, out, err = chat(monkeypatch, capsys, ["--checkpoint", str(bytes_checkpoint), "--max-new-tokens", "30"],
                          "hello\nagain\n" + "y" * 80 + "\n")  # fmt: skip
    assert code == 0
    assert out == ">>> " + "x" * 30 + "\n>>> ok\n>>> \n>>> \n"
    assert "starting a new one" in err and "does not fit in the model's context of 64 tokens" in err
    assert ByteTokenizer().decode(sessions[1].tokens) == "<|endoftext|>User: again\nAssistant:ok"  # the new one


# ------------------------------------------------------------------------------------------------- error paths
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--checkpoint", "/nonexistent/model"], "checkpoint /nonexistent/model does not exist"),
        (["--temperature", "-1"], "temperature must be >= 0"),
        (["--top-p", "2"], r"top_p must be in (0, 1]"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
        (["--mxfp4"], "keep_mxfp4=True needs a checkpoint with MXFP4 experts"),
    ],
)
def test_errors_are_one_line(bytes_checkpoint, monkeypatch, capsys, argv, message):
    code, _, err = chat(monkeypatch, capsys, ["--checkpoint", str(bytes_checkpoint), *argv], "")
    assert code == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


# ------------------------------------------------------------------------------- gpt-oss's published layout
def test_chat_on_a_published_mxfp4_checkpoint_takes_the_cpu_fast_path(fake_vocab, harmony, tmp_path, monkeypatch,
                                                                       capsys):  # fmt: skip
    """The published layout (MXFP4 experts, bf16 elsewhere) with no flag: experts stay packed, attention and the
    LM head int8, said in one line before the chat starts; the reply is the scripted one."""
    from ossgpt.checkpoint.hf_config import config_to_hf
    from ossgpt.checkpoint.pretrained import MXFP4_QUANTIZATION_CONFIG
    from test_mxfp4 import write_published_mxfp4

    model = tiny_model(tie_word_embeddings=False)
    config = {**config_to_hf(model.config), "quantization_config": MXFP4_QUANTIZATION_CONFIG}
    write_published_mxfp4(model, tmp_path, config)
    script(monkeypatch, special(harmony, "<|channel|>final<|message|>hello<|return|>"))
    code, out, err = chat(monkeypatch, capsys, ["--checkpoint", str(tmp_path), "--vocab-file", str(fake_vocab)], "hi\n")
    assert code == 0 and out == ">>> hello\n>>> \n"
    loaded = err.splitlines()[0]
    assert loaded.startswith("loaded in ") and "experts MXFP4" in loaded and "LM head and attention int8" in loaded
