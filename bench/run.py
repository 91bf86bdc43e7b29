"""Benchmarks: ossgpt against Hugging Face transformers' GptOss, on this machine, with the machine's own bounds.

    python bench/run.py                       # the full table, `mini` shapes (a few minutes on 2 CPU cores)
    python bench/run.py --quick               # smoke run: tiny shapes, one round (checks the script works)
    python bench/run.py --rounds 7 --json out.json --rows train,decode

Prints a markdown table and writes the same rows as JSON (default bench/results.json). Every row is measured
the same way: R rounds; in each round the machine bounds are measured again, then every row's ossgpt and
reference runs, alternating which goes first; a row reports the medians over the rounds. Interleaving matters
on a shared machine: whatever else runs then slows both sides of a comparison alike.

Columns: ossgpt and reference in the row's unit (throughput: higher is better; memory: lower is better),
ratio = ossgpt / reference (memory: reference / ossgpt, so > 1 is better everywhere), the row's goal, the bound
this machine puts on ossgpt's number (from the measured matmul FLOP/s or memory bandwidth and the FLOPs or
bytes the work needs, see `train_flops_per_token`, `decode_bytes_per_step`) and ossgpt's share of it.

The reference is transformers' GptOssForCausalLM as it runs by default (eager attention, the `grouped_mm`
experts dispatch), float32, loaded with the same weights. Both sides train with torch's fused AdamW.

The training rows run each side in a worker process of its own (`TrainWorker`), still one at a time and
interleaved: `ossgpt train` keeps freed memory for reuse on CPU (ossgpt.training.host_memory), a process-wide
allocator setting, and each side is measured as it runs by default. The peak-memory row runs each side in a
fresh process too. The MoE and decode rows run both sides in this process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ossgpt import GPTOSSConfig, GPTOSSForCausalLM
from ossgpt.checkpoint.hf_config import config_to_hf
from ossgpt.devices import DTYPES, resolve_dtype
from ossgpt.inference.loading import hold_input_major
from ossgpt.model.moe import Experts
from ossgpt.quant.int8 import quantize_for_decoding
from ossgpt.training.host_memory import keep_freed_memory

# The trainer's compute dtype on this CPU: bfloat16 autocast where bfloat16 matmuls are native, else float32.
DEFAULT_TRAIN_DTYPE = DTYPES[resolve_dtype("auto", torch.device("cpu"), autocast=True)]
# bfloat16 matmuls this many times slower than float32 ones are taken as emulated: the bf16 training row is skipped.
BF16_EMULATED_BELOW = 20


# ---------------------------------------------------------------------------------------------- shapes
@dataclass
class Shapes:
    preset: str
    batch: int
    seq_len: int
    moe: dict  # experts, top_k, hidden, intermediate, tokens
    prompt_len: int
    new_tokens: int
    decode_batch: int
    overrides: dict = field(default_factory=dict)  # applied to the preset


FULL = Shapes("mini", 4, 256, dict(experts=32, top_k=4, hidden=512, intermediate=768, tokens=1024), 16, 64, 8)
QUICK = Shapes(
    "tiny", 2, 32, dict(experts=8, top_k=2, hidden=64, intermediate=64, tokens=64), 4, 4, 2,
    overrides=dict(hidden_size=64, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                   vocab_size=512, eos_token_id=0, sliding_window=16, max_position_embeddings=128),
)  # fmt: skip


def model_config(shapes: Shapes) -> GPTOSSConfig:
    return GPTOSSConfig.from_preset(shapes.preset, **shapes.overrides)


# ---------------------------------------------------------------------------------------------- models
def build_pair(config: GPTOSSConfig, seed: int = 0):
    """ossgpt's model and transformers' GptOssForCausalLM with the same weights (float32)."""
    torch.manual_seed(seed)
    ours = GPTOSSForCausalLM(config)
    with torch.no_grad():  # non-zero biases and sinks, so that both sides really use them
        for name, p in ours.named_parameters():
            if name.endswith("bias") or name.endswith("sinks"):
                p.normal_(0, 0.02)
    hf = build_hf(config)
    state = {(k if k.startswith("lm_head") else "model." + k): v for k, v in ours.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "rotary" not in k]:
        raise RuntimeError(f"weights did not map onto the HF model: missing {missing}, unexpected {unexpected}")
    return ours, hf


def build_hf(config: GPTOSSConfig):
    """transformers' GptOssForCausalLM for `config` (random weights)."""
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers.GptOssForCausalLM(transformers.GptOssConfig(**config_to_hf(config)))


