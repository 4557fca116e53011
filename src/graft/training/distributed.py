"""Running the same training under `torchrun` / `accelerate launch`: plain torch.distributed.

graft starts no processes of its own. When a launcher has set `WORLD_SIZE` > 1, `setup()` joins
the process group the launcher described (NCCL on GPUs, gloo on CPUs); every helper below is a
no-op in a single process, so the code paths are the same.

What runs where:
- feature (and frozen-prefix) extraction: each rank computes a strided shard of the images not yet
  cached, the shards are gathered, and every rank holds all features; only rank 0 writes the cache;
- training on cached features: every rank trains the same small head on the same features with
  the same seed, which gives the same result as one process without any communication;
- training on images: the model is wrapped in DistributedDataParallel over its trainable
  parameters only (frozen ones are not registered, so DDP never waits for their gradients), each
  rank sees its shard of every epoch; validation logits are gathered without the padding a
  DistributedSampler would add, so metrics count each image once even with an uneven last batch;
- files (run folder, bundle, report, checkpoints): rank 0 only.
"""

from __future__ import annotations

import os
from typing import Any, Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def setup(device: torch.device) -> None:
    """Join the launcher's process group if there is one (idempotent)."""
    if world_size_from_env() <= 1 or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def launcher_rank() -> int:
    """This process's rank as the launcher set it (`RANK`), known before `setup()` joins the group."""
    return int(os.environ.get("RANK", "0"))


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def shard(indices: Sequence[int]) -> list[int]:
    """This rank's strided share of `indices` (rank r takes items r, r + W, r + 2W, ...)."""
    return list(indices)[rank() :: world_size()]


def gather_shards(local: dict[Any, T]) -> dict[Any, T]:
    """Merge every rank's dict (keys are disjoint) on every rank."""
    if not active():
        return local
    parts: list[dict[Any, T] | None] = [None] * world_size()
    dist.all_gather_object(parts, local)
    merged: dict[Any, T] = {}
    for part in parts:
        merged.update(part or {})
    return merged


def local_device(device: torch.device) -> torch.device:
    """On GPUs, each rank uses the GPU its launcher assigned (LOCAL_RANK)."""
    if device.type == "cuda" and active():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` in DistributedDataParallel over its trainable parameters (itself in one process)."""
    if not active() or not any(p.requires_grad for p in model.parameters()):
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def from_main(value: T) -> T:
    """Rank 0's `value` on every rank (a decision all ranks must share); `value` in one process."""
    if not active():
        return value
    holder: list[Any] = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
