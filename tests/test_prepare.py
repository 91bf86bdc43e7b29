"""`ossgpt prepare`: token files that decode back to the inputs, honest splits, encodings, errors, atomicity."""

import io
import json
import sys
import types
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from ossgpt.cli import main
from ossgpt.data import prepare as prepare_module
from ossgpt.data.prepare import prepare, read_text
from ossgpt.errors import UserError
from ossgpt.tokenizer import EOT, load_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared"
CL100K_CACHE = SHARED / "tokenizers" / "tiktoken_cache"
HUCK_FINN = SHARED / "data" / "novels" / "huckleberry_finn.txt"


@pytest.fixture(autouse=True)
def tiktoken_cache(monkeypatch):
    if not CL100K_CACHE.is_dir():
        pytest.skip(f"tiktoken cache with cl100k_base not found at {CL100K_CACHE}")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(CL100K_CACHE))  # inherited by worker processes too


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def documents(n: int) -> list[str]:
    """n distinct multi-line documents, long enough that each contributes to val."""
    return [f"Document {i}:\n" + "".join(f"line {j}, café {i * j}.\n" for j in range(8)) for i in range(n)]


def read_parts(out_dir: Path, name: str) -> list[np.ndarray]:
    """The token parts of a .bin file: the runs of tokens between <|endoftext|> separators."""
    eot = json.loads((out_dir / "meta.json").read_text())["eot_token_id"]
    ids = np.memmap(out_dir / name, dtype=np.uint32, mode="r")
    if not len(ids):
        return []
    assert ids[-1] == eot
    return np.split(np.asarray(ids), np.flatnonzero(ids == eot) + 1)[:-1]


def decoded_documents(out_dir: Path) -> list[str]:
    """Each document's train part followed by its val part, decoded (the split may cut a UTF-8 character)."""
    tokenizer = load_tokenizer(None, out_dir)
    train, val = read_parts(out_dir, "train.bin"), read_parts(out_dir, "val.bin")  # every test document has val
    return [tokenizer.decode_bytes(np.concatenate([t[:-1], v[:-1]])).decode() for t, v in zip(train, val, strict=True)]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["prepare", *map(str, argv)])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# --- end to end --------------------------------------------------------------------------------------------------
def test_files_and_folders_round_trip(tmp_path):
    texts = documents(3)
    inputs = tmp_path / "in"
    write(inputs / "a.txt", texts[0])
    write(inputs / "folder" / "b.md", texts[1])
    write(inputs / "folder" / "sub" / "c.text", texts[2])
    write(inputs / "folder" / ".hidden.txt", "hidden files are skipped")
    write(inputs / "folder" / ".git" / "config", "and so are hidden folders")

    out = tmp_path / "data"
    meta = prepare([inputs / "a.txt", inputs / "folder"], out, tokenizer="cl100k_base", val_fraction=0.2)

    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokenizer.json", "train.bin", "val.bin"]
    assert json.loads((out / "meta.json").read_text()) == meta
    assert [Path(s["path"]).name for s in meta["sources"]] == ["a.txt", "b.md", "c.text"]
    assert [s["bytes"] for s in meta["sources"]] == [len(t.encode()) for t in texts]
    assert {s["encoding"] for s in meta["sources"]} == {"utf-8"}
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot_token_id"], meta["dtype"]) == (
        "cl100k_base", 100277, 100257, "uint32"
    )  # fmt: skip
    assert meta["train_bytes"] + meta["val_bytes"] == sum(len(t.encode()) for t in texts)
    assert meta["train_tokens"] + meta["val_tokens"] == sum(s["tokens"] for s in meta["sources"]) + 2 * len(texts)
    assert (out / "train.bin").stat().st_size == 4 * meta["train_tokens"]
    assert (out / "val.bin").stat().st_size == 4 * meta["val_tokens"]
    assert decoded_documents(out) == texts

    val = read_parts(out, "val.bin")
    tokenizer = load_tokenizer("cl100k_base")
    assert [len(v) - 1 for v in val] == [int(0.2 * len(tokenizer.encode(t))) for t in texts]  # the last 20%
    assert meta["val_bytes"] == sum(len(tokenizer.decode_bytes(v[:-1])) for v in val)


def test_zero_val_fraction_and_bytes_tokenizer(tmp_path):
    text = "héllo wörld\n"
    meta = prepare([write(tmp_path / "a.txt", text)], tmp_path / "data", tokenizer="bytes", val_fraction=0)
    assert (meta["val_tokens"], meta["val_bytes"], (tmp_path / "data" / "val.bin").stat().st_size) == (0, 0, 0)
    ids = np.memmap(tmp_path / "data" / "train.bin", dtype=np.uint32, mode="r")
    assert ids.tolist() == [*text.encode(), 256]


