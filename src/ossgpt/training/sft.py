"""Supervised fine-tuning: a trained model taught to answer in the Harmony chat format, from JSONL conversations.

    sft(SFTConfig.create(checkpoint="gpt-oss-20b", data="chats.jsonl", out="runs/chat"))           # LoRA
    sft(SFTConfig.create(checkpoint="runs/demo", data="chats.jsonl", out="runs/chat", full=True))  # every weight

The trainer is pretraining's (training.trainer: progress, metrics.jsonl, loss.png, exact resume, atomic
checkpoints, DDP/FSDP2 under torchrun); `SFTTrainer` changes what it trains on and what it trains:

  data    training.sft_data: conversations rendered in Harmony with a loss mask on the assistant's tokens,
          packed into windows of --seq-len; the held-out loss is the mean over held-out assistant tokens
  model   the base checkpoint's, in its tokenizer, which must have Harmony's special tokens. With LoRA (the
          default, ossgpt.lora) the base is frozen and only the adapters train (and sit in the optimizer), with the
          embedding rows of Harmony's special tokens (--lora-tokens, ossgpt.lora.tokens: a base pretrained on
          plain text never saw them); a base with MXFP4 experts keeps them packed, the expert adapters training
          through them. --full trains every weight of the dense model (MXFP4 experts are dequantized: there is no
          gradient through packed weights).

What a LoRA run's checkpoint holds (ossgpt.checkpoint.adapted): the adapters, a reference to the base and the
base's tokenizer, with the optimizer and trainer state; never a copy of the base. `ossgpt merge` folds the adapters
into the base; `ossgpt chat`/`generate`/`eval` load the run directly. A --full run's checkpoint is a whole model,
as pretraining's is.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from ossgpt.chat.harmony import SPECIAL_TOKENS, Harmony
from ossgpt.checkpoint import from_pretrained, load_config
from ossgpt.checkpoint.adapted import is_adapted, write_adapted
from ossgpt.checkpoint.pretrained import detect_format
from ossgpt.checkpoint.run_dir import checkpoint_dir, resolve_checkpoint
from ossgpt.config import GPTOSSConfig
from ossgpt.errors import UserError
from ossgpt.lora import LORA_TARGETS, LoRAConfig, add_lora, load_adapters
from ossgpt.model import GPTOSS
from ossgpt.quant.int8 import StoredEmbedding, StoredLinear
from ossgpt.tokenizer import TOKENIZER_FILE, load_tokenizer
from ossgpt.training.config import TrainConfig, _option
from ossgpt.training.sft_data import (
    SFTBatches,
    fit_examples,
    read_examples,
    sft_validation_batches,
    split_examples,
)
from ossgpt.training.trainer import Trainer, train

DEFAULT_TARGETS = LoRAConfig().targets
# The fields that make a run this run: resuming with another value would not continue it.
RUN_FIELDS = ("checkpoint", "full", "lora_rank", "lora_alpha", "lora_targets", "lora_tokens")
# RUN_FIELDS added since runs were first saved: the value a run saved before had (it trained no token rows).
RUN_FIELDS_BEFORE = {"lora_tokens": "none"}
# TrainConfig fields that pretraining uses and fine-tuning does not: no `ossgpt sft` flag, left at their defaults.
PRETRAINING_ONLY = ("preset", "model_override", "init_from", "context_extension")


@dataclass
class SFTConfig(TrainConfig):
    """A fine-tuning job: TrainConfig's fields (the recipe's defaults redefined below), and the base, the LoRA
    settings and the held-out conversations. Every field but PRETRAINING_ONLY's is an `ossgpt sft` flag."""

    data: str = _option(
        "", 'conversations to train on: a JSONL file, one {"messages": [...], "tools": [...]} per line (OpenAI chat '
        "format)", metavar="FILE.jsonl", required=True,
    )  # fmt: skip
    checkpoint: str = _option(
        "", "the model to fine-tune: a model directory (ossgpt, Hugging Face, MXFP4 or OpenAI's original layout) or a "
        "training run; its tokenizer must have Harmony's special tokens", metavar="BASE", required=True,
    )  # fmt: skip
    full: bool = _option(
        False, "train every weight instead of LoRA adapters (MXFP4 experts are dequantized; optimizer state for all)"
    )
    lora_rank: int = _option(8, "LoRA: the rank r of every adapter", metavar="R")
    lora_alpha: float = _option(16.0, "LoRA: the updates are scaled by alpha / r", metavar="A")
    lora_targets: str = _option(
        ",".join(DEFAULT_TARGETS), f"LoRA: the projections to adapt in every layer, comma-separated, among "
        f"{','.join(LORA_TARGETS)} (gate_up_proj and down_proj: one adapter per expert)", metavar="NAMES",
    )  # fmt: skip
    lora_tokens: str = _option(
        "harmony", "LoRA: the tokens whose embedding rows train too (and their LM head rows, if not tied): harmony "
        "(the chat format's special tokens <|start|>, <|channel|>, ...), none, or token ids, comma-separated, "
        "harmony among them if wanted (harmony,15,16)", metavar="IDS",
    )  # fmt: skip
    val_fraction: float = _option(
        0.05, "hold out this share of --data's conversations (spread over the file) for the validation loss",
        metavar="F",
    )  # fmt: skip
    val_data: str = _option(
        "", "held-out conversations (JSONL) for the validation loss, instead of --val-fraction of --data",
        metavar="FILE.jsonl",
    )  # fmt: skip
    vocab_file: str = _option(
        "", "the tokenizer's .tiktoken ranks file (o200k_base's for gpt-oss), if tiktoken's cache lacks it and it "
        "cannot be downloaded", metavar="PATH",
    )  # fmt: skip

    # --- the recipe: TrainConfig's fields with fine-tuning's defaults (LoRA's, as the OpenAI cookbook's) --------
    max_steps: int = _option(300, "optimizer steps; the learning-rate schedule spans them")
    batch_size: int = _option(8, "windows of packed conversations per micro-step, over all processes together")
    seq_len: int = _option(
        1024, "tokens per window: conversations are packed into windows this long, whole (a longer one is skipped, "
        "and counted in the log)",
    )  # fmt: skip
    learning_rate: float = _option(2e-4, "peak learning rate, reached after the warm-up")
    warmup_steps: int = _option(10, "steps of linear learning-rate warm-up")
    weight_decay: float = _option(0.0, "weight decay of matrices (adapters, with LoRA)")
    eval_every: int = _option(50, "evaluate on the held-out conversations every this many steps (and at the end)")
    save_every: int = _option(100, "save RUN_DIR/checkpoint every this many steps (and at the end)")
    # Off for fine-tuning: its big tensors are the base's weights, built once; keeping freed memory would hold on to
    # loading's temporaries (several GB for gpt-oss-20b) for no speed, as no step frees a [vocab, hidden] gradient.
    # Off, freed blocks of 1 MiB and more go back at once: a LoRA step's backward pass would otherwise leave the
    # memory it frees resident under the gradients it keeps (training.host_memory).
    keep_freed_memory: bool = _option(
        False, "on CPU (glibc): keep freed memory for reuse (the process stays at its peak memory); off: blocks of "
        "1 MiB and more go back to the system as soon as they are freed (less memory)",
    )  # fmt: skip

    def validate(self) -> None:
        super().validate()
        defaults = TrainConfig()
        for name in PRETRAINING_ONLY:
            if getattr(self, name) != getattr(defaults, name):
                raise UserError(f"{name} does not apply to fine-tuning, whose model is --checkpoint's; leave it out")
        if not self.checkpoint:
            raise UserError("--checkpoint is required: the model to fine-tune")
        if not self.val_data and not 0 < self.val_fraction < 1:
            raise UserError(f"--val-fraction must be in (0, 1), got {self.val_fraction!r} (or pass --val-data)")
        if not self.full:
            self.lora_config()  # LoRAConfig checks its own values

    def lora_config(self, harmony: Harmony | None = None) -> LoRAConfig:
        """The adapters this run trains, with the rows of --lora-tokens; `harmony` (the base's renderer) names the
        chat tokens that `harmony` in --lora-tokens stands for (without it they are left out: the flags are only
        being checked). UserError naming the flag of a bad value."""
        targets = tuple(name.strip() for name in self.lora_targets.split(",") if name.strip())
        tokens = []
        for part in self.lora_tokens.split(",") if self.lora_tokens != "none" else ():
            if part.strip() != "harmony":
                try:
                    tokens.append(int(part))
                except ValueError:
                    raise UserError(f"--lora-tokens: expected harmony, none or token ids (e.g. harmony,15,16), got "
                                    f"{self.lora_tokens!r}") from None  # fmt: skip
            elif harmony is not None:
                tokens += [harmony.tokenizer.special_tokens[t] for t in SPECIAL_TOKENS]
        try:
            return LoRAConfig(self.lora_rank, self.lora_alpha, targets, tuple(tokens))
        except ValueError as err:  # "LoRA rank must be ..." -> "--lora-rank: LoRA rank must be ..."
            flag = next((f for f in ("rank", "alpha", "tokens") if f"LoRA {f}" in str(err)), "targets")
            raise UserError(f"--lora-{flag}: {err}") from None


