"""gpt-oss-20b at full size on this machine: load time, peak memory, prefill and decode speed, against the
memory-bandwidth bound and (optionally) llama.cpp run side by side.

    python bench/gpt_oss_20b.py                         # the full model (writes a 13.8 GB checkpoint once)
    python bench/gpt_oss_20b.py --layers 2 --quick      # smoke run: 2 layers, short prompt
    python bench/gpt_oss_20b.py --llama-bench ~/llama.cpp/build/bin/llama-bench --gguf gpt-oss-20b.gguf
    python bench/gpt_oss_20b.py --original              # the same weights in OpenAI's original/ layout
    python bench/gpt_oss_20b.py --batch 4 --prompt-tokens 64   # 4 prompts decoded together (tokens/s over all)
    python bench/gpt_oss_20b.py --kernels               # the native products alone (in cache, and streamed),
                                                        # and MXFP4 dequantization against the pure-PyTorch one
    python bench/gpt_oss_20b.py --parts                 # where a decoded token's time goes
    python bench/gpt_oss_20b.py --layers 2 --accuracy   # the int8 path's logits against float32
    python bench/gpt_oss_20b.py --memory-table          # weights and KV cache of gpt-oss-20b and -120b, on paper
    python bench/gpt_oss_20b.py --lora                  # LoRA fine-tuning steps (`ossgpt sft`), experts kept packed

The published weights cannot be downloaded here, so the benchmark writes (once, cached under --cache) a random
checkpoint with gpt-oss-20b's exact shapes in the published Hugging Face layout: config.json with the MXFP4
quantization_config, experts as uint8 MXFP4 blocks and scales, everything else bfloat16, sharded with an index.
`--layers N` keeps the widths and the vocabulary and makes it shallower. Random weights cost exactly what real
ones do: every token reads the same bytes (its 4 experts of 32 per layer, attention, the LM head).

Each side runs in a process of its own, one after the other, at --threads intra-op threads, so that its peak
RSS is its own (`os.wait4`). ossgpt's side loads the checkpoint the way `ossgpt generate` does, then times:
  load        from_pretrained + the CPU decoding transforms, page cache warm (its files read just before)
  prefill     one forward over a --prompt-tokens prompt (the cache filled), tokens/s
  decode      --new-tokens greedy tokens after it, tokens/s
The bound: bytes each decoded token must read (`decode_bytes`) over the memory bandwidth measured in the same run
(the better of a float32 matrix-vector product and a sum over a 1 GiB matrix). "bf16-equivalent" counts the active
weights at 2 bytes each, what a bfloat16 model (or llama.cpp's bf16 conversion, whose experts are MXFP4) would read.

llama.cpp is not built or downloaded by this script: pass its `llama-bench` binary and a GGUF converted from
the same checkpoint (`--llama-bench`, `--gguf`); its prompt and generation runs use the same token counts and
thread count. Results are printed as a markdown table and written as JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import save_file

from ossgpt import GPTOSSConfig
from ossgpt.atomic import atomic_directory
from ossgpt.checkpoint.hf_config import config_to_hf
from ossgpt.checkpoint.pretrained import MXFP4_QUANTIZATION_CONFIG, ours_to_hf
from ossgpt.model.model import GPTOSS
from ossgpt.quant.mxfp4 import use_mxfp4_experts

DEFAULT_CACHE = Path.home() / ".cache" / "ossgpt" / "bench"
SHARD_BYTES = 4 * 10**9  # published gpt-oss-20b: three shards of up to ~4.6 GB


# ------------------------------------------------------------------------------------------ the checkpoint
def checkpoint_dir(cache: Path, layers: int) -> Path:
    return cache / f"gpt-oss-20b-{layers}L"


def random_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """A random tensor for checkpoint tensor `name` (HF name) with gpt-oss-like magnitudes.

    MXFP4 blocks: uniformly random codes; scales 2^-8 .. 2^-6 (values of std ~0.02, as the initializer's).
    Norm weights 1, biases and sinks small, matrices N(0, 0.02)."""
    if name.endswith("_blocks"):
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    if name.endswith("_scales"):
        return torch.randint(127 - 8, 127 - 5, shape, dtype=torch.uint8, generator=generator)
    if name.endswith("layernorm.weight") or name == "model.norm.weight":
        return torch.ones(shape, dtype=dtype)
    std = 0.02 if len(shape) > 1 else 0.002
    return (torch.randn(shape, generator=generator) * std).to(dtype)


def write_checkpoint(directory: Path, layers: int, seed: int = 0) -> Path:
    """Write (atomically) a random gpt-oss-20b-shaped checkpoint with `layers` layers in the published HF MXFP4
    layout; return its directory. Tensors are made and written one shard at a time."""
    config = GPTOSSConfig.from_preset("gpt-oss-20b", num_hidden_layers=layers)
    with torch.device("meta"):
        model = GPTOSS(config)
        use_mxfp4_experts(model)
    specs = [(ours_to_hf(name), tuple(t.shape), t.dtype) for name, t in model.state_dict().items()]
    generator = torch.Generator().manual_seed(seed)
    hf_config = {**config_to_hf(config), "dtype": "bfloat16", "quantization_config": MXFP4_QUANTIZATION_CONFIG}

    shards, size = [[]], 0
    for spec in specs:
        nbytes = torch.Size(spec[1]).numel() * (1 if spec[2] == torch.uint8 else 2)
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    weight_map, total = {}, 0
    with atomic_directory(directory) as tmp:
        for i, shard in enumerate(shards, start=1):
            filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            tensors = {
                name: random_tensor(name, shape, torch.bfloat16 if dtype.is_floating_point else dtype, generator)
                for name, shape, dtype in shard
            }
            save_file(tensors, str(tmp / filename), metadata={"format": "pt"})
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            weight_map.update(dict.fromkeys(tensors, filename))
            print(f"  wrote {filename} ({len(tensors)} tensors)", file=sys.stderr, flush=True)
            del tensors
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    return directory


def write_original_layout(hf_directory: Path, directory: Path) -> Path:
    """The same weights in OpenAI's original layout (directory/original/: config.json + model.safetensors, as in
    the published repositories): fused qkv, reference names, norms in float32, experts as stored."""
    from safetensors import safe_open

    from ossgpt.checkpoint.original import RENAMES, TOP_LEVEL

    hf = json.loads((hf_directory / "config.json").read_text())
    rope = hf["rope_parameters"]  # YaRN, as written by write_checkpoint
    hf_name = {ours: theirs for theirs, ours in TOP_LEVEL.items()}
    block_name = {ours: theirs for theirs, ours in RENAMES.items()}
    tensors, handles = {}, []
    for path in sorted(hf_directory.glob("*.safetensors")):
        handles.append(safe_open(str(path), framework="pt"))
        for name in handles[-1].keys():
            tensors[name.removeprefix("model.")] = handles[-1].get_tensor(name)
    out = {theirs: tensors.pop(ours) for ours, theirs in hf_name.items()}
    out["norm.scale"] = out["norm.scale"].float()
    for n in range(hf["num_hidden_layers"]):
        ours, ref = f"layers.{n}.", f"block.{n}."
        for kind in ("weight", "bias"):
            out[f"{ref}attn.qkv.{kind}"] = torch.cat([tensors.pop(f"{ours}self_attn.{p}_proj.{kind}") for p in "qkv"])
        for name in [key for key in tensors if key.startswith(ours)]:
            theirs = ref + block_name[name.removeprefix(ours)]
            out[theirs] = tensors.pop(name).float() if theirs.endswith("norm.scale") else tensors.pop(name)
    assert not tensors, f"tensors left unmapped: {sorted(tensors)[:3]}"
    config = dict(num_hidden_layers=hf["num_hidden_layers"], num_experts=hf["num_local_experts"],
                  experts_per_token=hf["num_experts_per_tok"], vocab_size=hf["vocab_size"],
                  hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
                  swiglu_limit=hf["swiglu_limit"], head_dim=hf["head_dim"],
                  num_attention_heads=hf["num_attention_heads"], num_key_value_heads=hf["num_key_value_heads"],
                  sliding_window=hf["sliding_window"], rope_theta=rope["rope_theta"],
                  initial_context_length=rope["original_max_position_embeddings"], rope_scaling_factor=rope["factor"],
                  rope_ntk_alpha=rope["beta_slow"], rope_ntk_beta=rope["beta_fast"])  # fmt: skip
    with atomic_directory(directory) as tmp:
        (tmp / "original").mkdir()
        save_file({name: t.contiguous() for name, t in out.items()}, str(tmp / "original" / "model.safetensors"))
        (tmp / "original" / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


def ensure_checkpoint(cache: Path, layers: int, original: bool = False) -> Path:
    """The cached random checkpoint's directory (HF layout, or with `original` the same weights in the original
    layout), written first if missing."""
    directory = checkpoint_dir(cache, layers)
    if not (directory / "config.json").exists():
        print(f"writing a random {layers}-layer gpt-oss-20b checkpoint to {directory} (once)", file=sys.stderr)
        write_checkpoint(directory, layers)
    if not original:
        return directory
    converted = directory.with_name(directory.name + "-original")
    if not (converted / "original" / "config.json").exists():
        print(f"writing its original layout to {converted} (once)", file=sys.stderr)
        write_original_layout(directory, converted)
    return converted


# ------------------------------------------------------------------------------------------ measurements
def warm_page_cache(paths: list[Path], others: list[Path] = ()) -> None:
    """Read files once so that a side loads from the page cache (what "load, warm" means), after asking the kernel
    to drop `others` (the other side's files) from it: pages read twice, as the other side's were (warmed, then
    loaded), sit on the kernel's active list, and files read once since would be the first ones evicted."""
    for path in others:
        with open(path, "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    for path in paths:
        with open(path, "rb") as f:
            while f.read(64 << 20):
                pass


def gemv_bandwidth(threads: int) -> float:
    """Bytes/s of reading a 1 GiB float32 matrix (larger than any cache): the machine's memory bandwidth as a
    decoding step sees it, the best of 5 float32 matrix-vector products and 5 sums over it. Both, because MKL's
    GEMV does not stream at the full rate on every CPU (an AMD EPYC's, in BENCHMARKS.md)."""
    torch.set_num_threads(threads)
    w = torch.randn(1 << 16, 1 << 12)
    x = torch.randn(1 << 12)
    best = float("inf")
    for fn in [lambda: torch.mv(w, x)] * 6 + [w.sum] * 6:  # the first call of each warms up
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return w.numel() * 4 / best


def decode_bytes(model) -> tuple[int, int]:
    """(bytes ossgpt reads per decoded token, bytes llama.cpp's conversion reads: MXFP4 experts, bf16 elsewhere).

    Every weight is read once per token except the experts (k of E per layer) and the embedding (one row)."""
    config = model.config
    share = config.num_experts_per_tok / config.num_local_experts
    ours = reference = 0
    for name, tensor in model.state_dict().items():
        if name.startswith("embed_tokens"):
            continue
        nbytes = tensor.numel() * tensor.element_size()
        packed = name.endswith(("proj_blocks", "proj_scales"))  # MXFP4 experts: the same bytes on both sides
        weights = 0 if name.endswith("scales") else tensor.numel()  # an int8 matrix's scales: no bf16 weights
        in_experts = ".experts." in name
        ours += nbytes * (share if in_experts else 1)
        reference += (nbytes if packed else 2 * weights) * (share if in_experts else 1)
    return int(ours), int(reference)


def ossgpt_worker(directory: Path, prompt_tokens: int, new_tokens: int, threads: int, batch: int = 1) -> dict:
    """ossgpt's side, in its own process: load as `ossgpt generate` does, then prefill and greedy decoding of
    `batch` prompts together (tokens/s over all of them)."""
    from ossgpt.inference.generate import stream
    from ossgpt.inference.loading import describe_weights, load_model
    from ossgpt.kernels.native import native

    torch.set_num_threads(threads)
    native()  # built (or found in the cache) before the clock starts
    start = time.perf_counter()
    model = load_model(directory)
    load_s = time.perf_counter() - start
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_tokens), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for _ in stream(model, ids, 2):  # warm-up: the prompt's tokens reach every expert once
            pass
        times = []
        start = time.perf_counter()
        for _ in stream(model, ids, new_tokens + 1):
            times.append(time.perf_counter() - start)
    ours, reference = decode_bytes(model)
    return dict(load_s=load_s, prefill_tps=batch * prompt_tokens / times[0],
                decode_tps=batch * new_tokens / (times[-1] - times[0]),
                bytes_per_token=ours, reference_bytes_per_token=reference, weights=describe_weights(model))  # fmt: skip


def run_child(command: list[str]) -> tuple[str, int]:
    """(stdout, peak RSS in bytes) of a child process, which must succeed."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    out = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"{' '.join(command[:3])} ... failed with exit code {process.returncode}")
    return out, usage.ru_maxrss * 1024


def measure_ossgpt(args, directory: Path) -> dict:
    command = [sys.executable, __file__, "--worker", "--layers", str(args.layers), "--cache", str(args.cache),
               *(["--original"] if args.original else []),
               "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
               "--threads", str(args.threads), "--batch", str(args.batch)]  # fmt: skip
    out, rss = run_child(command)
    return {**json.loads(out.strip().splitlines()[-1]), "peak_rss": rss}


def measure_llama(args) -> dict:
    """llama-bench's prompt (pp) and generation (tg) rates on the GGUF, same token counts and threads."""
    command = [str(args.llama_bench), "-m", str(args.gguf), "-t", str(args.threads), "-p", str(args.prompt_tokens),
               "-n", str(args.new_tokens), "-r", str(args.llama_repetitions), "-o", "json"]  # fmt: skip
    out, rss = run_child(command)
    rows = json.loads(out)
    rate = {("pp" if row["n_prompt"] else "tg"): row["avg_ts"] for row in rows}
    build = rows[0].get("build_commit", "?")
    return dict(prefill_tps=rate["pp"], decode_tps=rate["tg"], peak_rss=rss, build=build)


def sft_data(path: Path, conversations: int = 400) -> Path:
    """A JSONL file of short arithmetic conversations (user question; assistant reasoning and answer): what the
    packed training windows hold does not change the cost of a step, only their length does."""
    if not path.exists():
        rows = []
        for i in range(conversations):
            a, b = 10 + (7 * i) % 90, 10 + (13 * i) % 90
            rows.append({"messages": [
                {"role": "user", "content": f"What is {a} + {b}?"},
                {"role": "assistant", "thinking": f"Add the tens, then the ones: {a} + {b} = {a + b}.",
                 "content": str(a + b)},
            ]})  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def measure_lora(args, directory: Path) -> dict:
    """LoRA fine-tuning through `ossgpt sft` in its own process (rank 8 on attention and every expert, experts kept
    packed in MXFP4, activations recomputed): peak RSS and the seconds the last of --lora-steps steps took per 1k
    tokens (the first steps include warming up). Two steps or more include the AdamW moments, which the first step
    creates only after its backward pass, in the peak.

    How `ossgpt sft` holds the base (training.sft.hold_frozen_base): the embedding and the LM head in bfloat16 as
    stored (mapped from the checkpoint's file, their touched pages counted in RSS), the rest in float32 (where it
    computes in bfloat16, the linear layers' weights stay bfloat16 as stored); the packed experts in process memory.
    Freed blocks of 1 MiB and more go back to the system at once (training.host_memory)."""
    run = args.cache / f"sft-bench-{args.layers}L"
    command = [sys.executable, "-m", "ossgpt", "sft", "--checkpoint", str(directory),
               "--data", str(sft_data(args.cache / "sft-bench.jsonl")), "--out", str(run), "--force",
               "--max-steps", str(args.lora_steps), "--batch-size", "1", "--seq-len", str(args.lora_tokens),
               "--eval-every", "1000000", "--save-every", "1000000", "--gradient-checkpointing",
               "--dtype", args.lora_dtype]  # fmt: skip
    _, rss = run_child(command)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [row for row in rows if "tokens_per_sec" in row][-1]
    return dict(peak_rss=rss, seconds_per_1k=1000 / last["tokens_per_sec"], tokens=args.lora_tokens)


def lora_memory_table() -> str:
    """What LoRA fine-tuning (rank 8 on attention and every expert) holds besides activations, on paper: the frozen
    base (MXFP4 experts, bfloat16 elsewhere) and the adapters in float32 with their gradient and two AdamW moments
    (16 bytes per adapter parameter)."""
    from ossgpt.inference.memory import MemoryPlan

    rank = 8
    lines = ["| model | frozen base (MXFP4 experts, bf16 rest) | adapters (rank 8) | adapters + grads + AdamW |",
             "| --- | ---: | ---: | ---: |"]  # fmt: skip
    for name in ("gpt-oss-20b", "gpt-oss-120b"):
        c = GPTOSSConfig.from_preset(name)
        H, I, E, D = c.hidden_size, c.intermediate_size, c.num_local_experts, c.head_dim  # noqa: E741
        q, kv = c.num_attention_heads * D, c.num_key_value_heads * D
        attention = rank * ((H + q) + 2 * (H + kv) + (q + H))
        experts = E * rank * ((H + 2 * I) + (I + H))
        adapters = c.num_hidden_layers * (attention + experts)
        base = MemoryPlan.of(c, torch.bfloat16, True, None).steady
        lines.append(f"| {name} | {base / 1e9:.1f} GB | {adapters / 1e6:.0f}M | {16 * adapters / 1e9:.1f} GB |")
    return "\n".join(lines) + "\n\n(plus activations: with recomputation, about one layer's for the window)"


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())  # fmt: skip
    from ossgpt.kernels.native import cpu_flags

    flags = cpu_flags()
    isa = ", ".join(f"{name} {'yes' if name in flags else 'no'}" for name in ("avx2", "avx512f", "avx512_vnni",
                                                                                "avx512_bf16", "amx_tile"))  # fmt: skip
    return f"{model}, {os.cpu_count()} CPUs ({isa}), torch {torch.__version__}"


