"""Training configuration: `TrainConfig`, and the model config a run trains.

Every `TrainConfig` field is one `ossgpt train` flag (`max_steps` is `--max-steps`); its help text lives in the
field's metadata, from which `ossgpt.cli.train` builds the parser. `TrainConfig.for_preset(name, **given)` takes
every field the user did not give from the preset's recipe (ossgpt.presets): `tiny` is sized for two CPU cores,
the larger presets for one GPU or more.

The model is the preset's (`model_config_for`), and the data must be tokenized with its tokenizer: `ossgpt prepare
--preset NAME` does that. `--model-override tokenizer=SPEC` trains the preset's shape on another vocabulary,
whose size and end token then come from the data. A fine-tune (`--init-from CHECKPOINT`) takes the checkpoint's
model instead, e.g. stretched by `--context-extension`.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ossgpt.checkpoint import load_config
from ossgpt.checkpoint.adapted import whole_model_directory
from ossgpt.checkpoint.run_dir import resolve_checkpoint
from ossgpt.config import GPTOSSConfig, round_up
from ossgpt.devices import DTYPES
from ossgpt.errors import UserError
from ossgpt.inference.loading import context_extension
from ossgpt.options import ATTENTION_KERNELS, EXPERT_KERNELS, RuntimeOptions
from ossgpt.presets import DEFAULT_PRESET, PRESETS
from ossgpt.tokenizer import TOKENIZER_FILE, saved_state
from ossgpt.training.optim import OPTIMIZERS

DEVICES = ("auto", "cpu", "cuda")
DISTRIBUTED = ("none", "ddp", "fsdp")
VOCAB_MULTIPLE = 64  # embedding rows of a data-sized vocabulary are padded to this (friendlier matmul shapes)


def _option(default, help: str, **metadata):  # noqa: A002 - argparse's name for it
    """A dataclass field carrying its CLI help (and optionally argparse's metavar/required) in its metadata."""
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class TrainConfig:
    # --- data and run folder ----------------------------------------------------------------------------------
    data: str = _option("", "prepared data folder, as written by `ossgpt prepare --out DATA_DIR`", metavar="DATA_DIR",
                        required=True)  # fmt: skip
    out: str = _option("", "run folder for checkpoint/, metrics.jsonl, loss.png, train.log and train_config.json",
                       metavar="RUN_DIR", required=True)  # fmt: skip
    preset: str = _option(
        DEFAULT_PRESET, f"model, tokenizer and training recipe (ossgpt.presets): {', '.join(PRESETS)}", metavar="NAME"
    )
    model_override: list[str] = field(
        default_factory=list,
        metadata={"help": "change a model config field, e.g. hidden_size=128 (repeatable)", "metavar": "KEY=VALUE"},
    )
    init_from: str = _option(
        "", "start a new run from the weights of this checkpoint (run or model directory; a LoRA run's adapters are "
        "merged into its base), with a fresh optimizer: fine-tuning. The model is the checkpoint's (with "
        "--model-override); the data must be in its tokenizer",
        metavar="PATH",
    )  # fmt: skip
    context_extension: float | None = _option(
        None, "with --init-from: fine-tune for F times the length the checkpoint trained on, with YaRN scaling set "
        "for it (pass the longer --seq-len too)", metavar="F",
    )  # fmt: skip
    resume: bool = _option(
        False, "continue the run in RUN_DIR from its checkpoint (same data order and losses); a run killed before its "
        "first checkpoint starts again from step 0, so the same command restarts a run killed at any moment"
    )  # fmt: skip
    force: bool = _option(False, "start afresh in a RUN_DIR that already holds a run (its checkpoint is deleted)")

    # --- length ---------------------------------------------------------------------------------------------------
    max_steps: int = _option(5000, "optimizer steps; the learning-rate schedule spans them")
    max_minutes: float | None = _option(
        None, "wall-clock budget of the run (counted across --resume): stop, evaluate and save once it is spent; "
        "the learning-rate decay follows whichever of steps and budget is further along"
    )  # fmt: skip

    # --- batch -----------------------------------------------------------------------------------------------------
    batch_size: int = _option(32, "sequences per micro-step, over all processes together")
    seq_len: int = _option(1024, "tokens per sequence (at most the model's max_position_embeddings)")
    grad_accum_steps: int = _option(1, "micro-steps per optimizer step (tokens per step: batch x seq_len x this)")

    # --- optimizer and schedule (linear warm-up, cosine decay) ------------------------------------------------------
    optimizer: str = _option(
        "adamw", f"{' or '.join(OPTIMIZERS)}: muon steps the attention and expert matrices along their "
        "orthogonalised momentum (training/muon.py), AdamW the rest; the same learning rate and weight decay",
        metavar="NAME",
    )  # fmt: skip
    muon_ns_steps: int = _option(
        5, "with muon: Newton-Schulz iterations per update (fewer: cheaper, the small singular values stay smaller)"
    )
    learning_rate: float = _option(6e-4, "peak learning rate, reached after the warm-up")
    min_lr: float | None = _option(None, "learning rate at the end of the cosine decay (default: learning rate / 10)")
    warmup_steps: int = _option(200, "steps of linear learning-rate warm-up")
    weight_decay: float = _option(0.1, "weight decay of matrices (never of norms, biases or sinks)")
    beta1: float = _option(0.9, "AdamW beta1 (with muon: of the parameters AdamW steps)")
    beta2: float = _option(0.95, "AdamW beta2 (with muon: of the parameters AdamW steps)")
    grad_clip: float = _option(1.0, "clip the gradient norm to this (0: no clipping)")

    # --- numerics, speed, parallelism --------------------------------------------------------------------------------
    dtype: str = _option(
        "auto",
        f"compute dtype under autocast (auto, {', '.join(DTYPES)}; auto: bfloat16 on a CUDA GPU that supports it "
        "and on a CPU with native bfloat16 matmuls (AVX512-BF16 or AMX), else float32); weights and optimizer state "
        "stay float32",
        metavar="DTYPE",
    )
    compile: bool = _option(False, "torch.compile each transformer block (falls back to eager if compiling fails)")
    attention: str = _option(
        "sdpa", f"attention kernel ({' or '.join(ATTENTION_KERNELS)}: fused, or the einsum reference)", metavar="NAME"
    )
    experts: str = _option(
        "sorted", f"expert kernel ({' or '.join(EXPERT_KERNELS)}: grouped products, or the per-expert reference)",
        metavar="NAME",
    )  # fmt: skip
    loss_chunk_size: int = _option(
        512, "rows of LM-head logits the loss forms at a time (0: all at once, the plain loss)", metavar="N"
    )
    gradient_checkpointing: bool = _option(False, "recompute block activations in the backward pass (less memory)")
    keep_freed_memory: bool = _option(
        True, "on CPU (glibc): keep freed memory for reuse, so each step's big tensors are not paged in again "
        "(faster, steadier steps; the process stays at its peak memory); off: blocks of 1 MiB and more go back to "
        "the system as soon as they are freed (less memory)",
    )  # fmt: skip
    device: str = _option("auto", f"where to train: {', '.join(DEVICES)} (auto: cuda if available)", metavar="DEVICE")
    distributed: str = _option("none", f"data parallelism under torchrun: {', '.join(DISTRIBUTED)}", metavar="MODE")

    # --- evaluation, checkpoints, logging ---------------------------------------------------------------------------
    eval_every: int = _option(250, "evaluate on the validation split every this many steps (and at the end)")
    eval_batches: int = _option(20, "validation batches per evaluation (the same windows every time)")
    save_every: int = _option(500, "save RUN_DIR/checkpoint every this many steps (and at the end)")
    save_every_minutes: float = _option(
        5.0, "also save once this many minutes of training have passed since the last save, so that a killed run "
        "loses at most about that much", metavar="M",
    )  # fmt: skip
    log_every: int = _option(10, "write a metrics.jsonl row every this many steps")
    seed: int = _option(1337, "seed of the model initialisation and of the data order")
    max_nan_steps: int = _option(10, "stop with an error after this many consecutive steps with a NaN/inf loss")

    # -------------------------------------------------------------------------------------------------------------
    @classmethod
    def for_preset(cls, preset: str = "tiny", **given) -> TrainConfig:
        """The config of a run of `preset`: `given` fields, the rest from the preset's defaults."""
        if preset not in PRESETS:
            raise UserError(f"unknown --preset {preset!r}; choose one of: {', '.join(PRESETS)}")
        return cls.create(**{**PRESETS[preset].train, **given, "preset": preset})

    @classmethod
    def create(cls, **values) -> TrainConfig:
        """The config of `values`, the other fields at their defaults, min_lr defaulted, every value checked."""
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
        config = cls(**values)
        if config.min_lr is None:
            config.min_lr = config.learning_rate / 10
        config.validate()
        return config

    def validate(self) -> None:
        """Raise a UserError naming the flag of the first impossible value."""

        def check(ok: bool, name: str, requirement: str) -> None:
            if not ok:
                flag = "--" + name.replace("_", "-")
                raise UserError(f"{flag} must be {requirement}, got {getattr(self, name)!r}")

        check(bool(self.data), "data", "a folder path")
        check(bool(self.out), "out", "a folder path")
        for name in ("max_steps", "batch_size", "grad_accum_steps", "eval_every", "eval_batches", "save_every",
                     "log_every", "max_nan_steps", "muon_ns_steps"):  # fmt: skip
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 1, name, "a positive integer")
        check(self.seed >= 0, "seed", ">= 0")
        check(self.save_every_minutes > 0, "save_every_minutes", "positive")
        try:
            self.runtime_options  # noqa: B018 - RuntimeOptions checks its own fields
        except ValueError as err:  # "loss_chunk_size must be ..." -> "--loss-chunk-size must be ..."
            field_name, _, rest = str(err).partition(" ")
            raise UserError(f"--{field_name.replace('_', '-')} {rest}") from None
        check(self.seq_len >= 2, "seq_len", "at least 2 (one token and its successor)")
        check(self.warmup_steps >= 0, "warmup_steps", ">= 0")
        check(self.max_minutes is None or self.max_minutes > 0, "max_minutes", "positive")
        check(self.learning_rate > 0, "learning_rate", "positive")
        check(self.min_lr is not None and 0 <= self.min_lr <= self.learning_rate, "min_lr", "in [0, --learning-rate]")
        check(self.optimizer in OPTIMIZERS, "optimizer", f"one of {', '.join(OPTIMIZERS)}")
        check(self.weight_decay >= 0, "weight_decay", ">= 0")
        check(0 <= self.beta1 < 1, "beta1", "in [0, 1)")
        check(0 <= self.beta2 < 1, "beta2", "in [0, 1)")
        check(self.grad_clip >= 0, "grad_clip", ">= 0")
        check(self.dtype == "auto" or self.dtype in DTYPES, "dtype", f"one of auto, {', '.join(DTYPES)}")
        check(self.device in DEVICES, "device", f"one of {', '.join(DEVICES)}")
        check(self.distributed in DISTRIBUTED, "distributed", f"one of {', '.join(DISTRIBUTED)}")
        if self.context_extension is not None and not self.init_from:
            raise UserError("--context-extension extends a trained model: pass it with --init-from CHECKPOINT")
        if self.resume and self.force:
            raise UserError("--resume continues the run in RUN_DIR and --force discards it; pass only one")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum_steps

    @property
    def runtime_options(self) -> RuntimeOptions:
        """How the model runs in this job (ossgpt.options)."""
        return RuntimeOptions(self.attention, self.experts, self.loss_chunk_size, self.gradient_checkpointing)


