"""Public corpora to train on, for users with internet: `fetch_source(name, dest_dir)` -> local text to prepare.

  shakespeare  the classic 1.1 MB "tiny Shakespeare" of Karpathy's char-rnn, one file
  openwebtext  a ~150 MB sample of OpenWebText (an open GPT-2 WebText replica), streamed through Hugging Face
               `datasets` (pip install datasets): one text file per web page

Without internet, pass local text files to `ossgpt prepare` instead; these sources fail with a one-line error.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from ossgpt.atomic import atomic_output
from ossgpt.errors import UserError

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
OPENWEBTEXT_DATASET = "Skylion007/openwebtext"
OPENWEBTEXT_SAMPLE_BYTES = 150_000_000  # the prototype's sample size: enough for the mini preset, quick to fetch
DOCUMENTS_PER_FOLDER = 1000  # keeps folders listable when a sample has tens of thousands of pages
TIMEOUT_S = 60
SOURCES = ("shakespeare", "openwebtext")
OFFLINE_HINT = "you are offline? pass local text files instead"


def fetch_source(name: str, dest_dir: str | Path, max_bytes: int = OPENWEBTEXT_SAMPLE_BYTES) -> Path:
    """Download source `name` into `dest_dir` (reusing an earlier download) and return its file or folder.

    max_bytes: how much OpenWebText text to take (UTF-8 bytes), whole pages only.
    """
    dest_dir = Path(dest_dir)
    if name == "shakespeare":
        return _fetch_shakespeare(dest_dir / "tinyshakespeare.txt")
    if name == "openwebtext":
        return _fetch_openwebtext(dest_dir / "openwebtext", max_bytes)
    raise UserError(f"unknown source {name!r}; choose one of: {', '.join(SOURCES)}")


def _fetch_shakespeare(path: Path) -> Path:
    if path.exists():
        return path
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=TIMEOUT_S) as response:
            data = response.read()
    except OSError as err:  # URLError, HTTPError and timeouts are all OSErrors
        reason = getattr(err, "reason", None) or err
        raise UserError(f"could not download {SHAKESPEARE_URL}: {reason}; {OFFLINE_HINT}") from err
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    return path


def _fetch_openwebtext(folder: Path, max_bytes: int) -> Path:
    if folder.exists():
        return folder
    with atomic_output(folder) as tmp:
        for i, text in enumerate(openwebtext_documents(max_bytes)):
            path = tmp / f"{i // DOCUMENTS_PER_FOLDER:05d}" / f"{i:08d}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    return folder


def openwebtext_documents(max_bytes: int = OPENWEBTEXT_SAMPLE_BYTES) -> Iterator[str]:
    """The first OpenWebText pages, streamed, until they add up to at least `max_bytes` UTF-8 bytes."""
    try:
        import datasets
    except ImportError as err:
        raise UserError("the openwebtext source needs Hugging Face datasets: pip install datasets") from err
    total = 0
    try:
        for row in datasets.load_dataset(OPENWEBTEXT_DATASET, split="train", streaming=True):
            yield row["text"]
            total += len(row["text"].encode("utf-8"))
            if total >= max_bytes:
                return
    except OSError as err:  # connection, HTTP and hub errors are all OSErrors
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"could not download {OPENWEBTEXT_DATASET}: {reason}; {OFFLINE_HINT}") from err
