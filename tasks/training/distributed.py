"""Process group of a training run: one process, or one rank of ``torchrun`` (DDP).

``torchrun`` sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` (and the rendezvous address); with
``WORLD_SIZE > 1`` :func:`distributed` joins the group: NCCL on CUDA (one GPU per local rank), gloo
on the CPU. Without those variables the run is a single process and no collective is ever called.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

__all__ = ["DistContext", "distributed", "world_from_env"]


def world_from_env() -> tuple[int, int, int]:
    """``(rank, local_rank, world_size)`` from the torchrun environment; ``(0, 0, 1)`` without it."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise ValueError(f"torchrun environment is malformed (RANK/LOCAL_RANK/WORLD_SIZE): {exc}") from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"torchrun environment: RANK={rank} is not in a world of WORLD_SIZE={world}")
    return rank, local, world


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank, the world size and its device."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        """True when collectives are needed (more than one rank)."""
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def any(self, flag: bool) -> bool:
        """True if ``flag`` is true on any rank (collective)."""
        if not self.active:
            return bool(flag)
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


@contextlib.contextmanager
def distributed(device: str, timeout_s: float = 1800.0) -> Iterator[DistContext]:
    """Join the torchrun process group (if any) for ``device`` (``"cpu"`` or ``"cuda"``); leave it on exit."""
    rank, local, world = world_from_env()
    if device == "cuda":
        if local >= torch.cuda.device_count():
            raise ValueError(f"local rank {local} has no GPU (torch sees {torch.cuda.device_count()}); "
                             "use --nproc-per-node <= the number of GPUs")
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    joined = False
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device == "cuda" else "gloo"
        kwargs = {"device_id": dev} if device == "cuda" else {}
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
        joined = True
    try:
        yield DistContext(rank, local, world, dev)
    finally:
        if joined and dist.is_initialized():
            dist.destroy_process_group()
