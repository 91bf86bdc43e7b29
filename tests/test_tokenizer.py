"""Tokenizers: known ids, round trips, vocabulary loading and its failures, the harmony special tokens."""

import socket
import time
from pathlib import Path

import numpy as np
import pytest
import tiktoken
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ossgpt import tokenizer as tokenizer_module
from ossgpt.chat.harmony import SPECIAL_TOKENS, Harmony, Message
from ossgpt.errors import UserError
from ossgpt.tokenizer import (
    EOT,
    HARMONY_CHAT_TOKENS,
    HARMONY_SPECIAL_TOKENS,
    ByteTokenizer,
    CompactTokenizer,
    HarmonyTokenizer,
    load_tokenizer,
    split_spec,
)

SHARED = Path(__file__).resolve().parents[2] / "shared"
CL100K_FILE = SHARED / "tokenizers" / "cl100k_base.tiktoken"
CL100K_CACHE = SHARED / "tokenizers" / "tiktoken_cache"
needs_cl100k = pytest.mark.skipif(not CL100K_FILE.is_file(), reason=f"cl100k_base ranks not found at {CL100K_FILE}")

SAMPLE = "The quick brown fox jumps over the lazy dog. Ünïcödé, 日本語, emoji 🦊 and tabs\tand\nnewlines."


