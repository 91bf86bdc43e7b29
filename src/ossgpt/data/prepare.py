"""Tokenize text files into a prepared data folder, the input of training and evaluation.

    prepare(["novels/", "notes.txt"], "data/novels", tokenizer="cl100k_base:8192")

writes data/novels/ with
  train.bin, val.bin  token ids as raw uint32 (see ossgpt.data.tokens)
  meta.json           tokenizer spec, vocab_size, eot_token_id, token and byte counts, one entry per source file
  tokenizer.json      what `ossgpt.tokenizer.load_tokenizer(spec, data_dir)` needs to rebuild the tokenizer

Every input file is one document: its tokens are followed by <|endoftext|>, which tells the model where one
document ends and an unrelated one begins. The last `val_fraction` of each document's tokens goes to val.bin and
the rest to train.bin, so validation text is unseen text from every source rather than a held-out source.

A compact tokenizer ("BASE:K") is fitted on the train split only, so val.bin stays honest held-out text.
The folder appears complete or not at all: it is written under a temporary name and renamed at the end.

`prepare_train_eval` builds a data folder from separate train and eval text files (for the prototype's main.py).
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ossgpt import __version__
from ossgpt.atomic import atomic_output
from ossgpt.data.tokens import TOKEN_DTYPE, write_tokens
from ossgpt.errors import UserError
from ossgpt.tokenizer import TOKENIZER_FILE, CompactTokenizer, load_tokenizer, split_spec

META_KEYS = ("tokenizer", "vocab_size", "eot_token_id", "train_tokens", "val_tokens", "val_bytes")
MIN_FILES_FOR_WORKERS = 4  # below this, starting worker processes costs more than it saves


@dataclass
class Document:
    """One input file, tokenized."""

    path: Path
    encoding: str  # the text encoding that decoded the file
    n_bytes: int  # UTF-8 bytes of its text
    tokens: np.ndarray  # [T] uint32 ids of the base tokenizer; empty for a blank file


def prepare(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    tokenizer: str = "cl100k_base",
    val_fraction: float = 0.05,
    force: bool = False,
    workers: int | None = None,
    vocab_file: str | Path | None = None,
) -> dict:
    """Tokenize `inputs` (text files and folders, searched recursively) into the data folder `out_dir`.

    tokenizer: a tokenizer spec (see ossgpt.tokenizer); "BASE:K" fits a compact vocabulary on the train split.
    val_fraction: share of each document's tokens, taken from its end, that goes to val.bin; in [0, 0.5).
    force: replace an existing `out_dir` (only once the new one is complete).
    workers: tokenizing processes; default one per CPU core, used when there are at least 4 files.
    vocab_file: a .tiktoken ranks file for the tiktoken encoding, instead of tiktoken's cache or download.
    Returns the contents of meta.json.
    """
    base_spec, compact_size = split_spec(tokenizer)
    if not 0 <= val_fraction < 0.5:
        raise UserError(f"val fraction must be in [0, 0.5), got {val_fraction}")
    if workers is not None and workers < 1:
        raise UserError(f"workers must be at least 1, got {workers}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output {out_dir} is a file, not a folder; choose another output folder")
    if out_dir.exists() and not force:
        raise UserError(f"output folder {out_dir} exists; pass --force to overwrite it")
    files = find_input_files(inputs)
    base = load_tokenizer(base_spec, vocab_file=vocab_file)  # fail on a missing vocabulary before any work

    documents = tokenize_files(files, base_spec, vocab_file, workers)
    for doc in documents:
        note_encoding(doc.path, doc.encoding)
        if not len(doc.tokens):
            print(f"note: {doc.path} is empty; skipped", file=sys.stderr)
    if not any(len(doc.tokens) for doc in documents):
        raise UserError("all inputs are empty (no text but whitespace); pass files that contain text")

    splits = [split_document(doc.tokens, val_fraction) for doc in documents]
    val_bytes = [len(base.decode_bytes(val)) for _, val in splits]  # the text behind each val part
    if compact_size is None:
        tok = base
    else:
        train_counts = np.bincount(np.concatenate([train for train, _ in splits]))
        seen = np.flatnonzero(train_counts)
        counts = dict(zip(seen.tolist(), train_counts[seen].tolist(), strict=True))
        tok = CompactTokenizer.fit(base_spec, counts, compact_size, vocab_file)
        # Map each part on its own: a base-token boundary is a compact-token boundary too.
        splits = [tuple(np.asarray(tok.from_base_ids(part.tolist()), dtype=TOKEN_DTYPE) for part in s) for s in splits]

    eot = np.array([tok.eot_token_id], dtype=TOKEN_DTYPE)
    meta = {
        "tokenizer": tok.spec,
        "vocab_size": tok.vocab_size,
        "eot_token_id": tok.eot_token_id,
        "dtype": "uint32",
        "val_fraction": val_fraction,
        # token counts include the <|endoftext|> after each part; byte counts are the text's UTF-8 bytes only
        "train_tokens": sum(len(train) + 1 for train, _ in splits if len(train)),
        "val_tokens": sum(len(val) + 1 for _, val in splits if len(val)),
        "train_bytes": sum(doc.n_bytes for doc in documents if len(doc.tokens)) - sum(val_bytes),
        "val_bytes": sum(val_bytes),
        "files": len(files),
        "sources": [
            {"path": str(doc.path), "bytes": doc.n_bytes, "tokens": len(train) + len(val), "encoding": doc.encoding}
            for doc, (train, val) in zip(documents, splits, strict=True)
        ],
        "ossgpt_version": __version__,
    }
    with atomic_output(out_dir) as tmp:
        tmp.mkdir()
        write_tokens(tmp / "train.bin", [part for train, _ in splits if len(train) for part in (train, eot)])
        write_tokens(tmp / "val.bin", [part for _, val in splits if len(val) for part in (val, eot)])
        tok.save(tmp)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def read_meta(data_dir: str | Path) -> dict:
    """A data folder's meta.json, after checking that the folder holds what training needs."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(
            f"data folder {data_dir} does not exist; create it with `ossgpt prepare TEXT... --out {data_dir}`"
        )
    path = data_dir / "meta.json"
    if not path.is_file():
        raise UserError(f"{data_dir} has no meta.json: not a data folder written by `ossgpt prepare`")
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{path} is not valid JSON; re-run `ossgpt prepare`") from None
    missing = [key for key in META_KEYS if not isinstance(meta, dict) or key not in meta]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}; re-run `ossgpt prepare`")
    if not (data_dir / TOKENIZER_FILE).is_file():
        raise UserError(f"{data_dir} has no {TOKENIZER_FILE}; re-run `ossgpt prepare`")
    return meta