def sft(config: SFTConfig) -> dict:
    """Run the fine-tuning job `config` describes; returns the last evaluation's metrics."""
    return train(config, SFTTrainer)


def base_model(checkpoint: str | Path) -> Path:
    """The model directory of --checkpoint (a model or run directory); UserError for a LoRA run's adapters."""
    base = resolve_checkpoint(checkpoint).resolve()
    if is_adapted(base):
        raise UserError(
            f"{base} holds LoRA adapters, not a whole model: fine-tune from a model directory, e.g. one written by "
            "`ossgpt merge`"
        )
    return base


def chat_format(base: Path, vocab_file: str | None = None) -> tuple[GPTOSSConfig, Harmony]:
    """(model config, Harmony renderer in its tokenizer) of a base model directory; UserError if the tokenizer
    lacks Harmony's special tokens or does not fit the model."""
    config = load_config(base)
    tokenizer = load_tokenizer(config.tokenizer, directory=base, vocab_file=vocab_file)
    if tokenizer.vocab_size > config.vocab_size:
        raise UserError(
            f"{base}: tokenizer {tokenizer.spec} has {tokenizer.vocab_size} tokens but the model only "
            f"{config.vocab_size} embeddings; the checkpoint's tokenizer does not belong to its model"
        )
    if not Harmony.supports(tokenizer):
        raise UserError(
            f"{base}'s tokenizer ({tokenizer.spec}) lacks Harmony's special tokens (<|start|>, <|channel|>, ...), "
            "which fine-tuning to chat needs: fine-tune a gpt-oss model (o200k_harmony), or a model trained on data "
            "prepared with a compact tokenizer, which has them"
        )
    return config, Harmony(tokenizer)


