"""What `ossgpt serve` delivers to concurrent streaming clients, beside `generate_batch` in the same run.

For each shape (`mini`, `tiny`; random weights saved as a checkpoint), this starts `ossgpt serve` on it in a
subprocess, then in each of R rounds measures, one after another:

  generate_batch    8 prompts decoded together in this process (greedy, no stop token): the batch's tokens/s
  N clients         N concurrent streaming clients (httpx, asyncio), each sending `--requests` completions in
                    turn (greedy, fixed max_tokens): aggregate tokens/s over the level's wall time, and each
                    request's time to first token (until the first chunk that carries text). They start together
                    and, with equal max_tokens, stay in step: every request arrives with 15 others, a burst.
  16 staggered      the same 16 clients, client i starting i/16 of a request's time (at 16 clients) after the
                    first: they stay spread out, so each request arrives alone and joins the running batch
  prefill bound     in this process, the engine's prefill of the 16 prompts together over that of one: when 16
                    requests arrive together and prefill is bound by compute, no server can give them their first
                    token sooner than this ratio of one request's

and prints a markdown table (medians of tokens/s over the rounds; time-to-first-token percentiles over every
request of every round) with the ratios the server is held to:

  8 clients / generate_batch at 8   >= 90%   the server's own cost (HTTP, tokenizing, scheduling) is <= 10%
  16 clients / 1 client             >= 4x    continuous batching shares each weight read among the clients
  TTFT p50 at 16 / at 1             <= 2x    a new request joins the running batch instead of waiting for it
                                             (shown for the burst, beside its prefill bound, and staggered)

The clients share this machine's cores with the server (generate_batch runs alone, while the server is idle; the
table shows the clients' own CPU time over the level's wall time), so on a machine others use too, compare ratios
within one run rather than numbers across runs. The server gets this process's torch thread count (`--threads`):
both sides of a ratio compute with the same threads.

    python bench/serve.py                      # mini and tiny, 3 rounds, 64 tokens a request
    python bench/serve.py --quick              # smoke run: tiny, one round, 8 tokens a request
    python bench/serve.py --shapes mini --rounds 5 --threads 1 --json serve.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from ossgpt import GPTOSSConfig, GPTOSSForCausalLM
from ossgpt.errors import UserError
from ossgpt.inference.engine import Engine, Request
from ossgpt.inference.generate import generate_batch
from ossgpt.inference.loading import load_model_and_tokenizer
from ossgpt.tokenizer import CompactTokenizer
from ossgpt.training.logger import environment_lines

LEVELS = (1, 4, 8, 16)
STAGGERED = "16 staggered"
GOALS = {"server_vs_generate_batch": 0.9, "scaling_16_vs_1": 4.0, "ttft_16_vs_1": 2.0, "ttft_16_staggered_vs_1": 2.0}
PASSAGE = (
    "The server admits new requests between decode steps, so every client shares each read of the weights; "
    "this prompt is long enough that prefill is part of the work"
)


def save_random_checkpoint(shape: str, directory: Path) -> None:
    """A random model of the preset `shape`, with its tokenizer: tiny's compact vocabulary is fitted to arbitrary
    cl100k tokens (random weights make the choice of tokens irrelevant)."""
    torch.manual_seed(0)
    config = GPTOSSConfig.from_preset(shape)
    GPTOSSForCausalLM(config).save_pretrained(directory)
    base, _, size = config.tokenizer.partition(":")
    if size:
        counts = {token: 1 for token in range(256, 256 + 2 * int(size))}  # cl100k ids >= 256 are multi-byte
        CompactTokenizer.fit(base, counts, int(size)).save(directory)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`ossgpt serve --checkpoint DIR` in a subprocess, until the `with` block ends, with as many torch threads as
    this process (so that the server and generate_batch compute alike)."""

    def __init__(self, checkpoint: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "ossgpt", "serve", "--checkpoint", str(checkpoint), "--port", str(self.port)]
        self.log = tempfile.TemporaryFile()
        env = os.environ | {"OMP_NUM_THREADS": str(torch.get_num_threads())}  # torch's intra-op threads
        self.process = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def __enter__(self) -> Server:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.__exit__()
        raise RuntimeError(f"ossgpt serve did not come up:\n{self.output()}")

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-4000:]