def fused_adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)


# ---------------------------------------------------------------------------------------------- FLOPs / bytes
def matmul_params_per_token(config: GPTOSSConfig, experts_read: float | None = None) -> dict[str, float]:
    """Weights each token multiplies by (the active experts only), by part."""
    H, I, D = config.hidden_size, config.intermediate_size, config.head_dim  # noqa: E741
    attention = H * D * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    experts = config.num_experts_per_tok if experts_read is None else experts_read
    return {
        "attention": config.num_hidden_layers * attention,
        "router": config.num_hidden_layers * H * config.num_local_experts,
        "experts": config.num_hidden_layers * experts * 3 * H * I,
        "lm_head": config.vocab_size * H,
    }


def train_flops_per_token(config: GPTOSSConfig, seq_len: int) -> float:
    """Model FLOPs of one training token: 3 x forward (backward = 2 x forward), forward = 2 x weights used + the
    attention scores and values over the keys a token sees (causal mean (T+1)/2, at most the window)."""
    dense = 2 * sum(matmul_params_per_token(config).values())
    keys = 0.0
    for kind in config.layer_types:
        visible = [min(t + 1, config.sliding_window) if kind == "sliding_attention" else t + 1 for t in range(seq_len)]
        keys += sum(visible) / seq_len
    attention = 2 * 2 * config.num_attention_heads * config.head_dim * keys
    return 3 * (dense + attention)


def floor_config(config: GPTOSSConfig) -> GPTOSSConfig:
    """`config` with the same layers, heads and experts but tiny matrices (hidden 64, vocabulary 512)."""
    return config.replace(hidden_size=64, intermediate_size=64, head_dim=16, vocab_size=512, eos_token_id=0)


def decode_bytes_per_step(config: GPTOSSConfig, batch: int, context: int, weights: str) -> float:
    """Bytes one decoding step must read: every weight it uses once (the experts that any row of the batch routes
    to, expected under uniform routing), biases, and the KV cache (float32)."""
    E, k = config.num_local_experts, config.num_experts_per_tok
    experts_read = E * (1 - (1 - k / E) ** batch)
    params = matmul_params_per_token(config, experts_read)
    weight_bytes = 1 if weights == "int8" else 4
    total = sum(params.values()) * weight_bytes
    if weights == "int8":  # one bfloat16 scale per output channel of each int8 matrix
        H, I = config.hidden_size, config.intermediate_size  # noqa: E741
        per_layer = 2 * (config.num_attention_heads + config.num_key_value_heads) * config.head_dim
        per_layer += experts_read * (2 * I + H)
        total += 2 * (config.num_hidden_layers * per_layer + config.vocab_size)
    kv = 2 * config.num_key_value_heads * config.head_dim * 4 * batch
    total += sum(kv * (min(context, config.sliding_window) if kind == "sliding_attention" else context)
                 for kind in config.layer_types)  # fmt: skip
    return total


