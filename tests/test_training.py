"""Training: optimizer and schedule, data batches, config resolution, the loop's outputs, NaN handling, bad input.

Runs use a byte-level data folder written here (no tokenizer download) and a model a few thousand parameters wide;
`ossgpt train` runs in-process through `ossgpt.cli.main`.
"""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import ossgpt
from ossgpt import GPTOSSConfig, GPTOSSForCausalLM
from ossgpt.checkpoint import from_pretrained
from ossgpt.cli import main
from ossgpt.devices import native_bfloat16, resolve_dtype
from ossgpt.errors import UserError
from ossgpt.inference.loading import load_model_and_tokenizer
from ossgpt.model import GPTOSS
from ossgpt.tokenizer import ByteTokenizer
from ossgpt.training import TrainConfig
from ossgpt.training.config import model_config_for, parse_model_overrides, same_tokenizer_file
from ossgpt.training.data import TrainBatches, open_split, validation_batches
from ossgpt.training.optim import build_optimizer, decays, lr_at, param_groups, set_lr

pytestmark = pytest.mark.usefixtures("one_thread")

# A model small enough that a step takes milliseconds, on byte-tokenized data (`make_data`). No load-balancing
# loss: it is computed per batch, so it differs between one process's batch and the halves two processes see
# (tests compare those runs exactly).
TINY = [
    "--preset", "tiny", "--device", "cpu", "--batch-size", "4", "--seq-len", "32", "--eval-batches", "2",
    "--model-override", "tokenizer=bytes", "--model-override", "hidden_size=32",
    "--model-override", "intermediate_size=32", "--model-override", "num_hidden_layers=2",
    "--model-override", "head_dim=16", "--model-override", "router_aux_loss_coef=0",
]  # fmt: skip
WORDS = "the a of to and in that it was he for on are with as his they at be this from or had by".split()


