"""The order real images are drawn in: seeded, sharded per rank, resumable from a count.

Epoch e is a permutation of the dataset from a generator seeded by (seed, e); rank r of W takes
every W-th entry starting at r. With gradient accumulation (``accum`` micro-batches of ``batch``
per step) each step's ``batch * accum`` entries of a rank are dealt to its micro-batches like cards
(micro-batch k takes every accum-th entry from k), so image i of micro-batch k on rank r is entry
``i * accum * W + k * W + r`` of the step: the position :mod:`stylenat.train.draws` gives its
random numbers, and the same image a single batch of ``batch * accum * W`` would hold there.

The stream is a pure function of how many images this rank has consumed, so the checkpoint saves
that one number and a resumed run continues mid-epoch.
"""

from __future__ import annotations

import itertools
from typing import Iterator

import torch
from torch.utils.data import Sampler

from stylenat.errors import ConfigError, DataError


class ShardedStream(Sampler[int]):
    """Infinite index stream for one rank, starting after ``consumed`` indices (whole steps)."""

    def __init__(self, size: int, seed: int, rank: int = 0, world: int = 1, consumed: int = 0,
                 batch: int = 1, accum: int = 1):
        if size < world:
            raise DataError(f"the dataset has {size} images, fewer than the {world} ranks training on it")
        if consumed % (batch * accum):
            raise ConfigError(f"the checkpoint's data position ({consumed} images per rank) is not a whole number of "
                              f"steps of batch {batch} x accum {accum}: batch or accum changed since it was written; "
                              "resume with the run's own config.json")
        self.size, self.seed, self.rank, self.world, self.consumed = size, seed, rank, world, consumed
        self.batch, self.accum = batch, accum
        self.per_rank = size // world  # the remainder of each epoch is dropped so ranks stay in step

    def permutation(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=gen)

    def _shards(self) -> Iterator[int]:
        """This rank's entries in epoch order, from ``consumed`` on."""
        epoch, pos = divmod(self.consumed, self.per_rank)
        while True:
            shard = self.permutation(epoch)[self.rank :: self.world][: self.per_rank]
            yield from shard[pos:].tolist()
            epoch, pos = epoch + 1, 0

    def __iter__(self) -> Iterator[int]:
        shards = self._shards()
        if self.accum == 1:
            yield from shards
            return
        while True:
            step = list(itertools.islice(shards, self.batch * self.accum))
            for k in range(self.accum):
                yield from step[k :: self.accum]
