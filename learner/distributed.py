"""Data-parallel generation: users split across processes started by `torchrun`.

`torchrun --nproc-per-node N -m chatbot.cli learn generate ...` starts one process per GPU;
each reads its rank from the environment `torchrun` sets, takes every N-th user, and decodes
its share on its own GPU into the shared corpus store. Row seeds come from the run seed and
each dialogue's own state (`learner.generate`), so the corpus is the same as one process
would make with the same seed. Without `torchrun` there is one rank and nothing changes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

__all__ = ["Rank", "barrier", "current_rank", "setup", "shard_positions", "teardown"]

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Rank:
    index: int = 0
    world: int = 1
    local: int = 0

    @property
    def main(self) -> bool:
        return self.index == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def current_rank() -> Rank:
    """This process's place in a `torchrun` launch (one rank when not launched so)."""
    return Rank(
        index=int(os.environ.get("RANK", "0")),
        world=int(os.environ.get("WORLD_SIZE", "1")),
        local=int(os.environ.get("LOCAL_RANK", "0")),
    )


def setup(rank: Rank) -> None:
    """Join the process group (NCCL on GPUs, gloo on CPUs) and pin this rank's GPU."""
    if not rank.distributed or dist.is_initialized():
        return
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(rank.local % torch.cuda.device_count())
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    log.info("rank %d of %d joined (%s)", rank.index, rank.world, "nccl" if cuda else "gloo")


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(rank: Rank) -> None:
    if rank.distributed and dist.is_initialized():
        dist.barrier()


def shard_positions(items: Sequence[T], rank: Rank) -> list[int]:
    """The positions of ``items`` this rank handles: every ``world``-th, from its index."""
    return list(range(rank.index, len(items), rank.world))