def make_data(path, train_tokens: int = 20_000, val_tokens: int = 3_000, seed: int = 0):
    """A prepared data folder in the byte tokenizer (as `ossgpt prepare --tokenizer bytes` writes it)."""
    rng = random.Random(seed)
    text = " ".join(rng.choice(WORDS) for _ in range((train_tokens + val_tokens) // 3)).encode()
    ids = np.frombuffer(text, dtype=np.uint8).astype(np.uint32)
    eot = np.array([256], dtype=np.uint32)
    path.mkdir(parents=True)
    np.concatenate([ids[:train_tokens], eot]).tofile(path / "train.bin")
    np.concatenate([ids[train_tokens : train_tokens + val_tokens], eot]).tofile(path / "val.bin")
    ByteTokenizer().save(path)
    meta = {"tokenizer": "bytes", "vocab_size": 257, "eot_token_id": 256, "train_tokens": train_tokens + 1,
            "val_tokens": val_tokens + 1, "train_bytes": train_tokens, "val_bytes": val_tokens}  # fmt: skip
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def read_metrics(run_dir) -> tuple[list[dict], list[dict]]:
    """(training rows, evaluation rows) of a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]


@pytest.fixture
def data(tmp_path):
    return make_data(tmp_path / "data")


# --- optimizer and schedule ---------------------------------------------------------------------------------------
def tiny_model() -> GPTOSSForCausalLM:
    torch.manual_seed(0)
    config = GPTOSSConfig.from_preset("tiny", tokenizer="bytes", vocab_size=320, eos_token_id=256, hidden_size=64,
                                      intermediate_size=64, num_hidden_layers=2)  # fmt: skip
    return GPTOSSForCausalLM(config)


def test_tiny_model_overfits_one_batch():
    model = tiny_model()
    optimizer = build_optimizer(model, 1e-2, weight_decay=0.0, betas=(0.9, 0.95))
    input_ids = torch.randint(0, 257, (4, 32), generator=torch.Generator().manual_seed(0))
    for step in range(120):
        set_lr(optimizer, lr_at(step, 1e-2, 1e-3, warmup_steps=10, max_steps=120))
        out = model(input_ids, labels=input_ids, return_logits=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    assert out.lm_loss.item() < 0.1


def test_lr_schedule_closed_form():
    lr, min_lr, warmup, total = 1.0, 0.1, 10, 110
    assert lr_at(0, lr, min_lr, warmup, total) == pytest.approx(0.1)  # (0 + 1) / 10: the first step moves
    assert lr_at(4, lr, min_lr, warmup, total) == pytest.approx(0.5)
    assert lr_at(10, lr, min_lr, warmup, total) == pytest.approx(1.0)  # peak at the end of the warm-up
    assert lr_at(60, lr, min_lr, warmup, total) == pytest.approx(0.55)  # half-way down the cosine: the midpoint
    assert lr_at(35, lr, min_lr, warmup, total) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2)
    assert lr_at(110, lr, min_lr, warmup, total) == pytest.approx(0.1)
    assert lr_at(500, lr, min_lr, warmup, total) == pytest.approx(0.1)  # past the end: stays at min_lr
    assert lr_at(0, lr, min_lr, 0, total) == pytest.approx(1.0)  # no warm-up
    # A time budget: the decay follows whichever of steps and time is further along.
    assert lr_at(20, lr, min_lr, warmup, total, time_progress=0.5) == pytest.approx(0.55)
    assert lr_at(60, lr, min_lr, warmup, total, time_progress=0.1) == pytest.approx(0.55)
    assert lr_at(20, lr, min_lr, warmup, total, time_progress=1.7) == pytest.approx(0.1)
    assert lr_at(5, lr, min_lr, warmup, total, time_progress=0.9) == pytest.approx(0.6)  # the warm-up is in steps


def test_weight_decay_only_on_matrices():
    model = tiny_model()
    decayed, plain = param_groups(model, weight_decay=0.1)
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    names = {id(p): name for name, p in model.named_parameters()}
    decayed_names = {names[id(p)] for p in decayed["params"]}
    plain_names = {names[id(p)] for p in plain["params"]}
    assert all(model.get_parameter(n).ndim >= 2 for n in decayed_names)
    assert {"embed_tokens.weight", "layers.0.mlp.experts.gate_up_proj", "layers.0.self_attn.q_proj.weight",
            "layers.0.mlp.router.weight"} <= decayed_names  # fmt: skip
    assert {"norm.weight", "layers.0.self_attn.sinks", "layers.0.self_attn.q_proj.bias", "layers.0.mlp.router.bias",
            "layers.0.mlp.experts.gate_up_proj_bias", "layers.0.input_layernorm.weight"} <= plain_names  # fmt: skip
    assert not decays("layers.0.mlp.experts.down_proj_bias", torch.zeros(4, 8))  # a stacked bias is 2-D
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))  # tied head counted once


# --- data ------------------------------------------------------------------------------------------------------------
def test_train_batches_are_a_function_of_seed_step_and_rank(data):
    tokens = open_split(data, "train", 16)
    batches = TrainBatches(tokens, batch_size=6, seq_len=16, seed=1)
    a = batches.batch(step=3, micro_step=1)
    assert a.shape == (6, 16) and a.dtype == torch.int64
    assert torch.equal(a, TrainBatches(tokens, 6, 16, seed=1).batch(3, 1))
    assert not torch.equal(a, batches.batch(4, 1)) and not torch.equal(a, batches.batch(3, 0))
    assert not torch.equal(a, TrainBatches(tokens, 6, 16, seed=2).batch(3, 1))
    # Each row is a contiguous window of the split.
    flat = np.asarray(tokens, dtype=np.int64)
    starts = [i for i in range(len(flat) - 15) if np.array_equal(flat[i : i + 16], a[0].numpy())]
    assert starts
    # Three processes with 2 rows each read rows r::3 of the global batch.
    parts = [TrainBatches(tokens, 6, 16, seed=1, rank=r, world_size=3).batch(3, 1) for r in range(3)]
    assert all(torch.equal(parts[r], a[r::3]) for r in range(3))


@pytest.mark.parametrize("length", [17, 31, 32, 100, 1000])
def test_train_batches_visit_every_window_once_per_epoch(length):
    tokens = np.arange(length, dtype=np.uint32)  # token value = its position: a row's first token is its start
    seq_len, batch_size, accum = 16, 3, 2
    batches = TrainBatches(tokens, batch_size, seq_len, seed=0, grad_accum_steps=accum)
    n = batches.windows_per_epoch
    assert n == max(1, (length - seq_len + 1) // seq_len) and batches.max_offset >= min(seq_len - 1, length - seq_len)
    # The stream of windows, in order: step by step, micro-step by micro-step.
    stream = torch.cat([batches.batch(step, micro) for step in range(2 * n) for micro in range(accum)])
    assert torch.equal(stream[:, 1:] - stream[:, :-1], torch.ones(len(stream), seq_len - 1, dtype=torch.int64))
    assert int(stream.max()) < length  # every window lies inside the split
    for epoch in range(3):
        starts = stream[epoch * n : (epoch + 1) * n, 0]
        # back-to-back windows from one offset, each exactly once, in a shuffled order
        assert sorted(starts.tolist()) == [int(starts.min()) + i * seq_len for i in range(n)]
        assert int(starts.min()) <= batches.max_offset
    if n > 4:  # orders and offsets change from epoch to epoch
        assert not torch.equal(stream[:n, 0], stream[n : 2 * n, 0])


def test_validation_batches_are_fixed_and_cover_the_split(data):
    tokens = open_split(data, "val", 16)
    batches = validation_batches(tokens, batch_size=4, seq_len=16, num_batches=3)
    assert len(batches) == 3 and all(b.shape == (4, 16) for b in batches)
    assert all(torch.equal(x, y) for x, y in zip(batches, validation_batches(tokens, 4, 16, 3)))
    assert torch.equal(batches[0][0], torch.from_numpy(tokens[:16].astype(np.int64)))  # first window at 0
    assert torch.equal(batches[-1][-1], torch.from_numpy(tokens[-16:].astype(np.int64)))  # last at the end
    halves = [validation_batches(tokens, 4, 16, 3, rank=r, world_size=2) for r in range(2)]
    assert all(torch.equal(halves[r][i], batches[i][r::2]) for r in range(2) for i in range(3))


def test_split_shorter_than_a_window_is_a_user_error(tmp_path):
    data = make_data(tmp_path / "d", train_tokens=100, val_tokens=10)
    with pytest.raises(UserError, match="lower --seq-len"):
        open_split(data, "val", 32)
    assert len(open_split(data, "train", 32)) == 101


# --- configuration -------------------------------------------------------------------------------------------------
def test_unset_fields_take_the_preset_defaults():
    tiny = TrainConfig.for_preset("tiny", data="d", out="o")
    assert (tiny.batch_size, tiny.seq_len, tiny.learning_rate, tiny.optimizer) == (16, 256, 6e-3, "muon")
    assert tiny.min_lr == pytest.approx(6e-4)  # learning rate / 10
    mini = TrainConfig.for_preset("mini", data="d", out="o", learning_rate=1e-3)
    assert mini.batch_size == TrainConfig.batch_size and mini.min_lr == pytest.approx(1e-4)


def test_model_config_is_the_presets_on_its_own_data():
    """The preset's model needs data in the preset's tokenizer (what `ossgpt prepare --preset` writes): its
    vocabulary is the preset's, whatever the data holds; another vocabulary is an error naming the flags."""
    tiny_meta = {"tokenizer": "cl100k_base:8192", "vocab_size": 4_000, "eot_token_id": 256}  # a small corpus
    model = model_config_for(TrainConfig.for_preset("tiny", data="d", out="o"), tiny_meta)
    assert model == GPTOSSConfig.from_preset("tiny") and model.vocab_size == 8_512
    mini_meta = {"tokenizer": "cl100k_base", "vocab_size": 100_277, "eot_token_id": 100_257}
    assert model_config_for(TrainConfig.for_preset("mini", data="d", out="o"), mini_meta).vocab_size == 100_352
    with pytest.raises(UserError, match=r"preset tiny uses cl100k_base:8192: re-run `ossgpt prepare --preset tiny`"):
        model_config_for(TrainConfig.for_preset("tiny", data="d", out="o"), mini_meta)


def test_model_override_tokenizer_takes_the_datas_vocabulary():
    meta = {"tokenizer": "bytes", "vocab_size": 257, "eot_token_id": 256}
    overrides = ["tokenizer=bytes", "hidden_size=96", "rope_type=yarn"]
    model = model_config_for(TrainConfig.for_preset("tiny", data="d", out="o", model_override=overrides), meta)
    assert (model.tokenizer, model.vocab_size, model.eos_token_id) == ("bytes", 320, 256)  # 257 rounded up to 64s
    assert (model.hidden_size, model.rope_type) == (96, "yarn")


def test_model_overrides_parse_to_the_field_types():
    parsed = parse_model_overrides(["tie_word_embeddings=false", "rms_norm_eps=1e-6", "pad_token_id=none",
                                    "layer_types=full_attention,full_attention", "num_hidden_layers=2"])  # fmt: skip
    assert parsed == {"tie_word_embeddings": False, "rms_norm_eps": 1e-6, "pad_token_id": None,
                      "layer_types": ["full_attention", "full_attention"], "num_hidden_layers": 2}  # fmt: skip
    for bad in ("hidden_size", "no_such_field=1", "hidden_size=big", "tie_word_embeddings=maybe"):
        with pytest.raises(UserError, match="--model-override"):
            parse_model_overrides([bad])


def test_every_config_field_is_a_documented_flag(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in TrainConfig.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in text
    assert "(default: 5000; tiny: 400)" in text


@pytest.mark.parametrize("bf16, amx, capability, expected", [
    (True, False, "AVX512", "bfloat16"),   # AVX512-BF16 (e.g. AMD Zen 4): bfloat16 matmuls faster than float32
    (False, True, "AVX512", "bfloat16"),   # AMX
    (False, False, "AVX512", "float32"),   # AVX-512 without either: bfloat16 emulated
    (True, False, "AVX2", "float32"),      # torch held to AVX2 (ATEN_CPU_CAPABILITY=avx2): emulated again
])  # fmt: skip
def test_auto_compute_dtype_on_cpu_follows_native_bfloat16(monkeypatch, bf16, amx, capability, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu, autocast=True) == expected
    assert resolve_dtype(None, cpu, autocast=True) == expected
    assert resolve_dtype("auto", cpu) == "float32"  # weights held for inference stay float32 on any CPU
    assert resolve_dtype("float32", cpu, autocast=True) == "float32"  # a named dtype is taken as named
    with pytest.raises(UserError, match="unknown dtype 'int8'"):
        resolve_dtype("int8", cpu, autocast=True)


# --- a run ------------------------------------------------------------------------------------------------------------
def test_run_writes_its_records_and_a_loadable_checkpoint(tmp_path, data):
    run = tmp_path / "run"
    argv = ["train", "--data", str(data), "--out", str(run), *TINY, "--max-steps", "4", "--eval-every", "2",
            "--log-every", "1", "--grad-accum-steps", "2"]  # fmt: skip
    assert main(argv) == 0
    steps, evals = read_metrics(run)
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and [r["step"] for r in evals] == [2, 4]
    assert [r["tokens"] for r in steps] == [256, 512, 768, 1024]  # 4 x 32 x 2 per step
    row = steps[-1]
    for key in ("loss", "lm_loss", "aux_loss", "lr", "grad_norm", "tokens_per_sec"):
        assert math.isfinite(row[key])
    assert row["loss"] == pytest.approx(row["lm_loss"] + row["aux_loss"], rel=1e-5)
    assert len(row["expert_load"]) == 2 and all(sum(layer) == pytest.approx(1) for layer in row["expert_load"])
    assert len(row["load_balancing_loss"]) == 2 and len(row["z_loss"]) == 2
    assert evals[-1]["val_bpb"] == pytest.approx(evals[-1]["val_loss"] / math.log(2) * 3001 / 3000)
    assert evals[-1]["val_ppl"] == pytest.approx(math.exp(evals[-1]["val_loss"]))
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    recorded = json.loads((run / "train_config.json").read_text())
    assert recorded["data"] == str(data.resolve()) and recorded["model"]["hidden_size"] == 32
    assert recorded["max_steps"] == 4 and recorded["batch_size"] == 4
    assert recorded["dtype"] == ("bfloat16" if native_bfloat16() else "float32")  # --dtype auto on this CPU
    log = (run / "train.log").read_text()
    assert f"ossgpt {ossgpt.__version__}" in log.splitlines()[0]
    assert "torch " + torch.__version__ in log and "machine:" in log
    assert "host memory: " in log  # on CPU the trainer keeps freed memory for reuse (or says why it cannot)
    # The checkpoint is a standard model directory, with its tokenizer: `ossgpt eval`/`generate` load it.
    model, tokenizer = load_model_and_tokenizer(run)
    assert model.config.vocab_size == 320 and tokenizer.spec == "bytes"
    expected = ["config.json", "model.safetensors", "optimizer.safetensors", "tokenizer.json", "trainer_state.json"]
    assert sorted(p.name for p in (run / "checkpoint").iterdir()) == expected


def test_max_minutes_stops_early_with_an_evaluation_and_a_save(tmp_path, data):
    run = tmp_path / "run"
    argv = ["train", "--data", str(data), "--out", str(run), *TINY, "--max-steps", "1000", "--max-minutes", "1e-4",
            "--eval-every", "500", "--save-every", "500"]  # fmt: skip
    assert main(argv) == 0
    steps, evals = read_metrics(run)
    state = json.loads((run / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == steps[-1]["step"] == evals[-1]["step"] < 1000
    assert steps[-1]["lr"] == pytest.approx(lr_at(state["step"] - 1, 6e-3, 6e-4, 20, 1000))  # still over 1000 steps
    assert "--max-minutes 0.0001 spent" in (run / "train.log").read_text()


def test_max_minutes_decays_the_learning_rate_within_the_budget(tmp_path, data):
    run = tmp_path / "run"
    argv = ["train", "--data", str(data), "--out", str(run), *TINY, "--max-steps", "100000", "--max-minutes", "0.03",
            "--warmup-steps", "0", "--log-every", "1", "--eval-every", "100000"]  # fmt: skip
    assert main(argv) == 0
    steps, _ = read_metrics(run)
    state = json.loads((run / "checkpoint" / "trainer_state.json").read_text())
    lrs = [row["lr"] for row in steps]
    assert len(lrs) >= 3 and lrs[0] == pytest.approx(6e-3)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    # Far further down than 100,000 steps would put it, and the run's clock is saved for --resume.
    assert lrs[-1] < lr_at(len(lrs) * 100, 6e-3, 6e-4, 0, 100000) - 1e-4
    assert 1.8 <= state["seconds"] < 60 and state["warmup_end_seconds"] == 0.0


def test_gradient_checkpointing_takes_the_same_steps(tmp_path, data):
    losses = {}
    for flag in ("--no-gradient-checkpointing", "--gradient-checkpointing"):
        run = tmp_path / flag
        assert main(["train", "--data", str(data), "--out", str(run), *TINY, "--max-steps", "3", "--log-every", "1",
                     flag]) == 0  # fmt: skip
        losses[flag] = [(r["loss"], r["grad_norm"]) for r in read_metrics(run)[0]]
    assert losses["--gradient-checkpointing"] == pytest.approx(losses["--no-gradient-checkpointing"], rel=1e-6)


class NaNLoss:
    """Patches the model: the forward passes `bad_calls` picks (counted from 1, evaluation included) give a NaN loss
    when training."""

    def __init__(self, monkeypatch, bad_calls):
        self.calls, self.bad_calls, self.forward = 0, bad_calls, GPTOSS.forward
        monkeypatch.setattr(GPTOSS, "forward", self)

    def __get__(self, model, owner):
        return lambda *args, **kwargs: self(model, *args, **kwargs)

    def __call__(self, model, *args, **kwargs):
        out = self.forward(model, *args, **kwargs)
        self.calls += 1
        if model.training and self.bad_calls(self.calls):
            out.loss = out.loss * float("nan")
        return out


def test_a_nan_step_is_skipped(tmp_path, data, monkeypatch):
    NaNLoss(monkeypatch, bad_calls=lambda n: n == 2)
    run = tmp_path / "run"
    argv = ["train", "--data", str(data), "--out", str(run), *TINY, "--max-steps", "3", "--log-every", "1"]
    assert main(argv) == 0
    steps, _ = read_metrics(run)
    assert steps[1]["loss"] is None and steps[1]["grad_norm"] is None  # written as null
    assert math.isfinite(steps[2]["loss"])
    assert "warning: step 2: loss nan" in (run / "train.log").read_text()
    model = from_pretrained(run / "checkpoint")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_consecutive_nan_steps_stop_the_run(tmp_path, data, monkeypatch, capsys):
    NaNLoss(monkeypatch, bad_calls=lambda n: n >= 2)
    run = tmp_path / "run"
    argv = ["train", "--data", str(data), "--out", str(run), *TINY, "--max-steps", "10", "--max-nan-steps", "3"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error: the loss or gradients were NaN/inf for 3 steps in a row (up to step 4)" in err
    assert "Traceback" not in err
    assert (run / "train.log").read_text().count("update skipped") == 3


# --- bad input ---------------------------------------------------------------------------------------------------
def write_record(run_dir, record, name="train_config.json"):
    run_dir.mkdir()
    (run_dir / name).write_text(json.dumps(record))


def write_meta(path, **changes):
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, **changes}))


BAD_INPUTS = {
    # name: (how to break the data folder, extra flags, expected message)
    "missing data folder": (lambda d: d.rename(d.with_name("gone")), [], "does not exist"),
    "empty data folder": (lambda d: [p.unlink() for p in d.iterdir()], [], "has no meta.json"),
    "corrupt meta.json": (lambda d: (d / "meta.json").write_text("{"), [], "not valid JSON"),
    "negative steps": (None, ["--max-steps", "-1"], "--max-steps must be a positive integer"),
    "batch 0": (None, ["--batch-size", "0"], "--batch-size must be a positive integer"),
    "no newton-schulz steps": (None, ["--muon-ns-steps", "0"], "--muon-ns-steps must be a positive integer"),
    "seq_len beyond context": (None, ["--seq-len", "2048"], "exceeds the model's context of 1024"),
    "val split too short": (
        None,
        ["--seq-len", "4000", "--model-override", "max_position_embeddings=4096"],
        "fewer than --seq-len + 1",
    ),  # fmt: skip
    "unknown preset": (None, ["--preset", "huge"], "unknown --preset 'huge'"),
    "bad model override": (None, ["--model-override", "hidden=3"], "--model-override 'hidden=3'"),
    "invalid model override": (None, ["--model-override", "num_experts_per_tok=9"], "num_experts_per_tok"),
    "resume and force": (None, ["--resume", "--force"], "pass only one"),
    "resume another run": (
        lambda d: write_record(d.parent / "run", {"data": "elsewhere", "model": {}}),
        ["--resume"],
        "train_config.json records another run (its data and model differ)",
    ),  # fmt: skip
    "a data folder as the run folder": (
        lambda d: write_record(d.parent / "run", {}, "meta.json"),
        [],
        "is a prepared data folder, not a run folder",
    ),  # fmt: skip
    "bad dtype": (None, ["--dtype", "int8"], "--dtype must be one of"),
    "bad optimizer": (None, ["--optimizer", "sgd"], "--optimizer must be one of adamw, muon"),
    "bad attention kernel": (None, ["--attention", "flash"], "--attention must be one of sdpa, eager, got 'flash'"),
    "negative loss chunks": (None, ["--loss-chunk-size", "-1"], "--loss-chunk-size must be a non-negative integer"),
    "extension without a checkpoint": (None, ["--context-extension", "4"], "pass it with --init-from CHECKPOINT"),
    "init from nothing": (None, ["--init-from", "no/such/run"], "checkpoint no/such/run does not exist"),
    "ddp without torchrun": (None, ["--distributed", "ddp"], "needs several processes"),
    "tokenizer other than the overridden one": (
        lambda d: write_meta(d, tokenizer="o200k_harmony", vocab_size=201_088),
        ["--preset", "mini"],
        "--model-override tokenizer=bytes asks for bytes: override tokenizer=o200k_harmony",
    ),  # fmt: skip
    "vocabulary larger than the model": (
        lambda d: write_meta(d, tokenizer="bytes", vocab_size=400),
        ["--model-override", "vocab_size=320"],
        "has a vocabulary of 400 tokens but the model only 320",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_error_line(case, tmp_path, data, capsys):
    breaks, flags, message = BAD_INPUTS[case]
    if breaks:
        breaks(data)
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"), *TINY, *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert message in err


# --- fine-tuning from a checkpoint ------------------------------------------------------------------------------------
def test_init_from_starts_at_the_checkpoint_and_extends_its_context(tmp_path, data):
    source = tmp_path / "source"
    argv = ["train", "--data", str(data), "--out", str(source), *TINY, "--max-steps", "20", "--log-every", "1"]
    assert main(argv) == 0
    tuned = tmp_path / "tuned"
    flags = ["--init-from", str(source), "--context-extension", "4", "--seq-len", "128", "--max-steps", "1",
             "--learning-rate", "1e-12", "--min-lr", "0", "--log-every", "1"]  # fmt: skip
    assert main(["train", "--data", str(data), "--out", str(tuned), *TINY, *flags]) == 0
    config = from_pretrained(tuned / "checkpoint").config
    assert (config.rope_type, config.rope_factor, config.rope_original_max_position_embeddings) == ("yarn", 4, 32)
    assert config.max_position_embeddings == 1024 and config.hidden_size == 32  # the source's model
    # A learning rate of 1e-12: the weights are still the source's, and so is the loss (far below a fresh model's).
    a, b = load_file(source / "checkpoint/model.safetensors"), load_file(tuned / "checkpoint/model.safetensors")
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() < 1e-6 for k in a)
    (first,), _ = read_metrics(tuned)
    source_steps, _ = read_metrics(source)
    assert first["lm_loss"] < source_steps[0]["lm_loss"] - 0.5
    # The fine-tune resumes like any run: its saved model config is the one it trains.
    assert main(["train", "--data", str(data), "--out", str(tuned), *TINY, *flags[:6], "--max-steps", "2",
                 "--resume"]) == 0  # fmt: skip


def test_init_from_needs_data_in_the_checkpoints_vocabulary(tmp_path, data, capsys):
    source = tmp_path / "source"
    assert main(["train", "--data", str(data), "--out", str(source), *TINY, "--max-steps", "1"]) == 0
    # Another fitted table under the same name: as if the data were prepared again on another corpus.
    (data / "tokenizer.json").write_text('{"spec": "bytes", "table": "another"}')
    capsys.readouterr()
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "x"), *TINY, "--init-from", str(source)]) == 2
    assert "is tokenized with another vocabulary" in capsys.readouterr().err


def test_same_tokenizer_file_compares_fitted_tables_only(tmp_path):
    """A fitted (compact) vocabulary is the same only if its table is; a named one is the configs' business, and a
    checkpoint may then hold Hugging Face's tokenizer.json (gpt-oss's download does)."""
    data, checkpoint = tmp_path / "data", tmp_path / "checkpoint"
    data.mkdir(), checkpoint.mkdir()

    def same(data_state, checkpoint_text) -> bool:
        (data / "tokenizer.json").write_text(json.dumps(data_state))
        if checkpoint_text is not None:
            (checkpoint / "tokenizer.json").write_text(checkpoint_text)
        return same_tokenizer_file(str(data), checkpoint)

    fitted = {"spec": "cl100k_base:8", "ids": [300, 301]}
    hugging_face = '{"version": "1.0", "model": {"type": "BPE"}}'
    assert same(fitted, json.dumps(fitted))
    assert not same(fitted, json.dumps(fitted | {"ids": [300, 302]}))
    assert not same(fitted, hugging_face)
    assert same({"spec": "o200k_harmony"}, hugging_face)
    (checkpoint / "tokenizer.json").unlink()
    assert same(fitted, None)  # a checkpoint without one: nothing to compare


def test_an_existing_run_needs_resume_or_force(tmp_path, data, capsys):
    argv = ["train", "--data", str(data), "--out", str(tmp_path / "run"), *TINY, "--max-steps", "1"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pass --resume to continue it, or --force" in err
    assert main([*argv, "--force"]) == 0