class SFTTrainer(Trainer):
    """The trainer on conversations (training.sft_data), with LoRA adapters on a frozen base or every weight."""

    def __init__(self, config: SFTConfig, ctx):
        config = dataclasses.replace(
            config,
            checkpoint=str(base_model(config.checkpoint)),
            val_data=str(Path(config.val_data).resolve()) if config.val_data else "",
        )
        self.trainable_only = not config.full
        super().__init__(config, ctx)

    # --- data ---------------------------------------------------------------------------------------------------
    def _load_data(self) -> None:
        config, ctx = self.config, self.ctx
        base = Path(config.checkpoint)
        self.model_config, harmony = chat_format(base, config.vocab_file or None)
        self.lora = None if config.full else config.lora_config(harmony)
        if self.lora is not None and self.lora.tokens and self.lora.tokens[-1] >= self.model_config.vocab_size:
            raise UserError(f"--lora-tokens: token id {self.lora.tokens[-1]} is outside {base}'s vocabulary of "
                            f"{self.model_config.vocab_size} ids")  # fmt: skip
        if config.seq_len > self.model_config.max_position_embeddings:
            raise UserError(
                f"--seq-len {config.seq_len} exceeds {base}'s context of {self.model_config.max_position_embeddings} "
                "tokens; lower --seq-len"
            )
        examples = read_examples(config.data, harmony)
        if config.val_data:
            train_set, held_out = examples, read_examples(config.val_data, harmony)
        else:
            train_set, held_out = split_examples(examples, config.val_fraction)
        train_set, notes = fit_examples(train_set, config.seq_len, "training")
        held_out, held_notes = fit_examples(held_out, config.seq_len, "held-out")
        pad_id = next(i for i in (self.model_config.pad_token_id, self.model_config.eos_token_id, 0) if i is not None)
        self.train_batches = SFTBatches(train_set, config.batch_size, config.seq_len, config.seed, pad_id,
                                        config.grad_accum_steps, ctx.rank, ctx.world_size)  # fmt: skip
        self.val_batches, held_windows = sft_validation_batches(
            held_out, config.batch_size, config.seq_len, config.eval_batches, pad_id, ctx.rank, ctx.world_size
        )
        targets = sum(e.targets for e in train_set)
        tokens = sum(len(e.tokens) for e in train_set)
        self.notes += [
            *notes, *held_notes,
            f"{len(train_set)} training conversations: {tokens:,} tokens, {targets:,} of them supervised (assistant); "
            f"{len(held_out)} held out ({sum(e.targets for e in held_out):,} supervised tokens)",
        ]  # fmt: skip
        if held_windows > config.eval_batches * config.batch_size:
            self.notes.append(
                f"evaluating on the first {config.eval_batches * config.batch_size} of {held_windows} held-out windows;"
                " raise --eval-batches to use them all"
            )
        self.bits_per_nat = None
        self.tokenizer_file = base / TOKENIZER_FILE if (base / TOKENIZER_FILE).is_file() else None

    def micro_batch(self, step: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.train_batches.batch(step, micro_step)

    # --- model --------------------------------------------------------------------------------------------------
    def _build_model(self, resumed: bool) -> GPTOSS:
        config, device, options = self.config, self.ctx.device, self.config.runtime_options
        base = Path(config.checkpoint)
        if config.full:
            return from_pretrained(checkpoint_dir(self.run_dir) if resumed else base, device=device,
                                   options=options).train()  # fmt: skip
        # Packed experts stay packed: the expert adapters train through them (ossgpt.lora.packed).
        model = from_pretrained(base, device=device, options=options, keep_mxfp4=detect_format(base).mxfp4, dtype=None)
        hold_frozen_base(model, matrices=torch.bfloat16 if config.dtype == "bfloat16" else None)
        if resumed:
            try:
                load_adapters(model, checkpoint_dir(self.run_dir))
            except ValueError as err:
                raise UserError(f"--resume: {err}") from None
        else:
            add_lora(model, self.lora, seed=config.seed)
        return model.train()

    def _check_resumable(self, checkpoint: Path, state: dict) -> None:
        recorded = state.get("train_config", {})
        saved = {name: recorded.get(name, RUN_FIELDS_BEFORE.get(name)) for name in RUN_FIELDS}
        differences = [name for name in RUN_FIELDS if saved[name] != getattr(self.config, name)]
        if differences:
            flags = ", ".join(f"--{name.replace('_', '-')} {saved[name]!r}" for name in differences)
            raise UserError(
                f"{checkpoint} was trained with {flags}: resume with the run's settings, or start a new run with "
                "--force"
            )
        if self.config.full:
            super()._check_resumable(checkpoint, state)

    def _run_identity(self) -> dict:
        return {**super()._run_identity(), **{name: getattr(self.config, name) for name in RUN_FIELDS}}

    def _describe(self) -> str:
        config = self.config
        if config.full:
            return f"full fine-tuning of {config.checkpoint}"
        lora = self.lora
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        rows = ""
        if lora.tokens:
            tied = self.model_config.tie_word_embeddings
            rows = f"; the embedding rows of {len(lora.tokens)} tokens{'' if tied else ' and their LM head rows'}"
        return (
            f"LoRA fine-tuning of {config.checkpoint} (rank {lora.rank}, alpha {lora.alpha:g}, on "
            f"{', '.join(lora.targets)}{rows}: {trainable:,} parameters train)"
        )

    def _write_weights(self, state: dict[str, torch.Tensor], directory: Path) -> None:
        if self.config.full:
            super()._write_weights(state, directory)
        else:
            write_adapted(self.model_config, self.lora, state, Path(self.config.checkpoint), directory)


@torch.no_grad()
def hold_frozen_base(model: GPTOSS, dtype: torch.dtype = torch.float32, matrices: torch.dtype | None = None) -> None:
    """Hold a frozen base, loaded in its stored dtype, for LoRA training: its float weights in `dtype` (what the
    trainer computes in; its autocast narrows products itself), with two exceptions.

    The weights of its linear layers (attention projections, router) stored in `matrices` (where given: the trainer's
    autocast dtype) stay as stored: autocast would round them to it for every product anyway, so the products are
    the same, in half the memory and with no cast per product (published gpt-oss checkpoints store them in bfloat16).
    An embedding table and an LM head that are two tensors both keep their stored dtype (bfloat16 for gpt-oss: 1.2 GB
    each less than float32 for gpt-oss-20b). A lookup reads one row per token, each row widened (`StoredEmbedding`);
    the chunked loss widens the head a slice of rows at a time (`StoredLinear`, ossgpt.kernels.loss). Packed MXFP4
    experts stay as they are.

    The chunked loss's logits buffer ([chunk, vocab] float32, 0.4 GB for gpt-oss-20b) is not kept from one step to
    the next (no `loss_workspace`): kept, it would sit through every backward pass, to spare paging it in once a
    step."""
    untied = model.embed_tokens.weight is not model.lm_head.weight
    linears = [
        module for name, module in model.named_modules() if type(module) is torch.nn.Linear and name != "lm_head"
    ]
    as_stored = {id(module.weight) for module in linears if module.weight.dtype == matrices}
    for name, param in model.named_parameters():
        if param.is_floating_point() and not (untied and name.startswith(("embed_tokens.", "lm_head."))):
            if id(param) not in as_stored:
                param.data = param.data.to(dtype)
    if untied:
        model.embed_tokens = StoredEmbedding(model.embed_tokens, dtype)
        model.lm_head = StoredLinear(model.lm_head, dtype)
    model.loss_workspace = None