async def one_request(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> tuple[float, int]:
    """Stream one greedy completion: (seconds to the first chunk with text, completion tokens)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    start, first, tokens = time.perf_counter(), None, None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"POST /v1/completions: {response.status_code} {(await response.aread())[:500]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and any(choice.get("text") for choice in chunk.get("choices", ())):
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    if first is None or tokens is None:
        raise RuntimeError("a streamed completion came without text or without usage")
    return first, tokens


async def clients(url: str, model: str, prompts: list[str], requests: int, max_tokens: int, stagger: float = 0.0):
    """len(prompts) clients, each sending `requests` completions of its prompt in turn; client i starts after
    i * stagger seconds."""
    limits = httpx.Limits(max_connections=len(prompts))
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def one_client(i: int, prompt: str) -> list[tuple[float, int]]:
            await asyncio.sleep(i * stagger)
            return [await one_request(client, model, prompt, max_tokens) for _ in range(requests)]

        start, cpu = time.perf_counter(), time.process_time()
        results = await asyncio.gather(*(one_client(i, p) for i, p in enumerate(prompts)))
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    done = [r for client_results in results for r in client_results]
    short = sum(t < max_tokens for _, t in done)  # stopped at a stop token: less work than generate_batch's rows
    return {"tokens": sum(t for _, t in done), "seconds": seconds, "ttft": [f for f, _ in done], "short": short,
            "client_cpu": cpu / seconds}  # fmt: skip


def prefill_ratio(model, prompts: list[list[int]], repeats: int = 5) -> float:
    """The engine's prefill of all `prompts` together over its prefill of the first one alone (the fastest of
    `repeats` timings each): the least a burst of len(prompts) requests can wait over one request, where compute
    bounds prefill."""
    engine = Engine(model, max_batch=len(prompts), max_length=max(map(len, prompts)) + 2)

    def seconds(batch: list[list[int]]) -> float:
        for prompt in batch:
            engine.submit(Request(prompt, 2))
        start = time.perf_counter()
        engine.step()  # admits them all: one prefill, the first tokens
        elapsed = time.perf_counter() - start
        while not engine.idle:
            engine.step()
        return elapsed

    seconds(prompts)  # warm-up
    # The fastest of each: the least each prefill costs, what a bound wants (a busy machine only adds time).
    return min(seconds(prompts) for _ in range(repeats)) / min(seconds(prompts[:1]) for _ in range(repeats))


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), interpolated between the closest ranks."""
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def measure_shape(shape: str, rounds: int, requests: int, max_tokens: int) -> dict:
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = Path(directory)
        save_random_checkpoint(shape, checkpoint)
        model, tokenizer = load_model_and_tokenizer(checkpoint)
        prompts = [f"Client {i}. {PASSAGE}" for i in range(max(LEVELS))]
        batch = [tokenizer.encode(p) for p in prompts[:8]]
        bound = prefill_ratio(model, [tokenizer.encode(p) for p in prompts])
        with Server(checkpoint) as server:
            name = httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]
            asyncio.run(clients(server.url, name, prompts[:8], 1, max_tokens))  # warm-up: the first runs are slow
            generate_batch(model, batch, max_tokens)
            speeds = {"generate_batch": []} | {level: [] for level in (*LEVELS, STAGGERED)}
            ttft = {level: [] for level in (*LEVELS, STAGGERED)}
            client_cpu = {level: [] for level in (*LEVELS, STAGGERED)}
            short = 0
            for i in range(1, rounds + 1):
                start = time.perf_counter()
                outputs = generate_batch(model, batch, max_tokens)  # no eos: every row makes max_tokens
                speeds["generate_batch"].append(sum(map(len, outputs)) / (time.perf_counter() - start))
                timings = {}
                for level in (*LEVELS, STAGGERED):
                    if level == STAGGERED:  # spread over the time one request took among 16, just measured
                        n, stagger = 16, timings[16]["seconds"] / requests / 16
                    else:
                        n, stagger = level, 0.0
                    timings[level] = asyncio.run(clients(server.url, name, prompts[:n], requests, max_tokens, stagger))
                    speeds[level].append(timings[level]["tokens"] / timings[level]["seconds"])
                    ttft[level] += timings[level]["ttft"]
                    client_cpu[level].append(timings[level]["client_cpu"])
                    short += timings[level]["short"]
                done = ", ".join(f"{level} {speeds[level][-1]:.0f}" for level in (*LEVELS, STAGGERED))
                print(f"{shape} round {i}/{rounds} (tokens/s): generate_batch {speeds['generate_batch'][-1]:.0f}, "
                      f"clients {done}", file=sys.stderr)  # fmt: skip
    median = {key: statistics.median(values) for key, values in speeds.items()}
    p50 = {level: percentile(ttft[level], 50) for level in ttft}
    return {
        "prompt_tokens": [len(ids) for ids in batch],
        "generate_batch_8_tokens_per_s": median["generate_batch"],
        "short_replies": short,
        "levels": {
            str(level): {
                "tokens_per_s": median[level],
                "ttft_p50_s": p50[level],
                "ttft_p99_s": percentile(ttft[level], 99),
                "requests": len(ttft[level]),
                "client_cpu": statistics.median(client_cpu[level]),
            }
            for level in ttft
        },
        "prefill_bound_16_vs_1": bound,
        "ratios": {
            "server_vs_generate_batch": median[8] / median["generate_batch"],
            "scaling_16_vs_1": median[16] / median[1],
            "ttft_16_vs_1": p50[16] / p50[1],
            "ttft_16_staggered_vs_1": p50[STAGGERED] / p50[1],
        },
    }