def dequantize_rates(threads: int) -> list[tuple[str, float, float]]:
    """(dtype, native, reference): G values/s on `threads` threads dequantizing an expert's gate_up projection
    ([5760, 2880] from MXFP4, into a buffer reused, as LoRA training does three times per expert and step) with the
    native kernel and with the pure-PyTorch lookup, side by side."""
    from unittest import mock

    from ossgpt.kernels.mxfp4 import dequantize

    torch.set_num_threads(threads)
    blocks = torch.randint(0, 256, (5760, 90, 16), dtype=torch.uint8)
    scales = torch.randint(110, 130, (5760, 90), dtype=torch.uint8)
    rates = []
    for dtype in (torch.float32, torch.bfloat16):
        out = torch.empty(5760, 2880, dtype=dtype)
        best = {}
        for side in ("native", "reference", "native", "reference"):  # alternating, best of each
            with mock.patch("ossgpt.kernels.mxfp4.native", return_value=None) if side == "reference" else nullcontext():
                dequantize(blocks, scales, dtype, out=out)
                start = time.perf_counter()
                for _ in range(5):
                    dequantize(blocks, scales, dtype, out=out)
                best[side] = min(best.get(side, float("inf")), (time.perf_counter() - start) / 5)
        name = str(dtype).removeprefix("torch.")
        rates.append((name, *(out.numel() / best[side] / 1e9 for side in ("native", "reference"))))
    return rates