# ---------------------------------------------------------------------------------------------- timing
def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure_bounds(quick: bool) -> dict[str, float]:
    """Matmul FLOP/s (float32, bfloat16) and memory bandwidth (a float32 GEMV or sum over a matrix larger than the
    caches), each the best of 3 calls."""
    n = 512 if quick else 2048
    bounds = {}
    for name, dtype in (("fp32 matmul", torch.float32), ("bf16 matmul", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        bounds[name] = 2 * n**3 / min(timed(lambda a=a, b=b: a @ b) for _ in range(3))
    rows, cols = (2048, 2048) if quick else (16384, 8192)  # 512 MB: twice this machine's L3
    w, x = torch.randn(rows, cols), torch.randn(1, cols)
    F.linear(x, w)
    w.sum()
    # Also a sum: MKL's GEMV does not stream at the full rate on every CPU (an AMD EPYC's, in BENCHMARKS.md).
    seconds = min(timed(fn) for fn in [lambda: F.linear(x, w), w.sum] * 3)
    bounds["memory bandwidth"] = w.numel() * 4 / seconds
    return bounds


# ---------------------------------------------------------------------------------------------- workloads
def training_step(model, optimizer, ids, dtype=torch.float32, ours=True):
    """One optimizer step: forward + loss, backward, AdamW."""
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        out = model(ids, labels=ids, return_logits=False) if ours else model(input_ids=ids, labels=ids)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def moe_pair(spec: dict, seed: int = 0):
    """ossgpt's Experts and transformers' GptOssExperts (default dispatch and its eager loop), same weights, plus
    one fixed routing of `tokens` tokens."""
    import copy

    import transformers

    E, k, H, I, N = (spec[key] for key in ("experts", "top_k", "hidden", "intermediate", "tokens"))  # noqa: E741
    config = GPTOSSConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=k)
    torch.manual_seed(seed)
    ours = Experts(config)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.02)
    hf = {}
    hf_config = transformers.GptOssConfig(
        hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=k
    )
    for impl in ("grouped_mm", "eager"):
        c = copy.deepcopy(hf_config)
        c._experts_implementation = impl
        hf[impl] = transformers.models.gpt_oss.modeling_gpt_oss.GptOssExperts(c)
        hf[impl].load_state_dict(ours.state_dict())
    x = torch.randn(N, H)
    top, indices = torch.randn(N, E).topk(k, dim=-1)
    return ours, hf, x, indices, top.softmax(dim=-1)


def moe_step(module, x, indices, weights, grad):
    x = x.detach().requires_grad_()
    module(x, indices, weights).backward(grad)
    for p in module.parameters():
        p.grad = None


def decode_inputs(config: GPTOSSConfig, shapes: Shapes, seed: int = 1):
    """One prompt [1, P], and a left-padded batch of `decode_batch` prompts of lengths P/2..P with its mask."""
    g = torch.Generator().manual_seed(seed)
    vocab = min(config.vocab_size, 100_000)
    prompt = torch.randint(0, vocab, (1, shapes.prompt_len), generator=g)
    B, P = shapes.decode_batch, shapes.prompt_len
    batch = torch.zeros(B, P, dtype=torch.long)
    mask = torch.zeros(B, P, dtype=torch.long)
    for row in range(B):
        n = P // 2 + (P - P // 2) * row // max(B - 1, 1)
        batch[row, P - n :] = torch.randint(0, vocab, (n,), generator=g)
        mask[row, P - n :] = 1
    return prompt, batch, mask


def hf_generate(hf, ids, mask, new_tokens):
    return hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, eos_token_id=None, pad_token_id=0)  # fmt: skip


# ---------------------------------------------------------------------------------------------- training workers
def use_side_defaults(side: str, keep_freed: bool) -> None:
    """Set up this process as `side` runs by default: ossgpt as `ossgpt train` runs on CPU (freed memory kept for
    reuse, ossgpt.training.host_memory), HF with glibc's defaults, unless --keep-freed-memory gives it the same."""
    if (side.startswith("ours") or keep_freed) and not keep_freed_memory():
        raise SystemExit("keeping freed memory needs glibc's mallopt")


