"""How the LM head's matmul scales with the number of rows (decoded sequences) per kernel, on this machine.

Batched decoding only pays if a step of B rows costs much less than B steps of one row. For the weight-only int8
kernel (`torch._weight_int8pack_mm`, ossgpt's `int8` decoding) this prints the time of one [rows, hidden] x
[vocab, hidden]^T product against the same product in float32 and bfloat16, against int8 activations too
(`torch._int_mm`, W8A8, where this torch has it on this device), and the two as ossgpt's decoding calls them
(`int8_linear`, `int8_dynamic_linear`: with the activation's conversion or quantization and the output's
scaling). BENCHMARKS.md's decode rows are explained with this table.

--cold reads a 512 MB buffer before every timed call, so that the weight comes from memory, as in decoding
(where the other layers' weights pass through the cache between two LM-head calls), not from a warm cache.

    python bench/int8_rows.py                     # mini's LM head: vocabulary 100,352, hidden 512
    python bench/int8_rows.py --cold              # the same, weight read from memory every call
    python bench/int8_rows.py --vocab 4096 --hidden 256 --repeats 3   # quick
"""

from __future__ import annotations

import argparse
import time

import torch

from ossgpt.kernels.int8 import int8_dynamic_linear, int8_linear


def timed_ms(fn, repeats: int, evict: torch.Tensor | None = None) -> float:
    """Median milliseconds of `repeats` calls after two warm-up calls; each call after reading `evict`, if given."""
    fn(), fn()
    times = []
    for _ in range(repeats):
        if evict is not None:
            evict.sum()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def kernels(rows: int, weight: torch.Tensor, scales: torch.Tensor) -> dict:
    """name -> a call computing x [rows, hidden] times weight^T in that kernel (None where unavailable)."""
    x = torch.randn(rows, weight.shape[1])
    x_bf16, weight_f32 = x.to(torch.bfloat16), weight.float()
    weight_bf16, weight_t = weight_f32.to(torch.bfloat16), weight.t()
    x_int8 = x.div(x.abs().amax(dim=1, keepdim=True) / 127).round().to(torch.int8)
    calls = {
        "int8 weights (_weight_int8pack_mm)": lambda: torch._weight_int8pack_mm(x_bf16, weight, scales),
        "float32": lambda: x @ weight_f32.T,
        "bfloat16": lambda: x_bf16 @ weight_bf16.T,
        "int8 weights and activations (_int_mm)": lambda: torch._int_mm(x_int8, weight_t),
        "int8_linear (ossgpt int8)": lambda: int8_linear(x, weight, scales),
        "int8_dynamic_linear (ossgpt int8-dynamic)": lambda: int8_dynamic_linear(x, weight, scales),
    }
    for name, call in list(calls.items()):
        try:
            call()
        except (RuntimeError, AttributeError, NotImplementedError):
            calls[name] = None
    return calls


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=100_352)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--cold", action="store_true", help="read 512 MB before every call (weight from memory)")
    args = parser.parse_args(argv)
    evict = torch.ones(128 * 2**20) if args.cold else None
    weight = torch.randint(-127, 128, (args.vocab, args.hidden), dtype=torch.int8)
    scales = torch.rand(args.vocab, dtype=torch.bfloat16)
    results = {rows: kernels(rows, weight, scales) for rows in args.rows}
    names = list(results[args.rows[0]])
    where = "weight read from memory (--cold)" if args.cold else "weight warm in cache"
    print(f"ms per [rows, {args.hidden}] x [{args.vocab}, {args.hidden}]^T, {torch.get_num_threads()} threads, {where}")
    print("| rows | " + " | ".join(names) + " |")
    print("| ---: |" + " ---: |" * len(names))
    for rows, calls in results.items():
        cells = [f"{timed_ms(call, args.repeats, evict):.3f}" if call else "n/a" for call in calls.values()]
        print(f"| {rows} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
