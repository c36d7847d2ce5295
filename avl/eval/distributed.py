"""Data-parallel evaluation under ``torchrun``: rank / world from the environment, a gloo group,
strided sharding, and gathering Python objects to rank 0."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch.distributed as dist

__all__ = ["Dist", "shard"]

T = TypeVar("T")


def shard(items: Sequence[T], rank: int, world: int) -> list[T]:
    """Strided sharding: rank r takes items r, r + world, r + 2 * world, ..."""
    return list(items[rank::world])


@dataclass
class Dist:
    """This process's place in the run. A single process is rank 0 of 1 and needs no group."""

    rank: int = 0
    world: int = 1
    owns_group: bool = False
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Dist:
        """Join the torchrun group (gloo: CPU objects only) when ``WORLD_SIZE`` > 1."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        owns = False
        if not dist.is_initialized():
            dist.init_process_group("gloo")
            owns = True
        return cls(dist.get_rank(), dist.get_world_size(), owns, int(os.environ.get("LOCAL_RANK", "0")))

    def device(self, device: str) -> str:
        """A plain ``"cuda"`` becomes this process's GPU (``cuda:<LOCAL_RANK>``) in a group."""
        return f"cuda:{self.local_rank}" if device == "cuda" and self.world > 1 else device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj`, in rank order, on rank 0 (None on the others)."""
        if self.world == 1:
            return [obj]
        out: list[Any] | None = [None] * self.world if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False
