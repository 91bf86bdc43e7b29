"""prep_corpus.py, the prototype's train.txt/eval.txt script: local inputs, split, encodings, offline errors."""

import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "prep_corpus.py"


@pytest.fixture(scope="module")
def prep_corpus():
    spec = importlib.util.spec_from_file_location("prep_corpus", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def test_local_inputs(prep_corpus, tmp_path, capsys):
    a = "A" * 80 + "a" * 20
    b = "B" * 100
    write(tmp_path / "in" / "a.txt", a.encode())
    write(tmp_path / "in" / "nested" / "b.txt", b.encode())
    write(tmp_path / "in" / ".hidden", b"skipped")
    write(tmp_path / "latin1.txt", "caf\xe9".encode("latin-1") * 10)
    inputs = ["--input", str(tmp_path / "in"), "--input", str(tmp_path / "latin1.txt")]
    assert prep_corpus.main([*inputs, "--out_dir", str(tmp_path / "out"), "--eval_fraction", "0.2"]) == 0

    train = (tmp_path / "out" / "train.txt").read_text(encoding="utf-8")
    held_out = (tmp_path / "out" / "eval.txt").read_text(encoding="utf-8")
    assert train == "\n\n".join(["A" * 80, "B" * 80, "café" * 8])
    assert held_out == "\n\n".join(["a" * 20, "B" * 20, "café" * 2])
    err = capsys.readouterr().err
    assert "latin1.txt is not valid UTF-8; decoded as cp1252" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["eval.txt", "train.txt"]  # no temporaries


def test_split_text(prep_corpus):
    assert prep_corpus.split_text("abcdefghij", 0.3) == ("abcdefg", "hij")
    assert prep_corpus.split_text("abc", 0.0) == ("abc", "")


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    return err


def test_bad_inputs(prep_corpus, tmp_path, capsys):
    assert prep_corpus.main(["--input", str(tmp_path / "missing.txt"), "--out_dir", str(tmp_path)]) == 2
    assert "does not exist" in one_line_error(capsys)
    source = write(tmp_path / "a.txt", b"text")
    assert prep_corpus.main(["--input", str(source), "--eval_fraction", "0.7", "--out_dir", str(tmp_path)]) == 2
    assert "--eval_fraction must be in [0, 0.5)" in one_line_error(capsys)
    assert not (tmp_path / "train.txt").exists()


def test_without_datasets(prep_corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    assert prep_corpus.main(["--out_dir", str(tmp_path)]) == 2
    assert "pip install datasets" in one_line_error(capsys)


def test_offline(prep_corpus, tmp_path, capsys, monkeypatch):
    def load_dataset(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert prep_corpus.main(["--out_dir", str(tmp_path)]) == 2
    assert "offline? pass local text files instead" in one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []


def test_streamed_sample(prep_corpus, tmp_path, monkeypatch):
    pages = [{"text": f"page {i} " * 20} for i in range(10)]
    fake = types.SimpleNamespace(load_dataset=lambda name, split, streaming: iter(pages))
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert prep_corpus.main(["--out_dir", str(tmp_path), "--eval_fraction", "0.1"]) == 0
    train = (tmp_path / "train.txt").read_text()
    assert train.startswith("page 0 ") and "page 9 " in train


def test_runs_as_a_script(tmp_path):
    source = write(tmp_path / "a.txt", b"hello from a file\n")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--input", str(source), "--out_dir", str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "train.txt").read_text() + (tmp_path / "out" / "eval.txt").read_text() == (
        "hello from a file\n"
    )
