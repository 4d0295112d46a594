"""The order real images are drawn in: seeded, sharded per rank, resumable from a count.

Epoch e is a permutation of the dataset from a generator seeded by (seed, e); rank r of W takes
every W-th entry starting at r. The stream is a pure function of how many images this rank has
consumed, so the checkpoint saves that one number and a resumed run continues mid-epoch.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler

from stylenat.errors import DataError


class ShardedStream(Sampler[int]):
    """Infinite index stream for one rank, starting after ``consumed`` indices."""

    def __init__(self, size: int, seed: int, rank: int = 0, world: int = 1, consumed: int = 0):
        if size < world:
            raise DataError(f"the dataset has {size} images, fewer than the {world} ranks training on it")
        self.size, self.seed, self.rank, self.world, self.consumed = size, seed, rank, world, consumed
        self.per_rank = size // world  # the remainder of each epoch is dropped so ranks stay in step

    def permutation(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=gen)

    def __iter__(self) -> Iterator[int]:
        epoch, pos = divmod(self.consumed, self.per_rank)
        while True:
            shard = self.permutation(epoch)[self.rank :: self.world][: self.per_rank]
            yield from shard[pos:].tolist()
            epoch, pos = epoch + 1, 0
