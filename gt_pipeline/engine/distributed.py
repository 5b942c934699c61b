"""Data parallelism for the engine: torch.distributed set up from torchrun's environment.

`train()` calls `setup()`; outside torchrun (no WORLD_SIZE, or WORLD_SIZE=1) it is a no-op and the
engine runs exactly as a single process. Under torchrun every rank runs the same loop, DDP averages
the gradients, and only rank 0 writes checkpoints and logs (see train.py). Backend: NCCL on CUDA
(one GPU per rank, cuda:LOCAL_RANK), gloo on CPU (what the tests use).

    torchrun --standalone --nproc-per-node 2 -m gt_pipeline.engine.train --shards ... --steps 50
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # setup() created the process group, so teardown() destroys it

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device: torch.device) -> tuple[DistContext, torch.device]:
    """Join the torchrun job described by RANK / WORLD_SIZE / LOCAL_RANK (MASTER_ADDR/PORT come from
    torchrun too). Returns the rank's context and its device (cuda:LOCAL_RANK on CUDA)."""
    world = env_world_size()
    if world <= 1:
        return DistContext(), device
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={world} but {missing} are not set: launch data-parallel training with "
                         "`torchrun --nproc-per-node N ...` (or unset WORLD_SIZE for one process)")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        n_gpu = torch.cuda.device_count()
        if local_rank >= n_gpu:
            raise ValueError(f"LOCAL_RANK={local_rank} but this node has {n_gpu} visible GPUs: "
                             f"use --nproc-per-node <= {n_gpu} (or device=cpu for gloo on CPU)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if dist.get_world_size() != world or dist.get_rank() != rank:
        raise RuntimeError(f"the process group ({dist.get_rank()}/{dist.get_world_size()}) does not match "
                           f"RANK={rank} WORLD_SIZE={world}")
    return DistContext(rank, world, local_rank, owns), device


def teardown(ctx: DistContext) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext, device: torch.device) -> None:
    if ctx.enabled:
        dist.barrier(device_ids=[device.index] if device.type == "cuda" else None)


def all_reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """In-place sum over ranks (gloo and NCCL both have SUM; AVG is NCCL-only)."""
    if ctx.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def check_same(ctx: DistContext, value: int, device: torch.device, what: str, fix: str) -> None:
    """Raise on every rank if the ranks see different values of `value` (e.g. the latest checkpoint)."""
    if not ctx.enabled:
        return
    t = torch.tensor([value, -value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    hi, lo = int(t[0]), -int(t[1])
    if hi != lo:
        raise RuntimeError(f"the ranks disagree on {what}: rank {ctx.rank} sees {value}, others between {lo} and "
                           f"{hi}. {fix}")