def kernel_rates(threads: int) -> list[tuple[str, float, float, float]]:
    """(kernel, hot, streamed, prompt) for the native products, as the model calls them:
      hot       one token (x [1, 2880]), in G weights/s on one thread, the weights in L2;
      streamed  the same in GB/s on `threads` threads over 640 MB of distinct weights (more than any cache), as
                decoding reads them;
      prompt    64 tokens (x [64, 2880], an expert's share of a 512-token prompt), in G products/s on one thread,
                the weights in L2.
    A token's MXFP4 products go through decoding's call, the fused experts (one expert: gate_up, SwiGLU, down,
    3 x 2880 x I weights); a prompt's through `mxfp4_linear`, as a long prompt's experts do. int8: `int8_linear`
    (the LM head's product) for both."""
    from ossgpt.kernels.native import native

    kernels = native()
    if kernels is None:
        return []
    token, prompt = torch.randn(1, 2880), torch.randn(64, 2880)

    def mxfp4(rows: int, columns: int = 2880) -> tuple:
        return (torch.randint(0, 256, (rows, columns // 32, 16), dtype=torch.uint8),
                torch.randint(118, 122, (rows, columns // 32), dtype=torch.uint8))  # fmt: skip

    def expert(width: int) -> tuple:
        """One MXFP4 expert of intermediate size `width`, as the fused experts take it (E = 1)."""
        (gb, gs), (db, ds) = mxfp4(2 * width), mxfp4(2880, width)
        return gb[None], gs[None], torch.zeros(1, 2 * width), db[None], ds[None], torch.zeros(1, 2880)

    def int8(rows: int) -> tuple:
        return torch.randint(-127, 128, (rows, 2880), dtype=torch.int8), torch.rand(rows)

    only_expert = torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1)

    def through_experts(x, *weights):
        return kernels.mxfp4_experts(x, *only_expert, *weights, 1.702, 7.0)

    def seconds(product, weights: list, repeats: int, x=token) -> float:
        """Seconds to multiply x by every entry of `weights` once (best of `repeats` passes after a first)."""
        best = float("inf")
        for _ in range(repeats + 1):
            start = time.perf_counter()
            for entry in weights:
                product(x, *entry)
            best = min(best, time.perf_counter() - start)
        return best

    def nbytes(weights: list) -> int:
        return sum(t.numel() * t.element_size() for entry in weights for t in entry if t.dtype != torch.float32)

    rows = []
    for name, (decode, small, large, small_weights), (linear, matrix) in (
        ("MXFP4", (through_experts, expert(128), lambda: expert(2880), 3 * 128 * 2880),
         (lambda x, *m: kernels.mxfp4_linear(x, *m, None), mxfp4(256))),
        ("int8", (lambda x, *m: kernels.int8_linear(x, *m, None), int8(256), lambda: int8(5760), 256 * 2880),
         (lambda x, *m: kernels.int8_linear(x, *m, None), int8(256))),
    ):  # fmt: skip
        torch.set_num_threads(1)
        hot = small_weights * 200 / seconds(decode, [small] * 200, 10) / 1e9
        hot_prompt = 64 * 256 * 2880 * 20 / seconds(linear, [matrix] * 20, 5, prompt) / 1e9
        torch.set_num_threads(threads)
        count = 640 * 10**6 // nbytes([large()])
        weights = [large() for _ in range(count)]
        streamed = nbytes(weights) / seconds(decode, weights, 3) / 1e9
        rows.append((name, hot, streamed, hot_prompt))
    return rows


def decode_parts(directory: Path, threads: int, tokens: int = 16) -> dict[str, float]:
    """Milliseconds per decoded token spent in each part of the model (after a 64-token prompt): each part's
    forward is wrapped with a clock; "other" is what the parts leave (norms, residuals, sampling, the loop)."""
    from ossgpt.inference.generate import stream
    from ossgpt.inference.loading import load_model

    torch.set_num_threads(threads)
    model = load_model(directory)
    spent: dict[str, float] = {}

    def clocked(module, part: str) -> None:
        forward = module.forward

        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = forward(*args, **kwargs)
            spent[part] = spent.get(part, 0.0) + time.perf_counter() - start
            return out

        module.forward = timed

    for layer in model.layers:
        for name in ("qkv_proj", "o_proj"):  # q, k and v stacked (ossgpt.quant.int8.Int8Attention)
            clocked(getattr(layer.self_attn, name), "attention projections (int8)")
        clocked(layer.self_attn, "attention")
        clocked(layer.mlp.router, "router")
        clocked(layer.mlp.experts, "experts (MXFP4, fused per token)")
    clocked(model.lm_head, "LM head (int8)")
    ids = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for _ in stream(model, ids, 4):  # warm-up
            pass
        for i, _ in enumerate(stream(model, ids, tokens + 1)):
            if i == 0:  # the prompt is done: count from here
                spent.clear()
                start = time.perf_counter()
    total = time.perf_counter() - start
    parts = {part: 1e3 * seconds / tokens for part, seconds in spent.items()}
    parts["attention"] -= parts["attention projections (int8)"]  # the rest of attention: rope, cache, softmax
    parts["other"] = 1e3 * total / tokens - sum(parts.values())
    parts["total"] = 1e3 * total / tokens
    return parts


def accuracy_cost(directory: Path, threads: int, tokens: int = 128) -> dict[str, dict[str, float]]:
    """What the fast paths cost against the float32 model with the experts dequantized exactly, on one random
    prompt: the CPU default, then each of its two roundings alone (the MXFP4 products' int8 activations; the int8
    attention and LM head). Per path: the largest logit error over the logits' range, the mean KL divergence of
    the next-token distributions, and how often the top token agrees. (Random weights: this measures the
    arithmetic, not the answers.)"""
    from ossgpt.inference.loading import load_model
    from ossgpt.options import RuntimeOptions

    torch.set_num_threads(threads)
    ids = torch.randint(0, 200_000, (1, tokens), generator=torch.Generator().manual_seed(0))
    paths = {  # name: (quantization, experts kernel)
        "CPU default": ("auto", "sorted"),
        "MXFP4 native products alone": ("none", "sorted"),
        "int8 W8A8 attention and LM head alone": ("int8-dynamic", "loop"),
    }
    with torch.no_grad():
        exact = load_model(directory, keep_mxfp4=False, quantization="none")(ids).logits[0].double()
        results = {}
        for path, (quantization, experts) in paths.items():
            model = load_model(directory, quantization=quantization)
            model.options = RuntimeOptions(experts=experts)
            fast = model(ids).logits[0].double()
            del model
            kl = (exact.log_softmax(-1).exp() * (exact.log_softmax(-1) - fast.log_softmax(-1))).sum(-1)
            agreement = (fast.argmax(-1) == exact.argmax(-1)).double().mean()
            results[path] = dict(max_error_over_range=float((fast - exact).abs().max() / (exact.max() - exact.min())),
                                 mean_kl=float(kl.mean()), top1_agreement=float(agreement))  # fmt: skip
    return results


def memory_table() -> str:
    """Weights, KV cache per 1k tokens and the memory to decode 8k tokens, for the published models as ossgpt holds
    them on a CPU (MXFP4 experts, int8 elsewhere, bf16 embedding) and dense in bfloat16 (a GPU without MXFP4)."""
    from ossgpt.inference.memory import OVERHEAD, MemoryPlan

    lines = [
        "| model | held as | weights | KV cache per 1k tokens | to decode 8k tokens |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for name in ("gpt-oss-20b", "gpt-oss-120b"):
        config = GPTOSSConfig.from_preset(name)
        for label, plan in [
            ("CPU default: MXFP4 experts, int8 W8A8, bf16 embedding, float32 compute",
             MemoryPlan.of(config, torch.float32, True, "int8-dynamic", torch.bfloat16)),
            ("MXFP4 experts, bfloat16 elsewhere", MemoryPlan.of(config, torch.bfloat16, True, None)),
            ("all bfloat16 (experts dequantized)", MemoryPlan.of(config, torch.bfloat16, False, None)),
        ]:  # fmt: skip
            lines.append(f"| {name} | {label} | {plan.steady / 1e9:.1f} GB | {plan.kv_per_token * 1024 / 1e6:.0f} MB "
                         f"| {plan.needed(8192) / 1e9:.1f} GB |")  # fmt: skip
    return (
        "\n".join(lines) + f"\n\n(to decode: weights + KV cache + {OVERHEAD / 1e9:.1f} GB for activations and runtime)"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=24, help="layers of the checkpoint (gpt-oss-20b: 24)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the random checkpoint is kept")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of each side (default: 2)")
    parser.add_argument("--batch", type=int, default=1, help="ossgpt decodes this many prompts together (default: 1)")
    parser.add_argument("--quick", action="store_true", help="32-token prompt, 8 new tokens")
    parser.add_argument("--llama-bench", type=Path, help="llama.cpp's llama-bench binary, to measure beside ossgpt")
    parser.add_argument("--gguf", type=Path, help="the GGUF converted from the same checkpoint, for --llama-bench")
    parser.add_argument("--llama-repetitions", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--original", action="store_true", help="load the same weights in OpenAI's original layout")
    parser.add_argument("--write-only", action="store_true", help="write the checkpoint (if missing) and stop")
    parser.add_argument("--memory-table", action="store_true", help="print the memory table on paper and stop")
    parser.add_argument("--kernels", action="store_true", help="time the native products alone and stop")
    parser.add_argument("--parts", action="store_true", help="time each part of a decoded token and stop")
    parser.add_argument("--accuracy", action="store_true", help="the CPU default's logits against float32, then stop")
    parser.add_argument("--lora", action="store_true", help="time LoRA fine-tuning steps (ossgpt sft) and stop")
    parser.add_argument("--lora-tokens", type=int, default=1024, help="with --lora: tokens per step (default: 1024)")
    parser.add_argument("--lora-steps", type=int, default=2, help="with --lora: steps; the last one is timed")
    parser.add_argument("--lora-dtype", default="auto", help="with --lora: `ossgpt sft --dtype` (auto: its default)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.prompt_tokens, args.new_tokens = 32, 8
    if args.memory_table:
        print(memory_table())
        print("\nLoRA fine-tuning, on paper:\n")
        print(lora_memory_table())
        return
    if args.kernels:
        print(f"CPU: {machine()}; memory bandwidth {gemv_bandwidth(args.threads) / 1e9:.1f} GB/s\n")
        print(
            "| kernel | x [1, 2880]: in L2, 1 thread (G weights/s) | x [1, 2880]: streamed, 640 MB (GB/s) "
            "| x [64, 2880]: in L2, 1 thread (G products/s) |\n| --- | ---: | ---: | ---: |"
        )
        for name, hot, streamed, hot_prompt in kernel_rates(args.threads):
            print(f"| {name} | {hot:.1f} | {streamed:.1f} | {hot_prompt:.1f} |")
        print(f"\n| MXFP4 dequantized, [5760, 2880], {args.threads} threads (G values/s) | native | pure PyTorch "
              "| ratio |\n| --- | ---: | ---: | ---: |")  # fmt: skip
        for dtype, fast, reference in dequantize_rates(args.threads):
            print(f"| into {dtype} | {fast:.2f} | {reference:.2f} | {fast / reference:.1f}x |")
        return
    if bool(args.llama_bench) != bool(args.gguf):
        parser.error("--llama-bench and --gguf go together")
    directory = ensure_checkpoint(args.cache, args.layers, args.original)
    if args.write_only:
        print(directory)
        return
    if args.accuracy:
        print(f"CPU: {machine()}; {args.layers} layers, 128 random tokens\n")
        print("| path | largest logit error / range | mean KL (nats) | top-token agreement |")
        print("| --- | ---: | ---: | ---: |")
        for path, cost in accuracy_cost(directory, args.threads).items():
            print(f"| {path} | {cost['max_error_over_range']:.3f} | {cost['mean_kl']:.2g} | "
                  f"{100 * cost['top1_agreement']:.0f}% |")  # fmt: skip
        return
    if args.lora:
        result = measure_lora(args, directory)
        print(f"CPU: {machine()}; {args.layers} layers; `ossgpt sft`, LoRA rank 8 on attention and every expert, "
              f"experts packed in MXFP4, embedding and LM head bf16, float32 compute, activations recomputed; "
              f"batch 1 x {args.lora_tokens} tokens, {args.lora_steps} steps\n")  # fmt: skip
        print("| peak RSS (GB) | seconds per 1k tokens |\n| ---: | ---: |")
        print(f"| {result['peak_rss'] / 1e9:.1f} | {result['seconds_per_1k']:.0f} |")
        return
    if args.parts:
        print(f"CPU: {machine()}; {args.threads} threads; {args.layers} layers\n")
        print("| part of a decoded token | ms |\n| --- | ---: |")
        for part, ms in decode_parts(directory, args.threads).items():
            print(f"| {part} | {ms:.1f} |")
        return
    if args.worker:
        print(json.dumps(ossgpt_worker(directory, args.prompt_tokens, args.new_tokens, args.threads, args.batch)))
        return

    if args.batch > 1 and args.llama_bench:
        raise SystemExit(
            "--batch compares ossgpt with itself (llama-bench decodes one sequence); leave out --llama-bench"
        )
    # Each side's files are read just before it runs: both together (27.6 GB at full size) need more than 24 GB of
    # page cache, and the second file read would push the first one out of it.
    checkpoint, gguf = sorted(directory.glob("**/*.safetensors")), [args.gguf] if args.gguf else []
    warm_page_cache(checkpoint, others=gguf)
    bandwidth = gemv_bandwidth(args.threads)
    ours = measure_ossgpt(args, directory)
    if args.llama_bench:
        warm_page_cache(gguf, others=checkpoint)
    llama = measure_llama(args) if args.llama_bench else None
    bandwidth = max(bandwidth, gemv_bandwidth(args.threads))  # measured before and after: the better of the two

    def share(tps: float, nbytes: int) -> str:  # the bytes are one row's: a batch's step reads more experts
        return f"{100 * tps * nbytes / bandwidth:.0f}%" if args.batch == 1 else "–"

    ref_bytes = ours["reference_bytes_per_token"]
    layout = "original" if args.original else "Hugging Face"
    print(f"CPU: {machine()}; {args.threads} threads; {args.layers} layers, {layout} layout; "
          f"{args.batch} prompt(s) of {args.prompt_tokens} tokens, "
          f"then {args.new_tokens} greedy tokens; memory bandwidth {bandwidth / 1e9:.1f} GB/s")  # fmt: skip
    print(f"ossgpt weights: {ours['weights']}\n")
    print(
        "| side | load (s) | peak RSS (GB) | prefill (tok/s) | decode (tok/s) | bytes read per token | "
        "% of bandwidth bound | % of bound at llama.cpp's bytes |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(
        f"| ossgpt | {ours['load_s']:.1f} | {ours['peak_rss'] / 1e9:.1f} | {ours['prefill_tps']:.2f} | "
        f"{ours['decode_tps']:.2f} | {ours['bytes_per_token'] / 1e9:.2f} GB{'' if args.batch == 1 else ' a row'} | "
        f"{share(ours['decode_tps'], ours['bytes_per_token'])} | {share(ours['decode_tps'], ref_bytes)} |"
    )
    if llama:
        print(
            f"| llama.cpp {llama['build']} | | {llama['peak_rss'] / 1e9:.1f} | {llama['prefill_tps']:.2f} | "
            f"{llama['decode_tps']:.2f} | {ref_bytes / 1e9:.2f} GB | {share(llama['decode_tps'], ref_bytes)} | "
            f"{share(llama['decode_tps'], ref_bytes)} |"
        )
        print(
            f"\nossgpt / llama.cpp: prefill {ours['prefill_tps'] / llama['prefill_tps']:.2f}x, "
            f"decode {ours['decode_tps'] / llama['decode_tps']:.2f}x, "
            f"peak RSS {ours['peak_rss'] / llama['peak_rss']:.2f}x"
        )
    if args.json:
        record = dict(machine=machine(), bandwidth=bandwidth, ossgpt=ours, llama_cpp=llama,
                      args={k: str(v) for k, v in vars(args).items()})  # fmt: skip
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
