"""What tests of `ossgpt serve` share (tests/test_serve.py, tests/test_web_page.py): a tiny GPT-OSS in gpt-oss's
layout, `Scripted` (that model with replies scripted by marker text) and `serving` (an app on a live uvicorn).

A random model does not write well-formed Harmony, so the protocol tests script the reply: `Scripted` is the real
tiny model, run by the real engine and KV cache, whose last logits are replaced by a one-hot row on the scripted next
token when a request's prompt holds a script's marker text.
"""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import torch
import uvicorn

from ossgpt import GPTOSSConfig, GPTOSSForCausalLM


def tiny_config(**overrides) -> GPTOSSConfig:
    values = dict(vocab_size=201_088, tokenizer="o200k_harmony", eos_token_id=200_002, hidden_size=32,
                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_local_experts=2,
                  num_experts_per_tok=1, intermediate_size=32, max_position_embeddings=2048, sliding_window=8,
                  tie_word_embeddings=True)  # fmt: skip
    return GPTOSSConfig(**{**values, **overrides})


class Scripted(GPTOSSForCausalLM):
    """The tiny model, with replies scripted by marker. At a prefill whose prompt holds a marker's tokens (the latest
    one, if several), the reply is fixed: at position T-1+i, after token seq[i], the next token is seq[i+1] (seq: the
    prompt's last token, then the reply). Everything runs as usual; only the returned logits change. Each prefill
    replaces the script in force, so a request without a marker gets the random model's own logits, and scripted
    requests must run one at a time."""

    def __init__(self, config, tokenizer):
        super().__init__(config)
        self.tokenizer = tokenizer
        self.scripts: dict[tuple[int, ...], list[int]] = {}
        self.next: dict[tuple[int, int], int] = {}  # (position, token) -> the scripted next token
        self.prompts: list[list[int]] = []  # every prompt prefilled

    def script(self, marker: str, reply: str) -> str:
        """Make prompts holding `marker` get `reply` (Harmony text; it must end the turn); returns the marker."""
        reply_ids = self.tokenizer.encode(reply, allowed_special="all")
        self.scripts[tuple(self.tokenizer.encode_ordinary(marker))] = reply_ids
        return marker

    def forward(self, input_ids, *args, positions=None, cache=None, **kwargs):
        B, T = input_ids.shape
        if positions is None:  # as the model numbers them: after the columns already in the cache
            start = cache.seen if cache is not None else 0
            positions = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        out = super().forward(input_ids, *args, positions=positions, cache=cache, **kwargs)
        if T > 1:
            for prompt in input_ids.tolist():
                self._prefilled(prompt)
        for row in range(B):
            key = (int(positions[row, -1]), int(input_ids[row, -1]))
            if key in self.next:
                out.logits[row, -1] = float("-inf")
                out.logits[row, -1, self.next[key]] = 0.0
        return out

    def _prefilled(self, prompt: list[int]) -> None:
        self.prompts.append(prompt)
        found = [(end, marker) for marker in self.scripts for end in _ends(prompt, marker)]
        seq = [prompt[-1], *self.scripts[max(found)[1]]] if found else []
        self.next = {(len(prompt) - 1 + i, seq[i]): seq[i + 1] for i in range(len(seq) - 1)}


def _ends(sequence: list[int], part: tuple[int, ...]) -> list[int]:
    n = len(part)
    return [i + n for i in range(len(sequence) - n + 1) if tuple(sequence[i : i + n]) == part]


@contextmanager
def serving(app):
    """Run `app` on uvicorn in a thread, on a free port of 127.0.0.1; yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