def test_compact_tokenizer_is_fitted_on_train_only(tmp_path):
    text = " the cat sat." * 40 + " zebra" * 20  # " zebra" only in the last 20% of tokens
    meta = prepare([write(tmp_path / "a.txt", text)], tmp_path / "data", tokenizer="cl100k_base:64", val_fraction=0.2)
    tokenizer = load_tokenizer("cl100k_base:64", tmp_path / "data")
    assert meta["tokenizer"] == tokenizer.spec == "cl100k_base:64"
    assert meta["vocab_size"] == tokenizer.vocab_size < 257 + 64  # few distinct tokens in this corpus
    assert meta["eot_token_id"] == 256
    base = load_tokenizer("cl100k_base")
    assert set(base.encode(" cat sat")) <= set(tokenizer.kept_token_ids)
    assert not set(base.encode(" zebra")) & set(tokenizer.kept_token_ids)
    assert decoded_documents(tmp_path / "data") == [text]


def test_non_utf8_files_are_decoded_and_reported(tmp_path, capsys):
    cp1252 = write(tmp_path / "in" / "cp1252.txt", "café naïve — “quoted”\n".encode("cp1252"))
    latin1 = write(tmp_path / "in" / "latin1.txt", b"control \x81 byte, caf\xe9\n")  # 0x81 is not cp1252
    assert read_text(cp1252) == ("café naïve — “quoted”\n", "cp1252")
    assert read_text(latin1) == ("control \x81 byte, café\n", "latin-1")

    rc, out, err = run_cli(capsys, tmp_path / "in", "--out", tmp_path / "data", "--val-fraction", "0")
    assert rc == 0
    assert f"note: {cp1252} is not valid UTF-8; decoded as cp1252" in err.splitlines()
    assert f"note: {latin1} is not valid UTF-8; decoded as latin-1" in err.splitlines()
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert [s["encoding"] for s in meta["sources"]] == ["cp1252", "latin-1"]
    assert "bytes/token" in out and "tokens" in out


def test_empty_files_are_skipped(tmp_path, capsys):
    inputs = [write(tmp_path / "empty.txt", ""), write(tmp_path / "text.txt", "some text here")]
    meta = prepare(inputs, tmp_path / "data", val_fraction=0)
    assert [s["tokens"] for s in meta["sources"]] == [0, 3]
    assert meta["train_tokens"] == 4  # one separator, for the one real document
    assert "empty.txt is empty; skipped" in capsys.readouterr().err


def test_workers_give_the_same_output(tmp_path):
    inputs = [write(tmp_path / "in" / f"{i}.txt", text) for i, text in enumerate(documents(5))]
    single = prepare(inputs, tmp_path / "one", workers=1, val_fraction=0.1)
    multi = prepare(inputs, tmp_path / "two", workers=2, val_fraction=0.1)
    assert single == multi
    for name in ("train.bin", "val.bin", "tokenizer.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_real_novel_not_utf8(tmp_path, capsys):
    if not HUCK_FINN.is_file():
        pytest.skip(f"shared novels not found at {HUCK_FINN.parent}")
    meta = prepare([HUCK_FINN], tmp_path / "data", val_fraction=0.05)
    text, encoding = read_text(HUCK_FINN)
    assert meta["sources"][0]["encoding"] == encoding == "cp1252"
    assert "is not valid UTF-8; decoded as cp1252" in capsys.readouterr().err
    assert decoded_documents(tmp_path / "data") == [text]
    assert 3 < (meta["train_bytes"] + meta["val_bytes"]) / (meta["train_tokens"] + meta["val_tokens"]) < 6


# --- errors ------------------------------------------------------------------------------------------------------
ERROR_CASES = {
    "missing input": (["{tmp}/nope.txt"], "does not exist"),
    "empty folder": (["{tmp}/empty_dir"], "no files found in folder"),
    "all inputs empty": (["{tmp}/blank.txt", "{tmp}/zero.txt"], "all inputs are empty"),
    "unknown tokenizer": (["{tmp}/ok.txt", "--tokenizer", "gpt5"], "unknown tokenizer 'gpt5'"),
    "val fraction too big": (["{tmp}/ok.txt", "--val-fraction", "0.5"], "val fraction must be in [0, 0.5)"),
    "val fraction negative": (["{tmp}/ok.txt", "--val-fraction", "-0.1"], "val fraction must be in [0, 0.5)"),
    "out is a file": (["{tmp}/ok.txt", "--out", "{tmp}/ok.txt"], "is a file, not a folder"),
    "out exists": (["{tmp}/ok.txt", "--out", "{tmp}/existing"], "exists; pass --force to overwrite"),
    "no workers": (["{tmp}/ok.txt", "--workers", "0"], "workers must be at least 1"),
    "no input": ([], "no INPUT given"),
}


@pytest.mark.parametrize("case", ERROR_CASES)
def test_errors_are_one_line(case, tmp_path, capsys):
    write(tmp_path / "ok.txt", "fine text")
    write(tmp_path / "blank.txt", " \n\t\n")
    write(tmp_path / "zero.txt", "")
    write(tmp_path / "empty_dir" / ".hidden", "not counted")
    (tmp_path / "existing").mkdir()
    argv, message = ERROR_CASES[case]
    argv = [a.format(tmp=tmp_path) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "data")]
    rc, _, err = run_cli(capsys, *argv)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "data").exists()


