"""The training loop: `train(config)` runs one training job, in one process or in each of many (torchrun).

One optimizer step:
  for each of grad_accum_steps micro-steps: forward under autocast, backward of loss / grad_accum_steps
  unscale (float16's loss scaling), clip the gradient norm (the logged norm is the one before clipping)
  if the loss or the gradients are NaN/inf: skip the update, warn, and stop after max_nan_steps such steps in a row
  else: AdamW step at this step's learning rate
The loss that trains is the model's `.loss`: next-token cross-entropy (`lm_loss`) plus the weighted router
losses (`aux_loss`). Both are logged, with each layer's load-balancing and z losses and its experts' load. Each
micro-batch's lm_loss is scaled by the weight its data gives it: 1 for pretraining's windows, which all hold as many
targets; for fine-tuning (training.sft), its share of the step's targets, so that the step's loss is the mean over
all of them.

Every eval_every steps: validation loss, perplexity and bits per byte. Every save_every steps, and whenever
save_every_minutes have passed since the last save: RUN_DIR/checkpoint. At the end (max_steps done, or --max-minutes
spent) a last evaluation and save. `--resume` continues from the checkpoint: the data order is a function of the
step (see training.data), the learning rate too (training.optim), and the checkpoint holds the weights, the
optimizer state and the RNG states, so a resumed run takes the very steps an uninterrupted one would. A run killed
before its first save has nothing to resume: `--resume` then starts it from step 0, so that one command
(`until ossgpt train ... --resume; do :; done`) restarts a run killed at any moment.

What RUN_DIR holds: see ossgpt.checkpoint.run_dir.

Only rank 0 writes. Every process checks the inputs, so that a bad one stops them all with the same error.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import shutil
import time
from pathlib import Path

import torch

from ossgpt.checkpoint import from_pretrained, load_config
from ossgpt.checkpoint.adapted import load_whole_model
from ossgpt.checkpoint.run_dir import TRAIN_CONFIG, checkpoint_dir, resolve_checkpoint
from ossgpt.data.prepare import read_meta
from ossgpt.devices import DTYPES, resolve_dtype
from ossgpt.errors import UserError
from ossgpt.model import GPTOSS, CausalLMOutput
from ossgpt.tokenizer import TOKENIZER_FILE
from ossgpt.training import distributed
from ossgpt.training.checkpoint import (
    check_compatible,
    load_optimizer_state,
    read_trainer_state,
    recover,
    save_checkpoint,
    set_rng_state,
    write_model_state,
)
from ossgpt.training.config import TrainConfig, model_config_for
from ossgpt.training.data import TrainBatches, open_split, validation_batches
from ossgpt.training.host_memory import keep_freed_memory, return_freed_memory
from ossgpt.training.logger import RunLogger, environment_lines
from ossgpt.training.optim import build_optimizer, lr_at, set_lr


def train(config: TrainConfig, trainer_class: type[Trainer] | None = None) -> dict:
    """Run the job `config` describes; returns the last evaluation's metrics ({} if there was nothing to do).
    trainer_class: Trainer (pretraining, the default) or a subclass (training.sft.SFTTrainer)."""
    ctx = distributed.setup(config.distributed, config.device)
    try:
        return _run(config, ctx, trainer_class)
    finally:
        # The trainer and its model (sharded over the process group, which it references) are gone by now: collect
        # them, so that the group ends here, with the interpreter alive, and not in whatever order its exit frees
        # what is left.
        gc.collect()
        distributed.teardown()


def _run(config: TrainConfig, ctx, trainer_class: type[Trainer] | None) -> dict:
    trainer = (trainer_class or Trainer)(config, ctx)
    try:
        return trainer.run()
    finally:
        trainer.logger.close()


class Trainer:
    """Pretraining on a prepared data folder. A subclass trains on other data or another model by overriding the
    hooks: `_load_data` (the model config, the batches, the tokenizer), `micro_batch`, `_build_model`,
    `_check_resumable`, `_run_identity`, `_describe`, `_write_weights` (training.sft.SFTTrainer does)."""

    trainable_only = False  # whether checkpoints hold only the parameters that train (adapters), not the frozen rest

    def __init__(self, config: TrainConfig, ctx: distributed.DistContext):
        config = dataclasses.replace(
            config,
            data=str(Path(config.data).resolve()),  # `ossgpt eval` finds the data from train_config.json
            out=str(Path(config.out).resolve()),
            dtype=resolve_dtype(config.dtype, ctx.device, autocast=True),
            device=ctx.device.type,
        )
        self.config, self.ctx = config, ctx
        self.run_dir = Path(config.out)
        # On CPU, glibc is asked to keep freed memory for reuse, or to give big blocks back at once (host_memory);
        # what it now does, for the log (None: not on CPU).
        self.host_memory = None
        if ctx.device.type == "cpu":
            keep = config.keep_freed_memory
            if not (keep_freed_memory() if keep else return_freed_memory()):
                self.host_memory = "not glibc: the C library's defaults"
            elif keep:
                self.host_memory = "freed memory is kept for reuse (glibc mallopt)"
            else:
                self.host_memory = "freed blocks of 1 MiB and more go back to the system at once (glibc mallopt)"
        if config.dtype == "float16" and ctx.mode == "fsdp":
            raise UserError(
                "--dtype float16 needs loss scaling, which is not set up for --distributed fsdp; use bfloat16"
            )

        self.notes: list[str] = []  # what setting up decided that the log should say (skipped data, --resume)
        self._load_data()
        state = self._resume_state()
        model = self._build_model(resumed=state is not None)
        n_params = model.num_parameters()

        resume_step = None if state is None else state["step"]
        self.logger = RunLogger(self.run_dir if ctx.is_main else None, config.max_steps, resume_step)
        self.model = distributed.parallelize(model, ctx, config.compile, self.logger.info)
        self.optimizer = build_optimizer(
            self.model, config.learning_rate, config.weight_decay, (config.beta1, config.beta2), config.optimizer,
            config.muon_ns_steps,
        )  # fmt: skip
        self.dtype = DTYPES[config.dtype]
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=self.dtype == torch.float16)
        self.step, self.tokens, self.best_val_loss, self.nan_streak = 0, 0, math.inf, 0
        # Wall-clock seconds of training over the whole run (resumed runs continue the --max-minutes budget), and
        # when the warm-up ended: the learning-rate decay follows the budget from there (see optim.lr_at).
        self.seconds, self.warmup_end_seconds = 0.0, None
        if state is not None:
            self._restore(state)
        self.last_save_seconds = self.seconds
        self._start_records(n_params, resumed=state is not None)

    # --- setting up -------------------------------------------------------------------------------------------
    def _load_data(self) -> None:
        """Set model_config, train_batches, val_batches ([(input_ids, labels, weight)], see `evaluate`),
        bits_per_nat (None: no bytes per token to report) and tokenizer_file (copied into checkpoints; None: none)."""
        config, ctx = self.config, self.ctx
        meta = read_meta(config.data)
        self.model_config = model_config_for(config, meta)
        self.bits_per_nat = meta["val_tokens"] / meta["val_bytes"] / math.log(2) if meta["val_bytes"] else None
        self.train_batches = TrainBatches(
            open_split(config.data, "train", config.seq_len), config.batch_size, config.seq_len, config.seed,
            config.grad_accum_steps, ctx.rank, ctx.world_size,
        )  # fmt: skip
        self.val_batches = [(ids, ids, 1.0) for ids in validation_batches(
            open_split(config.data, "val", config.seq_len), config.batch_size, config.seq_len, config.eval_batches,
            ctx.rank, ctx.world_size,
        )]  # fmt: skip
        self.tokenizer_file = Path(config.data) / TOKENIZER_FILE

    def micro_batch(self, step: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(input_ids, labels, weight) of a micro-step: the labels are the windows themselves (the model shifts
        them), each micro-batch's mean loss of the same weight, 1."""
        input_ids = self.train_batches.batch(step, micro_step)
        return input_ids, input_ids, 1.0

    def _resume_state(self) -> dict | None:
        """The trainer state to resume from (--resume), None for a new run; UserError if RUN_DIR disagrees."""
        checkpoint = checkpoint_dir(self.run_dir)
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise UserError(f"--out {self.run_dir} is a file; pass a folder")
        for name, kind in (("config.json", "a model directory"), ("meta.json", "a prepared data folder")):
            if (self.run_dir / name).is_file():
                raise UserError(f"--out {self.run_dir} is {kind}, not a run folder; choose another --out")
        if self.ctx.is_main and self.run_dir.is_dir():
            recover(self.run_dir)
        self.ctx.barrier()
        if self.config.resume and checkpoint.is_dir():
            state = read_trainer_state(checkpoint)
            self._check_resumable(checkpoint, state)
            return state
        if self.config.resume:  # killed before its first checkpoint: start it, if it is this run
            self._check_same_run()
            self.notes.append(f"--resume: {self.run_dir} holds no checkpoint yet; starting the run from step 0")
        elif checkpoint.exists() and not self.config.force:
            raise UserError(
                f"{self.run_dir} already holds a run (checkpoint/): pass --resume to continue it, or --force to "
                "start afresh (its checkpoint is deleted)"
            )
        return None

    def _check_resumable(self, checkpoint: Path, state: dict) -> None:
        """UserError if the checkpoint holds another model than the one this run trains."""
        check_compatible(load_config(checkpoint), self.model_config, checkpoint)

    def _run_identity(self) -> dict:
        """The train_config.json entries that make a run this run (--resume of a run with no checkpoint checks them)."""
        return {"data": self.config.data, "model": self.model_config.to_dict()}

    def _check_same_run(self) -> None:
        """UserError if RUN_DIR's train_config.json records another run than this one (other data or model)."""
        path = self.run_dir / TRAIN_CONFIG
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError):
            record = None
        if not isinstance(record, dict):
            raise UserError(f"--resume: {path} is not a run record; pass --force to start a new run in {self.run_dir}")
        differences = [name for name, now in self._run_identity().items() if record.get(name) != now]
        if differences:
            raise UserError(
                f"--resume: {self.run_dir} holds no checkpoint, and its {TRAIN_CONFIG} records another run (its "
                f"{' and '.join(differences)} differ): pass --force to start this one there, or choose another --out"
            )

    def _describe(self) -> str:
        """What is trained, for the log."""
        return f"preset {self.config.preset}"

    def _build_model(self, resumed: bool) -> GPTOSS:
        device, options = self.ctx.device, self.config.runtime_options
        if resumed:
            model = from_pretrained(checkpoint_dir(self.run_dir), device=device, options=options)
        elif self.config.init_from:  # a fine-tune: the checkpoint's weights (a LoRA run's merged) in this run's config
            model = load_whole_model(resolve_checkpoint(self.config.init_from), device=device, options=options,
                                     **self.model_config.to_dict())  # fmt: skip
        else:
            torch.manual_seed(self.config.seed)  # every process initialises the same weights
            with torch.device(device):
                model = GPTOSS(self.model_config, options)
        return model.train()

    def _restore(self, state: dict) -> None:
        load_optimizer_state(checkpoint_dir(self.run_dir), self.model, self.optimizer)
        if len(state["rng"]) == self.ctx.world_size:  # with another number of processes, keep the fresh seeds
            set_rng_state(state["rng"][self.ctx.rank])
        if state.get("grad_scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["grad_scaler"])
        self.step, self.tokens = state["step"], state["tokens"]
        self.seconds, self.warmup_end_seconds = state["seconds"], state["warmup_end_seconds"]
        self.best_val_loss = state["best_val_loss"] if state["best_val_loss"] is not None else math.inf

    def _start_records(self, n_params: int, resumed: bool) -> None:
        """train_config.json and the log header (rank 0); a forced new run first drops the old checkpoint."""
        config, log = self.config, self.logger
        if self.ctx.is_main:
            if config.force:
                shutil.rmtree(checkpoint_dir(self.run_dir), ignore_errors=True)
            record = {**config.to_dict(), "world_size": self.ctx.world_size, "model": self.model_config.to_dict()}
            (self.run_dir / TRAIN_CONFIG).write_text(json.dumps(record, indent=2) + "\n")
        for line in environment_lines():
            log.info(line)
        for note in self.notes:
            log.info(note)
        log.info(
            f"{'resuming at step ' + str(self.step) if resumed else 'new run'} in {self.run_dir}: {self._describe()}, "
            f"{n_params:,} parameters, vocabulary {self.model_config.vocab_size} ({self.model_config.tokenizer})"
        )
        log.info(
            f"{self.ctx.world_size} process(es) ({config.distributed}) on {self.ctx.device.type}, {config.dtype}; "
            f"{config.tokens_per_step:,} tokens per step ({config.batch_size} x {config.seq_len} x "
            f"{config.grad_accum_steps}), {config.max_steps} steps"
            + (f", at most {config.max_minutes:g} minutes" if config.max_minutes else "")
        )
        log.info(
            f"checkpoints every {config.save_every} steps or {config.save_every_minutes:g} minutes, whichever comes "
            f"first; {config.runtime_options}"
        )
        if self.host_memory is not None:
            log.info("host memory: " + self.host_memory)

    # --- the loop ---------------------------------------------------------------------------------------------
    def run(self) -> dict:
        config = self.config
        if self.step >= config.max_steps:
            self.logger.info(f"already at step {self.step} of --max-steps {config.max_steps}: nothing to do")
            return {}
        self.started = time.monotonic() - self.seconds
        interval_seconds, interval_tokens, last_eval = 0.0, 0, {}
        while True:
            began = time.perf_counter()
            row, out_of_time = self.train_step()
            interval_seconds += time.perf_counter() - began
            interval_tokens += config.tokens_per_step
            done = self.step >= config.max_steps or out_of_time
            self.logger.advance(row["loss"], interval_tokens / interval_seconds)
            if self.step % config.log_every == 0 or done:
                row.update(tokens_per_sec=interval_tokens / interval_seconds, elapsed_s=self.seconds)
                self.logger.log_step(row, config.max_steps)
                interval_seconds, interval_tokens = 0.0, 0
            if self.step % config.eval_every == 0 or done:
                last_eval = self.evaluate()
            if self.step % config.save_every == 0 or done or self._save_is_due():
                self.save()
            if done:
                break
        if out_of_time:
            self.logger.info(f"--max-minutes {config.max_minutes:g} spent: stopped at step {self.step}")
        return last_eval

    def train_step(self) -> tuple[dict, bool]:
        """One optimizer step -> (metrics row, whether the time budget is spent), the same on every process."""
        config, ctx = self.config, self.ctx
        if self.warmup_end_seconds is None and self.step >= config.warmup_steps:
            self.warmup_end_seconds = self.seconds
        lr = lr_at(self.step, config.learning_rate, config.min_lr, config.warmup_steps, config.max_steps,
                   self.time_progress())  # fmt: skip
        set_lr(self.optimizer, lr)
        accum = config.grad_accum_steps
        sums = None
        for micro_step in range(accum):
            input_ids, labels, weight = self.micro_batch(self.step, micro_step)
            input_ids, labels = (t.to(ctx.device, non_blocking=True) for t in (input_ids, labels))
            with distributed.gradient_sync(self.model, ctx, enabled=micro_step == accum - 1):
                with self._autocast():
                    out = self.model(input_ids, labels=labels, return_logits=False)
                    if weight != 1:  # fine-tuning: the micro-batch's share of the step's targets
                        out.lm_loss = out.lm_loss * weight
                        out.loss = out.lm_loss + out.aux_loss
                self.scaler.scale(out.loss / accum).backward()
            stats = step_statistics(out)
            sums = stats if sums is None else sums + stats

        self.scaler.unscale_(self.optimizer)
        max_norm = config.grad_clip if config.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor
            grad_norm = grad_norm.full_tensor()
        # One collective for everything logged and for the clock: the processes' mean elapsed time, so that all of
        # them agree on the learning rate and on when the budget is spent.
        elapsed = torch.tensor([time.monotonic() - self.started], device=sums.device)
        totals = ctx.all_reduce_sum(torch.cat([sums, elapsed])).tolist()
        self.seconds = totals[-1] / ctx.world_size
        row = self._metrics_row(totals[:-1], grad_norm.item(), lr)

        # float16's scaler skips overflowing gradient steps itself (and lowers the scale): only a bad loss counts.
        finite = math.isfinite(row["loss"]) and (self.scaler.is_enabled() or math.isfinite(row["grad_norm"]))
        if finite:
            self.nan_streak = 0
            self.scaler.step(self.optimizer)
        else:
            self._skip_step(row)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += config.tokens_per_step
        out_of_time = config.max_minutes is not None and self.seconds >= 60 * config.max_minutes
        return {"step": self.step, "tokens": self.tokens, **row}, out_of_time

    def _save_is_due(self) -> bool:
        """Whether save_every_minutes have passed since the last save (the same answer on every process: `seconds`
        is their mean)."""
        return self.seconds - self.last_save_seconds >= 60 * self.config.save_every_minutes

    def time_progress(self) -> float:
        """The share of the --max-minutes budget left after the warm-up that is spent (0 without a budget)."""
        if self.config.max_minutes is None or self.warmup_end_seconds is None:
            return 0.0
        after_warmup = 60 * self.config.max_minutes - self.warmup_end_seconds
        return (self.seconds - self.warmup_end_seconds) / after_warmup if after_warmup > 0 else 1.0

    def _skip_step(self, row: dict) -> None:
        self.nan_streak += 1
        self.logger.info(
            f"warning: step {self.step + 1}: loss {row['loss']}, gradient norm {row['grad_norm']}: not finite; "
            f"update skipped ({self.nan_streak} in a row)"
        )
        if self.nan_streak >= self.config.max_nan_steps:
            raise UserError(
                f"the loss or gradients were NaN/inf for {self.nan_streak} steps in a row (up to step {self.step + 1});"
                f" stopped. Lower --learning-rate, or use --dtype float32, and --resume from the last checkpoint"
            )

    def _metrics_row(self, totals: list[float], grad_norm: float, lr: float) -> dict:
        """The all-reduced sums of `step_statistics` -> means over micro-steps and processes, load fractions."""
        n = self.config.grad_accum_steps * self.ctx.world_size
        L, E = self.model_config.num_hidden_layers, self.model_config.num_local_experts
        loss, lm_loss, aux_loss = (value / n for value in totals[:3])
        counts = torch.tensor(totals[3 + 2 * L :]).view(L, E)
        return {
            "loss": loss,
            "lm_loss": lm_loss,
            "aux_loss": aux_loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "load_balancing_loss": [value / n for value in totals[3 : 3 + L]],
            "z_loss": [value / n for value in totals[3 + L : 3 + 2 * L]],
            "expert_load": (counts / counts.sum(dim=1, keepdim=True)).tolist(),
        }

    def _autocast(self):
        return torch.autocast(self.ctx.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    # --- evaluation and saving ----------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean next-token loss over the fixed validation batches (all processes' rows), with perplexity and bits
        per byte (loss in bits times the data's val tokens per byte). Each batch's mean loss counts `weight` times
        (1 for pretraining's equal windows); a batch of weight 0 holds no target on this process and is run only
        so that every process runs as many (FSDP gathers weights in lockstep)."""
        self.model.eval()
        total = torch.zeros((), device=self.ctx.device)
        for input_ids, labels, weight in self.val_batches:
            input_ids, labels = (t.to(self.ctx.device, non_blocking=True) for t in (input_ids, labels))
            with self._autocast():
                lm_loss = self.model(input_ids, labels=labels, return_logits=False).lm_loss.float()
            if weight:
                total += lm_loss * weight
        self.model.train()
        val_loss = self.ctx.all_reduce_sum(total).item() / (len(self.val_batches) * self.ctx.world_size)
        self.best_val_loss = min(self.best_val_loss, val_loss)
        row = {
            "step": self.step,
            "tokens": self.tokens,
            "val_loss": val_loss,
            "val_ppl": math.exp(min(val_loss, 700.0)),  # exp overflows past ~709
            "val_bpb": val_loss * self.bits_per_nat if self.bits_per_nat else None,
        }
        self.logger.log_eval(row)
        return row

    def save(self) -> None:
        state = {
            "step": self.step,
            "tokens": self.tokens,
            "seconds": self.seconds,
            "warmup_end_seconds": self.warmup_end_seconds,
            "best_val_loss": self.best_val_loss if math.isfinite(self.best_val_loss) else None,
            "grad_scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "train_config": self.config.to_dict(),
        }
        save_checkpoint(self.run_dir, self.model, self.optimizer, self._write_weights, state, self.tokenizer_file,
                        self.ctx, self.trainable_only)  # fmt: skip
        self.last_save_seconds = self.seconds
        self.logger.info(f"saved {checkpoint_dir(self.run_dir)} at step {self.step}")

    def _write_weights(self, state: dict[str, torch.Tensor], directory: Path) -> None:
        """Write the model's (full, unsharded) state into the checkpoint folder being made: as a model directory."""
        write_model_state(self.model_config, state, directory)


def step_statistics(out: CausalLMOutput) -> torch.Tensor:
    """What one micro-step contributes to the logs, as one vector (so that one collective reduces it all):
    [loss, lm_loss, aux_loss, load-balancing loss per layer (L), z loss per layer (L), expert counts (L x E)]."""
    stats = out.router_stats
    return torch.cat([
        torch.stack([out.loss, out.lm_loss, out.aux_loss]).detach().float(),
        torch.stack([s.load_balancing_loss for s in stats]).detach().float(),
        torch.stack([s.z_loss for s in stats]).detach().float(),
        torch.stack([s.expert_counts for s in stats]).float().flatten(),
    ])  # fmt: skip
