"""How many flex NA graphs a whole training run compiles: counted, per preset, below the limit.

Graphs are counted by a compile backend that sees every graph dynamo hands to a compiler, AOT-traces
it as inductor would, and runs flex's operators as shape-only stand-ins (tests/nn/flex_helpers.py),
so the generator runs at full resolution on the CPU without any N x N work. The flex backend is
forced on every layer (an upper bound: on CUDA the auto choice keeps 4x4 and 8x8 maps on the tiled
path).

A training run's generator calls (tests/train/test_grad_modes.py lists them): the D step's fakes
and every EMA grid and metric batch under no_grad, the G step with gradients; grids end with a
smaller last chunk, and a chunk of one image is its own graph (dynamo specializes size 1). So each
NA layer shape has three graphs in fp32/TF32 training; with bf16 autocast four (the D step and the
G step in bf16, the grids in fp32). A resumed run is a new process that compiles the same set.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from stylenat.models import build_generator
from stylenat.nn import flex
from stylenat.nn.attention import na_backend
from stylenat.nn.flex import FLEX_GRAPH_LIMIT, flex_compile_backend

from .flex_helpers import CountingBackend, cpu_backward_allowed
from .test_flex import layer_shapes

# Graphs of one NA layer shape in a training run: fp32: no-grad batch, no-grad batch of 1, G step;
# bf16 autocast: D step and G step in bf16, grids (a batch, a batch of 1) in fp32.
VARIANTS = {False: 3, True: 4}


def run_training_calls(g: torch.nn.Module, batch: int, grid: int, amp: bool) -> None:
    """The generator calls of a training run, in its phases, at their batch sizes."""
    g_ema = copy.deepcopy(g).eval().requires_grad_(False)
    z = torch.randn(batch, g.style_dim)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp)
    with autocast:
        with torch.no_grad():  # D step: fakes from the frozen G
            g.requires_grad_(False)
            g(z)
        g.requires_grad_(True)  # G step
        g(z).float().square().mean().backward()
    with torch.no_grad():  # EMA grids (chunks of the batch, then the rest) and metrics
        for start in range(0, grid, batch):
            g_ema(torch.randn(min(batch, grid - start), g.style_dim))


# Each runs a full-size generator on the CPU (ffhq256: about a minute, ffhq1024: about 16 GB), so
# they are slow tests; the suite runs the real trainer's count below on every commit.
@pytest.mark.parametrize("preset, amp", [
    pytest.param("ffhq256", False, marks=pytest.mark.slow),
    pytest.param("church256", False, marks=pytest.mark.slow),
    pytest.param("ffhq256", True, marks=pytest.mark.slow),
    pytest.param("ffhq1024", False, marks=pytest.mark.slow),
    pytest.param("church256", True, marks=pytest.mark.slow),
])
def test_graphs_of_a_training_run(preset, amp, fresh_flex):
    torch.manual_seed(0)
    g = build_generator(preset)
    counter = CountingBackend()
    with na_backend("flex"), flex_compile_backend(counter), cpu_backward_allowed():
        run_training_calls(g, batch=2, grid=3, amp=amp)
        first = flex.flex_graph_count()
        run_training_calls(g, batch=2, grid=3, amp=amp)  # the next steps compile nothing
    shapes = len(layer_shapes(preset))
    want = shapes * VARIANTS[amp]
    assert first == want == flex.flex_graph_count() == counter.graphs, flex.flex_graphs()
    assert counter.backward_graphs == shapes  # the G step's
    assert want < FLEX_GRAPH_LIMIT
    print(f"{preset}{' bf16' if amp else ''}: {shapes} NA layer shapes, {want} graphs (limit {FLEX_GRAPH_LIMIT})")


def test_graphs_of_a_real_training_run_with_resume(tmp_path, fresh_flex):
    """The trainer itself (D step, lazy R1, bCR, ADA, G step, EMA grids, resume): the graphs it
    compiles are exactly the three variants per NA layer shape that the count above uses. (Metrics
    draw their images like the grids, under no_grad in chunks of the batch: test_grad_modes.py.)"""
    from stylenat.train import get_train_preset, resume, train

    cfg = dataclasses.replace(
        get_train_preset("tiny"), data="demo", run_dir=str(tmp_path / "run"), steps=3, batch=2, device="cpu",
        r1_interval=2, aug="ada", ada_interval=1, grid=(5, 1), sample_every=2, checkpoint_every=2,
        tick_every=1, lr_decay_start=None,
    )
    counter = CountingBackend()
    with na_backend("flex"), flex_compile_backend(counter), cpu_backward_allowed():
        train(cfg)
        first = flex.flex_graph_count()
        flex.reset_flex_graphs()  # a new process
        resume(cfg.run_dir, steps=5)
    shapes = len(layer_shapes("tiny"))
    assert first == shapes * VARIANTS[False] == flex.flex_graph_count(), flex.flex_graphs()