# --- reading inputs -------------------------------------------------------------------------------------------
def find_input_files(inputs: Sequence[str | Path]) -> list[Path]:
    """The files named by `inputs`: files as given, folders as all their non-hidden files, recursively and sorted."""
    if isinstance(inputs, (str, Path)):  # one path, not a sequence of one-character names
        inputs = [inputs]
    if not inputs:
        raise UserError("no input files given; pass text files or folders")
    files = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise UserError(f"no files found in folder {path}; pass a folder holding text files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        elif path.exists():
            raise UserError(f"input {path} is neither a file nor a folder; pass text files or folders")
        else:
            raise UserError(f"input {path} does not exist; check the path")
    return files


def read_text(path: str | Path) -> tuple[str, str]:
    """A file's text and the encoding that decoded it: UTF-8, else cp1252 (Windows' Latin), else Latin-1."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from err
    for encoding in ("utf-8", "cp1252"):
        try:
            return data.decode(encoding), encoding
        except UnicodeDecodeError:
            pass
    return data.decode("latin-1"), "latin-1"  # maps every byte to a character, so it never fails


def note_encoding(path: str | Path, encoding: str) -> None:
    """Tell the user (one stderr line) when a file was not UTF-8, since its text was decoded by a guess."""
    if encoding != "utf-8":
        print(f"note: {path} is not valid UTF-8; decoded as {encoding}", file=sys.stderr)


# --- tokenizing -----------------------------------------------------------------------------------------------
def tokenize_file(path: Path, spec: str, vocab_file: str | Path | None = None) -> Document:
    """Read and tokenize one file (as ordinary text: special-token text in it is not special)."""
    text, encoding = read_text(path)
    tokens = load_tokenizer(spec, vocab_file=vocab_file).encode_ordinary(text) if text.strip() else []
    return Document(path, encoding, len(text.encode("utf-8")), np.asarray(tokens, dtype=TOKEN_DTYPE))


def tokenize_files(
    files: Sequence[Path], spec: str, vocab_file: str | Path | None = None, workers: int | None = None
) -> list[Document]:
    """`tokenize_file` on each file, in order; in several processes when there are many files."""
    workers = min(workers or os.cpu_count() or 1, len(files))
    work = functools.partial(tokenize_file, spec=spec, vocab_file=vocab_file)
    show = sys.stderr.isatty()
    progress = functools.partial(tqdm, total=len(files), desc="tokenizing", unit="file", disable=not show)
    if workers < 2 or len(files) < MIN_FILES_FOR_WORKERS:
        return list(progress(map(work, files)))
    # spawn rather than fork: forking a process whose libraries (torch, tqdm) run threads can deadlock the child.
    # Batches of files per task: a sample of web pages has tens of thousands of small files.
    chunksize = max(1, len(files) // (8 * workers))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(progress(pool.map(work, files, chunksize=chunksize)))  # map keeps the order: deterministic


def split_document(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, val): the last floor(val_fraction * T) tokens are val."""
    cut = len(tokens) - int(len(tokens) * val_fraction)
    return tokens[:cut], tokens[cut:]


def prepare_train_eval(
    train_files: Sequence[str | Path], eval_files: Sequence[str | Path], out_dir: str | Path, tokenizer: str
) -> dict:
    """Write a data folder whose train.bin holds `train_files` and val.bin `eval_files` (each file one document,
    as `ossgpt prepare` does; a compact tokenizer is fitted on the train files only). Replaces `out_dir`.
    Returns meta.json's contents."""
    with atomic_output(out_dir) as tmp:
        meta = prepare(train_files, tmp, tokenizer=tokenizer, val_fraction=0.0)
        tok = load_tokenizer(meta["tokenizer"], tmp)
        eot = np.array([tok.eot_token_id], dtype=TOKEN_DTYPE)
        parts, n_bytes = [], 0
        for path in find_input_files(eval_files):
            text, encoding = read_text(path)
            note_encoding(path, encoding)
            if text.strip():
                parts += [np.asarray(tok.encode_ordinary(text), dtype=TOKEN_DTYPE), eot]
                n_bytes += len(text.encode("utf-8"))
        write_tokens(tmp / "val.bin", parts)
        meta.update(val_tokens=sum(len(p) for p in parts), val_bytes=n_bytes, val_files=[str(p) for p in eval_files])
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta
