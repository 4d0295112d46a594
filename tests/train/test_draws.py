"""A step's random numbers and data order do not depend on how its batch is split: closed-form
checks of the positions that stylenat.train.draws and ShardedStream share."""

from __future__ import annotations

import itertools

import pytest
import torch

from stylenat.errors import ConfigError
from stylenat.models import build_discriminator
from stylenat.models.config import DiscriminatorConfig
from stylenat.train.draws import GeneratorDraws, StepDraws
from stylenat.train.sampler import ShardedStream

SPLITS = [(8, 1, 1), (4, 1, 2), (4, 2, 1), (2, 2, 2), (2, 1, 4), (1, 8, 1)]  # (batch, accum, world): 8 images a step


def _micro_batches(batch, accum, world, steps=6, size=20, consumed_steps=0):
    """{(step, rank, micro): data indices} of every micro-batch, from each rank's own stream."""
    out = {}
    for r in range(world):
        it = iter(ShardedStream(size, 5, r, world, consumed_steps * batch * accum, batch, accum))
        for s, k in itertools.product(range(consumed_steps, consumed_steps + steps), range(accum)):
            out[s, r, k] = [next(it) for _ in range(batch)]
    return out


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("size", [20, 11])
def test_image_i_of_micro_k_on_rank_r_is_at_the_same_step_position_for_every_split(split, size):
    """Over 6 steps of 8 images, so epochs end inside steps. Each rank drops the remainder of an
    epoch (size mod processes), so with processes that do not divide the dataset the runs part at
    the first epoch's end; micro-batches alone never do."""
    batch, accum, world = split
    whole = _micro_batches(8, 1, 1, size=size)
    same = [(s, r, k) for (s, r, k), indices in _micro_batches(*split, size=size).items()
            if indices == [whole[s, 0, 0][p] for p in StepDraws.for_micro_batch(0, (), batch, k, accum, r, world).rows.tolist()]]
    if size % world == 0:
        assert len(same) == 6 * accum * world
    else:
        assert {s for s, _, _ in same} >= {0}  # the first steps of the first epoch still agree


def test_a_resumed_stream_continues_the_dealt_order():
    full = _micro_batches(2, 2, 2, steps=4)
    later = _micro_batches(2, 2, 2, steps=2, consumed_steps=2)
    assert all(later[key] == full[key] for key in later)
    with pytest.raises(ConfigError, match="whole number of steps"):
        ShardedStream(40, 5, consumed=3, batch=2, accum=2)


@pytest.mark.parametrize("split", SPLITS)
def test_micro_batch_draws_are_rows_of_the_whole_steps_draws(split):
    batch, accum, world = split
    whole = StepDraws.for_micro_batch(3, (7, "d"), 8, 0, 1, 0, 1)
    expected = [whole.rand((8, 2)), whole.randn((8, 5), dtype=torch.float64), whole.scope("z").randint(0, 100, (8, 1, 1))]
    for r, k in itertools.product(range(world), range(accum)):
        draws = StepDraws.for_micro_batch(3, (7, "d"), batch, k, accum, r, world)
        got = [draws.rand((batch, 2)), draws.randn((batch, 5), dtype=torch.float64), draws.scope("z").randint(0, 100, (batch, 1, 1))]
        for e, g in zip(expected, got):
            assert torch.equal(e[draws.rows], g)


def test_draws_differ_by_seed_step_purpose_and_call():
    def first(seed=3, key=(7, "d"), calls=0):
        d = StepDraws(seed, key, torch.arange(4), 4)
        for _ in range(calls):
            d.rand((4,))
        return d.rand((4,))

    base = first()
    assert torch.equal(base, first())
    for other in (first(seed=4), first(key=(8, "d")), first(key=(7, "g")), first(key=(7, "d", "z")), first(calls=1)):
        assert not torch.equal(base, other)
    with pytest.raises(ValueError, match="first dimension"):
        StepDraws(0, (), torch.arange(4), 8).rand((8,))


def test_generator_draws_are_the_generators_own_numbers():
    a, b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    draws = GeneratorDraws(a)
    assert torch.equal(draws.rand((3, 2)), torch.rand(3, 2, generator=b))
    assert torch.equal(draws.randint(-2, 3, (5,)), torch.randint(-2, 3, (5,), generator=b))


@pytest.mark.parametrize("split", [(4, 1, 2), (4, 2, 1), (8, 1, 1)])
def test_minibatch_stddev_groups_are_the_whole_batchs_for_device_batches_of_a_whole_group(split):
    """The stddev feature of each image is the same whether D sees the step's 16 images at once or a
    micro-batch of them at their step positions (device batch >= the group of 4)."""
    batch, accum, world = split
    d = build_discriminator(DiscriminatorConfig(resolution=16, channels=(16, 16, 16)))
    x = torch.randn(16, 16, 4, 4, dtype=torch.float64)
    whole = d._minibatch_stddev(x)
    for r, k in itertools.product(range(world), range(accum)):
        rows = StepDraws.for_micro_batch(0, (), batch * 2, k, accum, r, world).rows
        assert torch.allclose(d._minibatch_stddev(x[rows]), whole[rows], rtol=1e-12, atol=0)
