"""Write train.txt and eval.txt, the prototype's plain-text corpus files.

    python prep_corpus.py                                   # ~150 MB of OpenWebText (internet + pip install datasets)
    python prep_corpus.py --input novels/ --input notes.txt --out_dir corpus      # from local text files instead

Every document (a web page, or a local file) is split in two: its last --eval_fraction of characters goes to
eval.txt, the rest to train.txt, so eval is unseen text from every document. Documents are separated by a blank
line. `ossgpt prepare` is the fuller path to training data (token files, document separators, a compact
vocabulary); this script keeps the prototype's interface, reading files the same way `ossgpt prepare` does.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from ossgpt.atomic import atomic_output
from ossgpt.data.download import openwebtext_documents
from ossgpt.data.prepare import find_input_files, note_encoding, read_text
from ossgpt.errors import UserError

DOCUMENT_SEPARATOR = "\n\n"


def local_documents(inputs: list[str]) -> Iterator[str]:
    """The text of each file named by `inputs` (files, or folders searched recursively)."""
    for path in find_input_files(inputs):
        text, encoding = read_text(path)
        note_encoding(path, encoding)
        yield text


def split_text(text: str, eval_fraction: float) -> tuple[str, str]:
    """(train, eval): the last floor(eval_fraction * len(text)) characters are eval."""
    cut = len(text) - int(len(text) * eval_fraction)
    return text[:cut], text[cut:]


def write_corpus(documents: Iterable[str], out_dir: Path, eval_fraction: float) -> tuple[int, int]:
    """Write out_dir/train.txt and out_dir/eval.txt; both appear only once both are complete.

    Returns the number of characters in each.
    """
    if not 0 <= eval_fraction < 0.5:
        raise UserError(f"--eval_fraction must be in [0, 0.5), got {eval_fraction}")
    train_parts, eval_parts = [], []
    for text in documents:
        if text.strip():  # a blank document would only add separators
            train, held_out = split_text(text, eval_fraction)
            train_parts.append(train)
            eval_parts += [held_out] if held_out else []
    if not train_parts:
        raise UserError("all inputs are empty (no text but whitespace); pass files that contain text")
    train_text, eval_text = DOCUMENT_SEPARATOR.join(train_parts), DOCUMENT_SEPARATOR.join(eval_parts)
    with atomic_output(out_dir / "train.txt") as train_tmp, atomic_output(out_dir / "eval.txt") as eval_tmp:
        train_tmp.write_text(train_text, encoding="utf-8")
        eval_tmp.write_text(eval_text, encoding="utf-8")
    return len(train_text), len(eval_text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="FILE_OR_DIR",
        help="local text file or folder (repeatable); without it, download an OpenWebText sample",
    )
    parser.add_argument("--out_dir", default=".", help="folder for train.txt and eval.txt (default: .)")
    parser.add_argument(
        "--eval_fraction",
        type=float,
        default=0.05,
        help="share of each document, from its end, written to eval.txt; in [0, 0.5) (default: 0.05)",
    )
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir)
    try:
        documents = local_documents(args.input) if args.input else openwebtext_documents()
        n_train, n_eval = write_corpus(documents, out_dir, args.eval_fraction)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out_dir / 'train.txt'} ({n_train:,} characters) and {out_dir / 'eval.txt'} ({n_eval:,} characters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