class TrainWorker:
    """One side of the training rows in a process of its own, so that each side runs with its own defaults (see
    `use_side_defaults`: the allocator setting is process-wide). The worker builds its model, takes one warm-up
    step, then idles until asked for a timed step: one side runs at a time, and the rounds interleave the sides as
    they do every other row."""

    def __init__(self, side: str, quick: bool, keep_freed: bool):
        cmd = [sys.executable, __file__, "--train-worker", side] + (["--quick"] if quick else [])
        cmd += ["--keep-freed-memory"] if keep_freed else []
        self.side = side
        self.process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._answer()  # "ready"

    def _answer(self) -> str:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.side} training worker exited (code {self.process.wait()})")
        return line.strip()

    def tokens_per_second(self) -> float:
        self.process.stdin.write("step\n")
        self.process.stdin.flush()
        return float(self._answer())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def train_worker(side: str, quick: bool) -> None:
    """The worker's side of `TrainWorker`: one timed training step (tokens/s on stdout) per line on stdin."""
    shapes = QUICK if quick else FULL
    config = model_config(shapes)
    ours, hf = build_pair(config)  # the same weights in every worker
    model = hf if side == "hf" else ours
    del ours, hf
    ids = torch.randint(0, min(config.vocab_size, 100_000), (shapes.batch, shapes.seq_len),
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    optimizer = fused_adamw(model.train())
    dtype = torch.bfloat16 if side == "ours_bf16" else torch.float32
    step = lambda: training_step(model, optimizer, ids, dtype, ours=side != "hf")  # noqa: E731
    step()  # warm-up
    print("ready", flush=True)
    for _ in sys.stdin:
        print(shapes.batch * shapes.seq_len / timed(step), flush=True)


# ---------------------------------------------------------------------------------------------- memory
def peak_memory_child(side: str, quick: bool) -> None:
    """Run in a fresh process: build one side, take two training steps, print the peak resident memory above what
    the process held before building the model (model, gradients, optimizer state and the step's activations)."""
    shapes = QUICK if quick else FULL
    config = model_config(shapes)
    ids = torch.randint(0, min(config.vocab_size, 100_000), (shapes.batch, shapes.seq_len))
    import transformers  # noqa: F401  (both sides import everything before the baseline is taken)

    baseline = _status_bytes("VmRSS")  # (main() has set up the side's defaults: use_side_defaults)
    model = build_hf(config) if side == "hf" else GPTOSSForCausalLM(config)
    model.train()
    optimizer = fused_adamw(model)
    for _ in range(2):
        training_step(
            model, optimizer, ids, DEFAULT_TRAIN_DTYPE if side == "ours" else torch.float32, ours=side == "ours"
        )
    print(json.dumps({"peak_bytes": _status_bytes("VmHWM") - baseline}))


def _status_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status (Linux). VmHWM, the peak resident size, belongs to
    this program image: unlike getrusage's ru_maxrss, it does not inherit the parent's peak across fork + exec."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure_peak_memory(side: str, quick: bool, keep_freed: bool) -> float:
    cmd = [sys.executable, __file__, "--memory-child", side] + (["--quick"] if quick else [])
    cmd += ["--keep-freed-memory"] if keep_freed else []
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"]


# ---------------------------------------------------------------------------------------------- the table
@dataclass
class Row:
    key: str
    what: str
    unit: str
    ours: float | None = None
    reference: float | None = None
    reference_name: str = "HF"
    goal: str = ""
    goal_ratio: float | None = None  # met when ratio >= this
    goal_bound: float | None = None  # met when % of bound >= this
    bound: float | None = None
    lower_is_better: bool = False

    @property
    def ratio(self) -> float | None:
        if self.ours is None or self.reference is None:
            return None
        return self.reference / self.ours if self.lower_is_better else self.ours / self.reference

    @property
    def share_of_bound(self) -> float | None:
        return None if self.ours is None or self.bound is None else self.ours / self.bound

    @property
    def met(self) -> bool | None:
        checks = []
        if self.goal_ratio is not None and self.ratio is not None:
            checks.append(self.ratio >= self.goal_ratio)
        if self.goal_bound is not None and self.share_of_bound is not None:
            checks.append(self.share_of_bound >= self.goal_bound)
        return all(checks) if checks else None


def run(args) -> list[Row]:
    quick = args.quick
    shapes = QUICK if quick else FULL
    rounds = args.rounds or (1 if quick else 5)
    wanted = set(args.rows.split(",")) if args.rows else {"train", "moe", "decode", "memory"}
    config = model_config(shapes)
    samples: dict[str, list[float]] = {}

    def record(key, value):
        samples.setdefault(key, []).append(value)

    # Build everything once; each workload gets one untimed warm-up call.
    work = []  # (key, callable returning the measured value), run in this order every round
    workers = []
    # Where bfloat16 matmuls are emulated (no AVX512-BF16 or AMX; on an AVX2-only CPU ~50x slower than float32),
    # a bfloat16 training step takes minutes: its row is reported as skipped instead.
    first = measure_bounds(quick)
    bf16_usable = first["bf16 matmul"] >= first["fp32 matmul"] / BF16_EMULATED_BELOW
    if "train" in wanted:
        sides = ("ours", "hf", "ours_bf16") if bf16_usable or DEFAULT_TRAIN_DTYPE == torch.bfloat16 else ("ours", "hf")
        workers = [TrainWorker(side, quick, args.keep_freed_memory) for side in sides]
        work += [(f"train.{worker.side}", worker.tokens_per_second) for worker in workers]
    if "moe" in wanted:
        spec = shapes.moe
        moe_ours, moe_hf, x, indices, weights = moe_pair(spec)
        grad = torch.randn(spec["tokens"], spec["hidden"])
        work += [
            (f"moe.{name}", lambda m=m: spec["tokens"] / timed(lambda: moe_step(m, x, indices, weights, grad)))
            for name, m in (("ours", moe_ours), ("hf", moe_hf["grouped_mm"]), ("hf_eager", moe_hf["eager"]))
        ]
    if "decode" in wanted:
        d_ours, d_hf = build_pair(config, seed=2)
        d_ours.eval(), d_hf.eval()
        hold_input_major(d_ours)  # as `ossgpt generate` holds float32 weights on the CPU (--quantize none)
        d_int8 = quantize_for_decoding(d_ours)
        d_dynamic = quantize_for_decoding(d_ours, dynamic=True)  # the CPU default (--quantize auto)
        decoders = (("fp32", d_ours), ("int8", d_int8), ("dynamic", d_dynamic))
        prompt, batch, mask = decode_inputs(config, shapes)
        n = shapes.new_tokens
        ones = torch.ones_like(prompt)
        # The same layers with almost no weights, in the default mode: what a decoding step costs beyond moving
        # weights (op dispatch).
        floor = quantize_for_decoding(GPTOSSForCausalLM(floor_config(config)).eval(), dynamic=True)
        floor_prompt = prompt % floor.config.vocab_size
        work += [
            *[(f"decode.ours_{name}", lambda m=m: n / timed(lambda: m.generate(prompt, max_new_tokens=n)))
              for name, m in decoders],
            ("decode.floor", lambda: n / timed(lambda: floor.generate(floor_prompt, max_new_tokens=n))),
            ("decode.hf", lambda: n / timed(lambda: hf_generate(d_hf, prompt, ones, n))),
            *[(f"decode_batch.ours_{name}",
               lambda m=m: batch.shape[0] * n / timed(lambda: m.generate(batch, attention_mask=mask, max_new_tokens=n)))
              for name, m in decoders],
            ("decode_batch.hf", lambda: batch.shape[0] * n / timed(lambda: hf_generate(d_hf, batch, mask, n))),
        ]  # fmt: skip
    for _, fn in work:  # warm-up
        fn()
    for r in range(rounds):
        for key, value in measure_bounds(quick).items():
            record(f"bound.{key}", value)
        order = work if r % 2 == 0 else work[::-1]
        for key, fn in order:
            record(key, fn())
        print(f"round {r + 1}/{rounds} done", file=sys.stderr)
    for worker in workers:
        worker.close()
    if "memory" in wanted:
        for side in ("ours", "hf"):
            record(f"memory.{side}", measure_peak_memory(side, quick, args.keep_freed_memory))

    med = {key: statistics.median(values) for key, values in samples.items()}
    fp32, bf16, bandwidth = med["bound.fp32 matmul"], med["bound.bf16 matmul"], med["bound.memory bandwidth"]
    n, mb = (512, 16) if quick else (2048, 512)  # the sizes measure_bounds uses
    rows = [
        Row("bound.fp32", f"matmul FLOP/s, float32 ({n}^3)", "GFLOP/s", fp32 / 1e9),
        Row("bound.bf16", f"matmul FLOP/s, bfloat16 ({n}^3)", "GFLOP/s", bf16 / 1e9),
        Row("bound.bw", f"memory bandwidth (float32 GEMV or sum, {mb} MB)", "GB/s", bandwidth / 1e9),
    ]
    if "train" in wanted:
        flops = train_flops_per_token(config, shapes.seq_len)
        what = f"training step, B={shapes.batch} T={shapes.seq_len}, fwd+loss+bwd+AdamW"
        bf16_default = DEFAULT_TRAIN_DTYPE == torch.bfloat16
        default_side, default = ("ours_bf16", "bf16 autocast") if bf16_default else ("ours", "float32")
        rows += [
            Row("train.default", f"{what}, default mode ({default}) vs HF float32", "tokens/s",
                med[f"train.{default_side}"], med["train.hf"], goal=">= 2.0x HF", goal_ratio=2.0,
                bound=(bf16 if default_side == "ours_bf16" else fp32) / flops),
            Row("train.fp32", f"{what}, both float32", "tokens/s", med["train.ours"], med["train.hf"],
                goal=">= 1.1x HF, >= 70% of bound", goal_ratio=1.1, goal_bound=0.7, bound=fp32 / flops),
            Row("train.bf16", f"{what}, ossgpt bf16 autocast vs HF float32", "tokens/s", med.get("train.ours_bf16"),
                med["train.hf"], goal="(the default here)" if default_side == "ours_bf16" else
                "(not default: bfloat16 matmuls not native here)" if bf16_usable else
                f"skipped: bfloat16 matmuls emulated here ({bf16 / 1e9:.0f} vs {fp32 / 1e9:.0f} GFLOP/s float32)",
                bound=bf16 / flops),
        ]  # fmt: skip
    if "moe" in wanted:
        s = shapes.moe
        flops = 3 * 2 * s["top_k"] * 3 * s["hidden"] * s["intermediate"]  # per token, fwd + bwd
        what = f"MoE experts fwd+bwd, {s['experts']} experts top-{s['top_k']}, H={s['hidden']} I={s['intermediate']}"
        rows += [
            Row("moe.default", f"{what}, vs HF's default dispatch (grouped_mm)", "tokens/s", med["moe.ours"],
                med["moe.hf"], goal=">= 3x HF experts", goal_ratio=3.0, bound=fp32 / flops),
            Row("moe.eager", f"{what}, vs HF GptOssExperts.forward (its loop)", "tokens/s", med["moe.ours"],
                med["moe.hf_eager"], reference_name="HF eager", goal=">= 3x HF experts", goal_ratio=3.0,
                bound=fp32 / flops),
        ]  # fmt: skip
    if "decode" in wanted:
        n, P, B = shapes.new_tokens, shapes.prompt_len, shapes.decode_batch
        context = P + n // 2
        what = f"greedy decode, {n} new tokens after {P}"
        # Each of ossgpt's ways to hold the weights: (key, label, bytes per weight for the bound, goal).
        modes = (
            ("dynamic", "default mode on the CPU (--quantize auto: int8 weights, int8 inputs)", "int8", True),
            ("fp32", "float32 weights (--quantize none)", "fp32", False),
            ("int8", "int8 weights only (--quantize int8)", "int8", False),
        )
        for name, label, weights, default in modes:
            goal = dict(goal=">= 2x HF, >= 80% of bound", goal_ratio=2.0, goal_bound=0.8) if default else {}
            rows.append(Row(f"decode.{name}", f"{what}, batch 1, {label} vs HF float32", "tokens/s",
                            med[f"decode.ours_{name}"], med["decode.hf"], **goal,
                            bound=bandwidth / decode_bytes_per_step(config, 1, context, weights)))  # fmt: skip
        rows.append(Row("decode.floor", f"{what}, batch 1, default mode, the same layers at hidden 64 and vocabulary "
                        "512 (the per-token cost of running the ops, not of moving weights)", "tokens/s",
                        med["decode.floor"], goal="(bound)"))  # fmt: skip
        for name, label, weights, default in modes:
            goal = dict(goal=">= 5x batch 1", goal_ratio=5.0) if default else {}
            rows.append(Row(f"decode_batch.{name}", f"{what}, batch {B} (left-padded), {label} vs the same at "
                            "batch 1", "tokens/s", med[f"decode_batch.ours_{name}"], med[f"decode.ours_{name}"],
                            reference_name="ossgpt batch 1", **goal,
                            bound=B * bandwidth / decode_bytes_per_step(config, B, context, weights)))  # fmt: skip
        rows.append(
            Row(
                "decode_batch.hf",
                f"{what}, batch {B}: ossgpt default mode vs HF float32 batch {B}",
                "tokens/s",
                med["decode_batch.ours_dynamic"],
                med["decode_batch.hf"],
                goal="(info)",
            )
        )
    if "memory" in wanted:
        rows.append(Row("memory", f"peak memory of a training step (B={shapes.batch}, T={shapes.seq_len}), above "
                        "the process before the model", "MB", med["memory.ours"] / 2**20, med["memory.hf"] / 2**20,
                        goal="<= HF", goal_ratio=1.0, lower_is_better=True))  # fmt: skip
    return rows


def markdown(rows: list[Row]) -> str:
    def fmt(v, digits=1):
        return "" if v is None else f"{v:,.{digits}f}"

    lines = [
        "| what | unit | ossgpt | reference | ratio | goal | met | bound | % of bound |",
        "| --- | --- | ---: | ---: | ---: | --- | --- | ---: | ---: |",
    ]
    for r in rows:
        ref = "" if r.reference is None else f"{fmt(r.reference)} ({r.reference_name})"
        met = {True: "yes", False: "**no**", None: ""}[r.met]
        share = "" if r.share_of_bound is None else f"{100 * r.share_of_bound:.0f}%"
        ratio = "" if r.ratio is None else f"{r.ratio:.2f}x"
        lines.append(f"| {r.what} | {r.unit} | {fmt(r.ours)} | {ref} | {ratio} | {r.goal} | {met} | {fmt(r.bound)} "
                     f"| {share} |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one round: checks the script works")
    parser.add_argument("--rounds", type=int, default=0, help="interleaved rounds (default 5, quick 1)")
    parser.add_argument("--rows", default="", help="comma-separated subset of: train,moe,decode,memory")
    parser.add_argument("--json", default=str(Path(__file__).with_name("results.json")), help="where to write rows")
    parser.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="glibc: reuse freed memory instead of unmapping it (ossgpt.training.host_memory) on both sides: the "
        "reference too, and the rows measured in this process (MoE, decode)",
    )
    parser.add_argument("--memory-child", choices=("ours", "hf"), help=argparse.SUPPRESS)
    parser.add_argument("--train-worker", choices=("ours", "hf", "ours_bf16"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    side = args.memory_child or args.train_worker
    if side:
        use_side_defaults(side, args.keep_freed_memory)
        (peak_memory_child if args.memory_child else train_worker)(side, args.quick)
        return
    if args.keep_freed_memory:  # the rows measured in this process (MoE, decode): both sides keep freed memory
        use_side_defaults("hf", keep_freed=True)
    started = time.time()
    rows = run(args)
    table = markdown(rows)
    print(table)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "seconds": round(time.time() - started, 1),
        "keep_freed_memory": args.keep_freed_memory,
    }
    try:
        import transformers

        meta["transformers"] = transformers.__version__
    except ImportError:
        pass
    payload = {"meta": meta, "rows": [{**asdict(r), "ratio": r.ratio, "share_of_bound": r.share_of_bound,
                                       "met": r.met} for r in rows]}  # fmt: skip
    Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\n{meta['date']}, {meta['seconds']} s; rows written to {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