def met(key: str, ratio: float) -> bool:
    """Whether a ratio meets its goal: time to first token lower is better, throughput higher."""
    return ratio <= GOALS[key] if key.startswith("ttft") else ratio >= GOALS[key]


def print_table(results: dict, args) -> None:
    print("\n".join(environment_lines()))
    print(f"{args.rounds} round(s); {args.requests} request(s) per client per round; {args.max_tokens} tokens a "
          "request, greedy; tokens/s: medians over rounds; TTFT: over all requests")  # fmt: skip
    print()
    print("| shape | clients | tokens/s (aggregate) | TTFT p50 ms | TTFT p99 ms | requests | clients' CPU |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for shape, result in results.items():
        print(f"| {shape} | generate_batch, batch 8 | {result['generate_batch_8_tokens_per_s']:.1f} | | | | |")
        for level, row in result["levels"].items():
            print(f"| {shape} | {level} | {row['tokens_per_s']:.1f} | {1000 * row['ttft_p50_s']:.0f} | "
                  f"{1000 * row['ttft_p99_s']:.0f} | {row['requests']} | {row['client_cpu']:.0%} |")  # fmt: skip
    print()
    print("| shape | 8 clients / generate_batch at 8 (goal >= 90%) | 16 clients / 1 (goal >= 4x) | "
          "TTFT p50 16 / 1, burst (goal <= 2x; prefill bound) | TTFT p50 16 / 1, staggered (goal <= 2x) |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: |")
    for shape, result in results.items():
        ratios = result["ratios"]
        marks = {key: "ok" if met(key, value) else "MISSED" for key, value in ratios.items()}
        print(f"| {shape} | {ratios['server_vs_generate_batch']:.0%} {marks['server_vs_generate_batch']} | "
              f"{ratios['scaling_16_vs_1']:.2f}x {marks['scaling_16_vs_1']} | "
              f"{ratios['ttft_16_vs_1']:.2f}x {marks['ttft_16_vs_1']}; {result['prefill_bound_16_vs_1']:.2f}x | "
              f"{ratios['ttft_16_staggered_vs_1']:.2f}x {marks['ttft_16_staggered_vs_1']} |")  # fmt: skip
    for shape, result in results.items():
        if result["short_replies"]:
            print(f"\n{shape}: {result['short_replies']} replies ended at a stop token before {args.max_tokens} tokens")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny, one round, 8 tokens: checks the script works")
    parser.add_argument("--shapes", default=None, help="comma-separated presets (default mini,tiny; quick: tiny)")
    parser.add_argument("--rounds", type=int, default=0, help="rounds (default 3, quick 1)")
    parser.add_argument("--requests", type=int, default=0, help="requests per client per round (default 2, quick 1)")
    parser.add_argument("--max-tokens", type=int, default=0, help="tokens a request (default 64, quick 8)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads of the server and of generate_batch "
                        "(default: torch's, the cores); on a busy machine 1 gives steadier numbers")  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.requests = args.requests or (1 if args.quick else 2)
    args.max_tokens = args.max_tokens or (8 if args.quick else 64)
    shapes = (args.shapes or ("tiny" if args.quick else "mini,tiny")).split(",")
    try:
        results = {shape: measure_shape(shape, args.rounds, args.requests, args.max_tokens) for shape in shapes}
    except UserError as error:  # e.g. a tokenizer that cannot load offline: one line, exit 2
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print_table(results, args)
    if args.json:
        settings = {k: getattr(args, k) for k in ("rounds", "requests", "max_tokens", "threads")}
        record = {"environment": environment_lines(), **settings, "shapes": results}
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