# ----------------------------------------------------------------------------------------------------------------
def model_config_for(config: TrainConfig, meta: dict) -> GPTOSSConfig:
    """The preset's model config (or --init-from's), with `config.model_override` applied, for the data described
    by `meta` (a data folder's meta.json). UserError, naming the flag to change, if the data cannot train it."""
    data_tokenizer, data_vocab = meta["tokenizer"], meta["vocab_size"]
    overrides = parse_model_overrides(config.model_override)
    if config.init_from:
        checkpoint = resolve_checkpoint(config.init_from)  # its model, with YaRN set for --context-extension
        extension = context_extension(checkpoint, config.context_extension, no_yarn=False)
        model = load_config(whole_model_directory(checkpoint), **extension)  # a LoRA run's: its base's
        if data_tokenizer != model.tokenizer or not same_tokenizer_file(config.data, checkpoint):
            raise UserError(
                f"{config.data} is tokenized with another vocabulary ({data_tokenizer}) than {checkpoint} "
                f"({model.tokenizer}): fine-tune on data prepared with the checkpoint's tokenizer"
            )
    else:
        model = GPTOSSConfig.from_preset(config.preset)
        wanted = overrides.get("tokenizer", model.tokenizer)
        if wanted != model.tokenizer:
            # The preset's shape on another vocabulary: its size and end token are the data's (unless overridden).
            model = model.replace(vocab_size=round_up(data_vocab, VOCAB_MULTIPLE), eos_token_id=meta["eot_token_id"])
        if data_tokenizer != wanted and wanted == model.tokenizer:
            raise UserError(
                f"{config.data} is tokenized with {data_tokenizer}, but preset {config.preset} uses {wanted}: "
                f"re-run `ossgpt prepare --preset {config.preset}` (or --tokenizer {wanted}), or train this preset on "
                f"the data's vocabulary with --model-override tokenizer={data_tokenizer}"
            )
        if data_tokenizer != wanted:
            raise UserError(
                f"{config.data} is tokenized with {data_tokenizer}, but --model-override tokenizer={wanted} asks for "
                f"{wanted}: override tokenizer={data_tokenizer}, or re-run `ossgpt prepare --tokenizer {wanted}`"
            )
    try:
        model = model.replace(**overrides)
    except (TypeError, ValueError) as err:
        raise UserError(f"--model-override: {err}") from None
    if data_vocab > model.vocab_size:
        raise UserError(
            f"{config.data} has a vocabulary of {data_vocab} tokens but the model only {model.vocab_size} "
            f"embeddings: choose another --preset, or re-run `ossgpt prepare` with a smaller --tokenizer"
        )
    if config.seq_len > model.max_position_embeddings:
        raise UserError(
            f"--seq-len {config.seq_len} exceeds the model's context of {model.max_position_embeddings} tokens; "
            "lower --seq-len (or raise it with --model-override max_position_embeddings=N)"
        )
    return model


