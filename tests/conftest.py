"""Fixtures shared by several test modules."""

import base64
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def fake_vocab(tmp_path_factory) -> Path:
    """A tiny BPE ranks file standing in for o200k_base: 256 single bytes and merges up to "hello"."""
    ranks = {bytes([b]): b for b in range(256)}
    for token in (b"he", b"ll", b"hell", b"hello"):
        ranks[token] = len(ranks)
    path = tmp_path_factory.mktemp("vocab") / "fake_o200k_base.tiktoken"
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in ranks.items()))
    return path


@pytest.fixture
def one_thread():
    """One thread: on a busy 2-core machine a second OpenMP thread makes tiny ops many times slower. A module opts
    in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
