"""torch.distributed plumbing for `torchrun`: process group, rank helpers, a deterministic sharded sampler."""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
import torch.distributed as dist


def init_from_environment(device: str) -> tuple[int, int]:
    """Join the process group torchrun describes (RANK / WORLD_SIZE); returns (rank, world_size).

    gloo on CPU, nccl on CUDA. Without torchrun's variables this is a single process: (0, 1).
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1
    world_size = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend=backend)
    return rank, world_size


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class ShardedSampler:
    """Epoch-seeded permutation of a dataset, cut into `world_size` interleaved shards.

    The global order depends only on (seed, epoch), so one process with batch 2B sees exactly the images
    that two processes with batch B see together, and a resumed run sees the same order. Indices are
    repeated at the end of an epoch so every shard has the same length.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        if size <= 0:
            raise ValueError("cannot sample from an empty dataset")
        self.size = size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle

    def global_order(self, epoch: int) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        padded = -(-self.size // self.world_size) * self.world_size
        return (order * (padded // self.size + 1))[:padded]

    def shard(self, epoch: int) -> list[int]:
        return self.global_order(epoch)[self.rank :: self.world_size]

    def batches(self, epoch: int, batch_size: int) -> Iterator[list[int]]:
        """This rank's batches of an epoch (the last incomplete batch is dropped, as training does)."""
        indices = self.shard(epoch)
        for start in range(0, len(indices) - batch_size + 1, batch_size):
            yield indices[start : start + batch_size]

    def batches_per_epoch(self, batch_size: int) -> int:
        return len(self.shard(0)) // batch_size