@pytest.fixture
def cl100k(monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(CL100K_CACHE))
    return HarmonyTokenizer("cl100k_base")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty tiktoken cache, no local folder of ranks files (which tiktoken reads from TIKTOKEN_ENCODINGS_BASE
    when set), no encoding already loaded by an earlier test (this process's and tiktoken's registries), and no
    network: any connection attempt fails at once."""

    def refuse(*args, **kwargs):
        raise OSError("network disabled by the test")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TIKTOKEN_ENCODINGS_BASE", raising=False)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    tokenizer_module._load_encoding.cache_clear()
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


# --- cl100k_base -------------------------------------------------------------------------------------------------
@needs_cl100k
def test_cl100k_known_ids(cl100k):
    assert cl100k.encode("hello world") == [15339, 1917]
    assert cl100k.eot_token_id == 100257
    assert cl100k.special_tokens[EOT] == 100257
    assert cl100k.vocab_size == 100277
    assert cl100k.name == cl100k.spec == "cl100k_base"
    assert cl100k.decode([15339, 1917]) == "hello world"


@needs_cl100k
def test_special_token_text_is_ordinary_unless_allowed(cl100k):
    text = f"a{EOT}b"
    assert 100257 not in cl100k.encode(text)
    assert cl100k.decode(cl100k.encode(text)) == text
    assert cl100k.encode(text, allowed_special="all") == [64, 100257, 65]
    assert cl100k.encode(text, allowed_special={EOT}) == [64, 100257, 65]
    with pytest.raises(ValueError, match="not special tokens"):
        cl100k.encode(text, allowed_special={"<|nope|>"})


@needs_cl100k
def test_tensor_in_and_out(cl100k):
    ids = cl100k.encode(SAMPLE, return_tensors="pt")
    assert ids.dtype == torch.long and ids.shape == (1, len(cl100k.encode(SAMPLE)))
    assert cl100k.decode(ids) == SAMPLE  # [1, T]
    assert cl100k.decode(ids[0]) == SAMPLE  # [T]
    assert cl100k.decode(np.asarray(ids[0])) == SAMPLE
    with pytest.raises(ValueError, match="one sequence"):
        cl100k.decode(torch.cat([ids, ids]))


@needs_cl100k
@settings(max_examples=50, deadline=None)
@given(text=st.text())
def test_cl100k_round_trip(text):
    tokenizer = HarmonyTokenizer("cl100k_base", vocab_file=CL100K_FILE)
    assert tokenizer.decode(tokenizer.encode(text)) == text


@needs_cl100k
def test_vocab_file_matches_tiktoken_cache(cl100k):
    from_file = HarmonyTokenizer("cl100k_base", vocab_file=CL100K_FILE)
    assert from_file.encode(SAMPLE) == cl100k.encode(SAMPLE)
    assert from_file.vocab_size == cl100k.vocab_size and from_file.special_tokens == cl100k.special_tokens


def test_decode_bytes_keeps_partial_utf8():
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode("é")  # two bytes
    assert tokenizer.decode_bytes(ids[:1]) == "é".encode()[:1]
    assert tokenizer.decode(ids[:1]) == "\ufffd"


# --- vocabulary loading failures ---------------------------------------------------------------------------------
def test_missing_vocabulary_offline_is_a_quick_user_error(offline):
    start = time.monotonic()
    with pytest.raises(UserError, match="TIKTOKEN_CACHE_DIR") as err:
        HarmonyTokenizer("o200k_harmony")
    assert time.monotonic() - start < 5
    message = str(err.value)
    assert "\n" not in message and "--vocab-file" in message and "o200k_base.tiktoken" in message


def test_bad_vocab_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot read vocab file"):
        HarmonyTokenizer("cl100k_base", vocab_file=tmp_path / "missing.tiktoken")
    garbage = tmp_path / "garbage.tiktoken"
    garbage.write_text("this is not a ranks file\n")
    with pytest.raises(UserError, match="not a .tiktoken ranks file"):
        HarmonyTokenizer("cl100k_base", vocab_file=garbage)


# --- o200k_harmony special tokens, on a small stand-in for o200k_base -----------------------------------------
def test_harmony_special_tokens_keep_their_ids(fake_vocab):
    tokenizer = HarmonyTokenizer("o200k_harmony", vocab_file=fake_vocab)
    fixed = {
        "<|startoftext|>": 199998,
        "<|endoftext|>": 199999,
        "<|return|>": 200002,
        "<|constrain|>": 200003,
        "<|channel|>": 200005,
        "<|start|>": 200006,
        "<|end|>": 200007,
        "<|message|>": 200008,
        "<|call|>": 200012,
        "<|reserved_200000|>": 200000,
        "<|reserved_200011|>": 200011,
        "<|reserved_201087|>": 201087,
    }
    assert {name: tokenizer.special_tokens[name] for name in fixed} == fixed
    assert set(tokenizer.special_tokens.values()) == set(range(199998, 201088))  # every id from 199998 named
    assert tokenizer.vocab_size == 201088
    assert tokenizer.eot_token_id == 199999

    assert tokenizer.encode("hello") == [259]  # the fake file's merges apply
    message = "<|start|>user<|message|>hello<|end|>"
    ids = tokenizer.encode(message, allowed_special="all")
    assert ids[0] == 200006 and ids[-1] == 200007 and 200008 in ids
    assert tokenizer.decode(ids) == message
    assert tokenizer.decode([200005, 200012]) == "<|channel|><|call|>"
    assert 200006 not in tokenizer.encode(message)  # not allowed: plain text


# --- byte and compact tokenizers ---------------------------------------------------------------------------------
@settings(max_examples=100, deadline=None)
@given(text=st.text())
def test_byte_round_trip(text):
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text


def test_byte_tokenizer_basics():
    tokenizer = ByteTokenizer()
    assert (tokenizer.vocab_size, tokenizer.eot_token_id, tokenizer.spec) == (257, 256, "bytes")
    assert tokenizer.encode(f"é{EOT}", allowed_special="all") == [195, 169, 256]
    assert tokenizer.decode([104, 105, 256]) == f"hi{EOT}"
    with pytest.raises(ValueError):
        tokenizer.decode([257])


@pytest.fixture(scope="module")
def compact() -> CompactTokenizer:
    if not CL100K_FILE.is_file():
        pytest.skip(f"cl100k_base ranks not found at {CL100K_FILE}")
    corpus = ["the cat sat on the mat. the dog sat on the log.", "the end of the story, the very end."]
    return CompactTokenizer.fit("cl100k_base", corpus, 8, vocab_file=CL100K_FILE)


def test_compact_vocabulary_layout(compact):
    base = compact.base
    assert compact.spec == "cl100k_base:8"
    assert compact.vocab_size == 257 + 8 + 7 and compact.eot_token_id == 256
    assert base.decode([compact.kept_token_ids[0]]) == " the"  # the most frequent multi-byte token
    assert all(len(base.decode_bytes([t])) > 1 for t in compact.kept_token_ids)
    assert compact.encode(" the cat") == [257, *compact.encode(" cat")]
    assert compact.encode("\x00") == [0]  # byte fallback


@needs_cl100k
def test_compact_vocabulary_smaller_than_asked():
    tokenizer = CompactTokenizer.fit("cl100k_base", {15339: 3, 1917: 5, 64: 9}, 100, vocab_file=CL100K_FILE)
    assert tokenizer.kept_token_ids == [1917, 15339]  # by count; the single byte "a" (64) is never kept
    assert tokenizer.vocab_size == 259 + 7
    assert tokenizer.special_tokens["<|start|>"] == 259 + 3  # the chat tokens follow the kept tokens directly


def test_compact_vocabulary_has_the_harmony_chat_tokens(compact):
    """After the kept tokens, in o200k_harmony's order: a compact model can learn the Harmony format."""
    assert set(HARMONY_CHAT_TOKENS) == set(SPECIAL_TOKENS)
    ids = [compact.special_tokens[t] for t in HARMONY_CHAT_TOKENS]
    assert ids == list(range(257 + 8, 257 + 8 + 7)) and compact.special_tokens[EOT] == 256
    assert list(HARMONY_CHAT_TOKENS) == sorted(HARMONY_CHAT_TOKENS, key=HARMONY_SPECIAL_TOKENS.get)
    assert [compact.decode([i]) for i in ids] == list(HARMONY_CHAT_TOKENS)
    # Their text in ordinary input stays ordinary text; only allowed_special makes them control tokens.
    text = "<|start|>user<|message|>hi<|end|>"
    assert not set(compact.encode(text)) & set(ids)
    start, end, message = (compact.special_tokens[t] for t in ("<|start|>", "<|end|>", "<|message|>"))
    user, hi = compact.encode("user"), compact.encode("hi")
    assert compact.encode(text, allowed_special="all") == [start, *user, message, *hi, end]
    harmony = Harmony(compact)
    tokens = harmony.render_conversation([Message("user", "What is 2+2?"), Message("assistant", "4", "final")])
    assert compact.decode(tokens) == (
        "<|start|>user<|message|>What is 2+2?<|end|><|start|>assistant<|channel|>final<|message|>4<|end|>"
    )
    reply = compact.encode("<|channel|>final<|message|>4<|return|>", allowed_special="all")
    assert harmony.parse(reply) == [Message("assistant", "4", channel="final")]


