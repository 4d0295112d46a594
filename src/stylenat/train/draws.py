"""Random numbers that do not depend on how a step's batch is split over processes and micro-batches.

A training step shows D ``T = batch * accum * world`` images. Image ``i`` of micro-batch ``k`` on
rank ``r`` sits at position ``p = i * accum * world + k * world + r`` of the step (the data order of
:class:`~stylenat.train.sampler.ShardedStream` puts it there too). Every random tensor of a step is
drawn for all ``T`` positions from a generator seeded by (run seed, step, purpose, call number), and
each micro-batch keeps its own rows. So 2 processes x batch 4, 1 x accum 2 x batch 4 and 1 x batch 8
see the same latents, classes and augmentations, image for image, and a step's numbers are a pure
function of the seed and the step: nothing to save in a checkpoint.

The interleaved positions also keep the discriminator's minibatch-stddev groups (sample ``b`` of a
batch of ``B`` is in group ``b mod B/G``) the same for every split whose device batch holds at
least one whole group: each device batch is then a union of the step's groups.

Code that augments takes any object with these ``rand``/``randn``/``randint`` methods;
:class:`GeneratorDraws` wraps a plain ``torch.Generator`` (sequential draws), and :func:`as_draws`
accepts either.
"""

from __future__ import annotations

import hashlib
from typing import Protocol

import torch
from torch import Tensor


class Draws(Protocol):
    """Where augmentations and latents take their random numbers from (the first dimension of a
    shape is the number of images)."""

    def rand(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor: ...

    def randn(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor: ...

    def randint(self, low: int, high: int, shape: tuple[int, ...]) -> Tensor: ...


class GeneratorDraws:
    """Sequential draws from one ``torch.Generator``, on the generator's device."""

    def __init__(self, gen: torch.Generator):
        self.gen = gen

    def rand(self, shape, dtype=torch.float32):
        return torch.rand(tuple(shape), generator=self.gen, dtype=dtype, device=self.gen.device)

    def randn(self, shape, dtype=torch.float32):
        return torch.randn(tuple(shape), generator=self.gen, dtype=dtype, device=self.gen.device)

    def randint(self, low, high, shape):
        return torch.randint(low, high, tuple(shape), generator=self.gen, device=self.gen.device)


def as_draws(source: Draws | torch.Generator) -> Draws:
    """``source`` itself, or a plain generator wrapped in :class:`GeneratorDraws`."""
    return GeneratorDraws(source) if isinstance(source, torch.Generator) else source


class StepDraws:
    """One micro-batch's rows of the random tensors of a step (see the module docstring).

    seed: the run's seed. key: what the numbers are for, e.g. ``(step, "d", "z")``; every call
    draws under ``key`` and its call number, so two purposes never share numbers.
    rows: the step positions of this micro-batch's images. total: the step's image count ``T``.
    """

    def __init__(self, seed: int, key: tuple, rows: Tensor, total: int):
        self.seed, self.key, self.rows, self.total = seed, tuple(key), rows, total
        self.calls = 0

    @classmethod
    def for_micro_batch(cls, seed: int, key: tuple, batch: int, micro: int, accum: int, rank: int, world: int) -> StepDraws:
        """The draws of micro-batch ``micro`` (of ``accum``) on ``rank`` (of ``world``), ``batch`` images each."""
        rows = torch.arange(batch) * (accum * world) + micro * world + rank
        return cls(seed, key, rows, batch * accum * world)

    def scope(self, *names) -> StepDraws:
        """Draws for a sub-purpose (same images), independent of this object's own calls."""
        return StepDraws(self.seed, self.key + names, self.rows, self.total)

    def _generator(self) -> torch.Generator:
        text = repr((self.seed, self.key, self.calls)).encode()
        self.calls += 1
        return torch.Generator().manual_seed(int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1)

    def _full(self, shape) -> tuple[int, ...]:
        shape = tuple(shape)
        if not shape or shape[0] != len(self.rows):
            raise ValueError(f"a step draw's first dimension is the micro-batch ({len(self.rows)} images), got shape {shape}")
        return (self.total, *shape[1:])

    def rand(self, shape, dtype=torch.float32):
        return torch.rand(self._full(shape), generator=self._generator(), dtype=dtype)[self.rows]

    def randn(self, shape, dtype=torch.float32):
        return torch.randn(self._full(shape), generator=self._generator(), dtype=dtype)[self.rows]

    def randint(self, low, high, shape):
        return torch.randint(low, high, self._full(shape), generator=self._generator())[self.rows]
