"""torch.distributed plumbing for `fiore train` under torchrun (or any launcher that sets RANK/WORLD_SIZE).

Single-process runs need no launcher: `setup()` returns a world of one and every helper is a no-op.
Backend: nccl when CUDA is used, else gloo (CPU, multi-machine over TCP).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str = "auto") -> World:
    """Join the process group named by the torchrun environment (if any) and pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return World(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def gather_objects(world: World, obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on rank 0; [] elsewhere (single process: [obj])."""
    if not world.distributed:
        return [obj]
    out = [None] * world.world_size if world.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out or []


def scatter_object(world: World, objs: list | None):
    """Rank r receives objs[r] (objs given on rank 0)."""
    if not world.distributed:
        return objs[0]
    out = [None]
    dist.scatter_object_list(out, objs if world.is_main else None, src=0)
    return out[0]


def all_reduce_sum(world: World, t: torch.Tensor) -> torch.Tensor:
    if world.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def cleanup(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