def refuse_network(*args, **kwargs):
    raise OSError("network disabled by the test")


def test_missing_vocabulary_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty_cache"))
    monkeypatch.setattr("socket.getaddrinfo", refuse_network)
    source = write(tmp_path / "a.txt", "text")
    rc, _, err = run_cli(capsys, source, "--out", tmp_path / "data", "--tokenizer", "o200k_harmony")
    assert rc == 2 and err.count("\n") == 1 and "error: cannot load the o200k_harmony vocabulary" in err
    assert "--vocab-file" in err


# --- atomic output -----------------------------------------------------------------------------------------------
def fail_mid_write(path: Path, parts) -> None:
    path.write_bytes(b"partial")
    raise RuntimeError("disk full")


def test_failure_leaves_no_output(tmp_path, monkeypatch):
    source = write(tmp_path / "in" / "a.txt", "some text")
    monkeypatch.setattr(prepare_module, "write_tokens", fail_mid_write)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare([source], tmp_path / "data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # neither data/ nor a temporary folder


def test_force_replaces_only_a_complete_output(tmp_path, monkeypatch):
    out = tmp_path / "data"
    prepare([write(tmp_path / "in" / "a.txt", "old text")], out)
    with pytest.raises(UserError, match="exists; pass --force"):
        prepare([tmp_path / "in" / "a.txt"], out)

    write(tmp_path / "in" / "a.txt", "new and longer text")
    with monkeypatch.context() as patch:
        patch.setattr(prepare_module, "write_tokens", fail_mid_write)
        with pytest.raises(RuntimeError):
            prepare([tmp_path / "in" / "a.txt"], out, force=True)
    assert decoded_documents_of_train(out) == "old text"  # the old output survives a failed replacement

    prepare([tmp_path / "in" / "a.txt"], out, force=True, val_fraction=0)
    assert decoded_documents_of_train(out) == "new and longer text"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "in"]


def decoded_documents_of_train(out_dir: Path) -> str:
    ids = np.memmap(out_dir / "train.bin", dtype=np.uint32, mode="r")
    return load_tokenizer(None, out_dir).decode(ids).removesuffix(EOT)


# --- downloads (never real) --------------------------------------------------------------------------------------
def test_download_offline_is_one_line(tmp_path, capsys, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    rc, _, err = run_cli(capsys, "--source", "shakespeare", "--out", tmp_path / "data")
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith("error: could not download https://") and "offline" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_download_then_prepare(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(b"First Citizen:\nSpeak.\n" * 50))
    rc, out, _ = run_cli(capsys, "--source", "shakespeare", "--out", tmp_path / "data")
    assert rc == 0 and "prepared 1 file(s)" in out
    assert (tmp_path / "raw" / "tinyshakespeare.txt").read_bytes() == b"First Citizen:\nSpeak.\n" * 50


def test_openwebtext_needs_datasets(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    rc, _, err = run_cli(capsys, "--source", "openwebtext", "--out", tmp_path / "data")
    assert rc == 2 and err == "error: the openwebtext source needs Hugging Face datasets: pip install datasets\n"


def test_openwebtext_offline(tmp_path, capsys, monkeypatch):
    def load_dataset(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'Skylion007/openwebtext' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    rc, _, err = run_cli(capsys, "--source", "openwebtext", "--out", tmp_path / "data")
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: could not download Skylion007/openwebtext")
    assert not (tmp_path / "raw" / "openwebtext").exists()


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--out", "--tokenizer", "--val-fraction", "--force", "--workers", "--vocab-file", "--source"):
        assert flag in text
