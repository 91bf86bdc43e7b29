"""What the LM head and its loss cost in a `mini` training step, against the matmul bound, on this machine.

The training row of bench/run.py counts every FLOP at the float32 rate of a 2048^3 product. 80% of those FLOPs
are the LM head's: logits = x W^T, dx = dlogits W, dW = dlogits^T x, for 1,020 rows against the 100,352 x 512
vocabulary, which the chunked loss (ossgpt.kernels.loss) forms 512 rows at a time. This measures, in one process:

  gemm 2048^3      the bound's own product, its FLOP/s
  lm-head gemms    the three products alone, per chunk as the loss runs them (into preallocated outputs)
  loss fwd+bwd     `linear_cross_entropy` forward and backward: the products plus the softmax passes

and prints each one's FLOP/s and share of the 2048^3 rate: how close the step's largest part can come to the
bound at these shapes. The process keeps freed memory for reuse, as `ossgpt train` does on CPU. With `--dtype
bfloat16` every product is bfloat16 (the bound too) and the loss runs under autocast, as training does by default
on a CPU with native bfloat16 matmuls.

    python bench/lm_head.py                     # mini: 1,020 rows, vocabulary 100,352, hidden 512, chunks of 512
    python bench/lm_head.py --dtype bfloat16    # the same in bfloat16 (autocast)
    python bench/lm_head.py --quick             # smoke run on small shapes
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ossgpt.kernels.loss import linear_cross_entropy
from ossgpt.training.host_memory import keep_freed_memory


def timed_s(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, 2 rounds: checks the script works")
    parser.add_argument("--rounds", type=int, default=0, help="rounds (default 5, quick 2); medians are reported")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="the products' dtype")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    keep_freed_memory()
    rows, vocab, hidden, chunk, n = (120, 4096, 64, 64, 256) if args.quick else (1020, 100_352, 512, 512, 2048)
    rounds = args.rounds or (2 if args.quick else 5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, hidden, generator=g, requires_grad=True)
    weight = (torch.randn(vocab, hidden, generator=g) * 0.02).requires_grad_()
    labels = torch.randint(0, vocab, (rows,), generator=g)
    a, b = torch.randn(n, n, generator=g, dtype=dtype), torch.randn(n, n, generator=g, dtype=dtype)
    workspace: dict = {}

    chunks = [(start, min(start + chunk, rows)) for start in range(0, rows, chunk)]
    xd, wd = x.detach().to(dtype), weight.detach().to(dtype)  # the products' operands (autocast's casts)
    logits, grad_logits = torch.empty(chunk, vocab, dtype=dtype), torch.randn(chunk, vocab, generator=g, dtype=dtype)
    grad_x, grad_w = torch.empty(rows, hidden, dtype=dtype), torch.empty(vocab, hidden, dtype=dtype)

    def gemms():
        with torch.no_grad():
            for i, (lo, hi) in enumerate(chunks):
                c = hi - lo
                torch.mm(xd[lo:hi], wd.t(), out=logits[:c])
                torch.mm(grad_logits[:c], wd, out=grad_x[lo:hi])
                if i == 0:
                    torch.mm(grad_logits[:c].t(), xd[lo:hi], out=grad_w)
                else:
                    grad_w.addmm_(grad_logits[:c].t(), xd[lo:hi])

    def loss():
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            value = linear_cross_entropy(x, weight, labels, chunk_size=chunk, workspace=workspace)
        value.backward()
        x.grad = weight.grad = None

    lm_flops = 3 * 2 * rows * vocab * hidden
    work = {
        f"gemm {n}^3": (lambda: a @ b, 2 * n**3),
        f"lm-head gemms ({len(chunks)} chunks of <= {chunk} rows)": (gemms, lm_flops),
        "loss fwd+bwd (linear_cross_entropy)": (loss, lm_flops),
    }
    for fn, _ in work.values():  # warm-up
        fn()
    samples = {name: [] for name in work}
    for _ in range(rounds):
        for name, (fn, _) in work.items():
            samples[name].append(timed_s(fn))
    seconds = {name: statistics.median(values) for name, values in samples.items()}
    rate = {name: work[name][1] / seconds[name] for name in work}
    bound = rate[f"gemm {n}^3"]
    print(
        f"{torch.get_num_threads()} threads, {rounds} rounds, medians; rows {rows}, vocabulary {vocab}, "
        f"hidden {hidden}, {args.dtype}"
    )
    print(f"| part | ms | GFLOP/s | share of the {n}^3 rate |")
    print("| --- | ---: | ---: | ---: |")
    for name in work:
        print(f"| {name} | {1000 * seconds[name]:.1f} | {rate[name] / 1e9:.1f} | {rate[name] / bound:.0%} |")


if __name__ == "__main__":
    main()
