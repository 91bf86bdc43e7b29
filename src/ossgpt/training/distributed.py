"""Several training processes (torchrun): the process group, wrapping the model, collectives.

    ctx = setup("ddp", "auto")                  # RANK, WORLD_SIZE, LOCAL_RANK come from torchrun
    model = parallelize(model, ctx, compile=False)
    ctx.all_reduce_sum(stats); ctx.barrier()
    teardown()

Parallelism is applied to the model from here; the model itself never imports torch.distributed.
  none  one process
  ddp   DistributedDataParallel: every process holds the whole model; gradients are all-reduced (averaged)
  fsdp  FSDP2 `fully_shard` on each block, then on the root (embeddings, final norm, head): parameters,
        gradients and optimizer state are sharded over the processes and gathered one block at a time
Both average gradients over processes, so N processes with B/N sequences each take the step that one process
with B sequences would (up to float rounding). The backend is NCCL on GPUs, gloo on CPUs.

`--compile` compiles each block separately, before wrapping: the compiled regions stay small (fast to compile,
no recompiles across blocks of the same shape) and DDP's/FSDP's hooks stay outside them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ossgpt.devices import resolve_device
from ossgpt.errors import UserError

try:
    from torch.distributed.fsdp import fully_shard  # torch >= 2.6
except ImportError:  # pragma: no cover - older torch
    from torch.distributed._composable.fsdp import fully_shard


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank among world_size processes, and its device."""

    mode: str  # "none", "ddp" or "fsdp"
    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and prints."""
        return self.rank == 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over all processes, in place; returns it."""
        if self.mode != "none":
            dist.all_reduce(tensor)
        return tensor

    def all_gather_object(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every process."""
        if self.mode == "none":
            return [obj]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def barrier(self) -> None:
        if self.mode != "none":
            dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)


def setup(mode: str, device: str) -> DistContext:
    """This process's context; joins the process group torchrun set up (once: a second call reuses it)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if mode == "none":
        if world_size > 1:
            raise UserError(f"this is one of {world_size} torchrun processes: pass --distributed ddp or fsdp")
        return DistContext(mode, resolve_device(device, 0))
    if "RANK" not in os.environ or "LOCAL_RANK" not in os.environ:
        raise UserError(
            f"--distributed {mode} needs several processes: run `torchrun --nproc_per_node=N -m ossgpt train ... "
            f"--distributed {mode}`"
        )
    local_rank = int(os.environ["LOCAL_RANK"])
    target = resolve_device(device, local_rank)
    if target.type == "cuda":
        torch.cuda.set_device(target)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo")
    return DistContext(mode, target, int(os.environ["RANK"]), local_rank, world_size)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------
def parallelize(model: nn.Module, ctx: DistContext, compile: bool, log: Callable[[str], None]) -> nn.Module:  # noqa: A002
    """`model` (on ctx.device), with each block compiled if asked, wrapped for ctx.mode. Build the optimizer
    after this: FSDP replaces the parameters by sharded ones."""
    if compile:
        compile_blocks(model, log)
    if ctx.mode == "ddp":
        return DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    if ctx.mode == "fsdp":
        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
    return model


def compile_blocks(model: nn.Module, log: Callable[[str], None]) -> None:
    """torch.compile each block in place; a block that fails to compile runs eagerly instead, with a warning."""
    import torch._dynamo

    # Compilation happens lazily at the first forward; this makes a failure there fall back to eager mode
    # (dynamo logs why) instead of killing the run.
    torch._dynamo.config.suppress_errors = True
    try:
        for layer in model.layers:
            layer.compile()
    except Exception as err:  # noqa: BLE001 - any failure to set up compilation means: train uncompiled
        log(f"warning: torch.compile is unavailable ({type(err).__name__}: {err}); training without it")


def gradient_sync(model: nn.Module, ctx: DistContext, enabled: bool):
    """Context for one micro-step's backward: gradients are synchronised across processes only when `enabled`
    (the last micro-step of an optimizer step), saving a collective per accumulated micro-step."""
    if ctx.mode == "ddp" and not enabled:
        return model.no_sync()
    if ctx.mode == "fsdp":
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()