def same_tokenizer_file(data: str, checkpoint: Path) -> bool:
    """Whether a data folder and a checkpoint hold the same ossgpt tokenizer.json, where that decides it: a
    corpus-fitted vocabulary is only the same if its token table is. A named tokenizer (e.g. o200k_harmony) is
    the one the configs name, compared apart; a checkpoint's tokenizer.json may then be another program's (a
    Hugging Face download's). True too when the checkpoint has none."""
    data_state = saved_state(data)
    if not (checkpoint / TOKENIZER_FILE).is_file() or data_state is None or set(data_state) == {"spec"}:
        return True
    return data_state == saved_state(checkpoint)


def parse_model_overrides(items: list[str]) -> dict:
    """["hidden_size=128", "rope_type=default"] -> {"hidden_size": 128, "rope_type": "default"}, each value parsed
    to its GPTOSSConfig field's type (lists: comma-separated; optional fields: `none`)."""
    hints = typing.get_type_hints(GPTOSSConfig)
    overrides = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or key not in hints:
            raise UserError(
                f"--model-override {item!r}: expected KEY=VALUE with KEY a model config field, e.g. hidden_size=128"
            )
        try:
            overrides[key] = _parse_value(text.strip(), hints[key])
        except ValueError:
            raise UserError(f"--model-override {item!r}: {text!r} is not a valid {hints[key]}") from None
    return overrides


def _parse_value(text: str, hint):
    options = typing.get_args(hint)
    if type(None) in options:  # `X | None`
        if text.lower() in ("none", "null"):
            return None
        (hint,) = (option for option in options if option is not type(None))
    if hint is bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(text)
        return text.lower() in ("true", "1", "yes")
    if typing.get_origin(hint) is list:
        (item_type,) = typing.get_args(hint)
        return [item_type(part.strip()) for part in text.split(",") if part.strip()]
    return hint(text)