@settings(max_examples=100, deadline=None)
@given(text=st.text())
def test_compact_round_trip(compact, text):
    assert compact.decode(compact.encode(text)) == text
    assert compact.decode(compact.encode(text + EOT + text, allowed_special="all")) == text + EOT + text


def test_compact_save_load(compact, tmp_path):
    compact.save(tmp_path)
    loaded = load_tokenizer("cl100k_base:8", tmp_path, vocab_file=CL100K_FILE)
    assert isinstance(loaded, CompactTokenizer)
    assert loaded.kept_token_ids == compact.kept_token_ids
    assert loaded.encode(SAMPLE) == compact.encode(SAMPLE)
    assert loaded.special_tokens == compact.special_tokens and loaded.vocab_size == compact.vocab_size
    assert load_tokenizer(None, tmp_path, vocab_file=CL100K_FILE).spec == "cl100k_base:8"
    with pytest.raises(UserError, match="prepared with tokenizer cl100k_base:8, not cl100k_base:16"):
        load_tokenizer("cl100k_base:16", tmp_path)


@needs_cl100k
def test_compact_tokenizer_saved_before_the_chat_tokens_loads_with_its_ids(tmp_path):
    """A tokenizer.json written before compact vocabularies had the chat tokens (the file format is unchanged):
    every id it had means what it meant, and the chat tokens come after them."""
    (tmp_path / "tokenizer.json").write_text(
        '{"spec": "cl100k_base:2", "base_encoding": "cl100k_base", "kept_token_ids": [1917, 15339]}\n'
    )
    tokenizer = load_tokenizer("cl100k_base:2", tmp_path, vocab_file=CL100K_FILE)
    assert tokenizer.encode("hello world!" + EOT, allowed_special="all") == [258, 257, 33, 256]
    assert tokenizer.special_tokens["<|return|>"] == 259 and tokenizer.vocab_size == 266


# --- specs and the factory ---------------------------------------------------------------------------------------
def test_split_spec():
    assert split_spec("cl100k_base") == ("cl100k_base", None)
    assert split_spec("o200k_harmony:512") == ("o200k_harmony", 512)
    assert split_spec("bytes") == ("bytes", None)
    for bad in ("gpt2", "bytes:10", "cl100k_base:0", "cl100k_base:x", ""):
        with pytest.raises(UserError, match="unknown tokenizer"):
            split_spec(bad)


@needs_cl100k
def test_load_tokenizer(monkeypatch, tmp_path):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(CL100K_CACHE))
    assert isinstance(load_tokenizer("bytes"), ByteTokenizer)
    tokenizer = load_tokenizer("cl100k_base")
    assert isinstance(tokenizer, HarmonyTokenizer)
    tokenizer.save(tmp_path)
    assert (tmp_path / "tokenizer.json").read_text().strip() == '{"spec": "cl100k_base"}'
    assert load_tokenizer(None, tmp_path).spec == "cl100k_base"
    with pytest.raises(UserError, match="ossgpt prepare"):
        load_tokenizer("cl100k_base:8192", tmp_path / "nowhere")
    with pytest.raises(UserError, match="ossgpt prepare"):
        load_tokenizer("cl100k_base:8192")
