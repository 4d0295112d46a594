"""The generator under ``torch.compile`` (inductor): fast sampling and ``stylenat bench --mode fast``.

:func:`compile_generator` compiles a generator in place (``nn.Module.compile``: its state dict,
attributes and saving are unchanged), both ``g(z)`` and ``g.synthesis(ws)`` (what sampling calls):

* one graph per (batch size, grad mode, dtype, thread count): shapes are static (``dynamic=False``),
  so the first pass at a new batch size compiles again (ffhq256 at batch 1 on 2 CPU cores: about
  40 s with inductor's on-disk kernel cache warm, minutes cold; tiny: 10-20 s);
* CPU default: inductor's default mode with *freezing* (parameters folded into the graph as
  constants, linear weights prepacked for MKL/oneDNN) for passes under ``torch.no_grad()``;
* CUDA default: ``mode="reduce-overhead"`` (CUDA graphs: a batch-1 pass is launch-bound), no
  freezing.

Freezing bakes the weights in at the first pass: weights changed afterwards (training, loading
another checkpoint into the same module) are not seen; compile again after that. Under autograd,
inductor does not freeze, so a compiled generator still trains, only without that gain.

Before compiling, one eager pass at batch 1 fills the attention layout caches: a miss builds them
with Python loops and ``.item()`` (tiled) or under a lock (flex), which dynamo cannot trace
without breaking the graph; with them filled the whole forward is one graph with no graph break.
On CUDA that eager pass also compiles the per-layer flex units of the eager path (taken from
inductor's disk cache when an earlier run compiled them).

:func:`keep_freed_memory` is the other CPU setting of the fast mode: glibc then keeps freed memory
for reuse instead of unmapping it, so the large per-pass buffers stop page-faulting (on 2 cores,
about 0.6 s of each 2.4 s eager ffhq256 pass is the kernel zeroing fresh pages).
"""

from __future__ import annotations

import ctypes
import functools
import sys

import torch
from torch import nn

from stylenat.errors import ConfigError

__all__ = ["COMPILE_MODES", "compile_generator", "compile_settings", "default_compile_mode", "keep_freed_memory"]

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

_ATTR = "_stylenat_compile"


def default_compile_mode(device: torch.device | str) -> str:
    """``reduce-overhead`` (CUDA graphs) on CUDA, ``default`` elsewhere."""
    return "reduce-overhead" if torch.device(device).type == "cuda" else "default"


def compile_settings(g: nn.Module) -> dict | None:
    """How :func:`compile_generator` compiled ``g`` (backend, mode, freeze, dynamic), or None."""
    return getattr(g, _ATTR, None)


def _uses_cudagraphs(mode: str) -> bool:
    return mode in ("reduce-overhead", "max-autotune")


def _with_freezing(compiled):
    """``compiled`` called with inductor's ``freezing`` on. It must be on while dynamo traces (it
    then makes the parameters static inputs), not only in inductor: ``torch.compile(options=
    {"freezing": True})`` reaches inductor alone and freezes nothing. Tracing happens at the first
    call of each shape, hence a patch around every call (it costs microseconds)."""
    from torch._inductor import config

    @functools.wraps(compiled)
    def call(*args, **kwargs):
        with config.patch(freezing=True):
            return compiled(*args, **kwargs)

    return call


def compile_generator(g: nn.Module, mode: str | None = None, *, freeze: bool | None = None, dynamic: bool = False,
                      warm_up: bool = True) -> nn.Module:
    """Compile a stylenat generator in place with inductor and return it.

    Args:
        g: a :class:`stylenat.models.Generator` on its device (weights loaded: see the freezing note
            in the module docstring).
        mode: a ``torch.compile`` mode (:data:`COMPILE_MODES`); default :func:`default_compile_mode`.
        freeze: fold the weights into the graph (inference under ``torch.no_grad()`` only); default
            True on the CPU, False on CUDA.
        dynamic: passed to ``torch.compile`` (False: one graph per batch size, the fastest).
        warm_up: run one eager batch-1 pass of the synthesis network first (fills the attention
            layout caches, so the compiled forward is one graph).
    Returns ``g`` itself; calls of ``g(...)`` and ``g.synthesis(...)`` now run compiled, the first
    of each shape compiling (that pass is slow).
    """
    dev = next(g.parameters()).device
    mode = default_compile_mode(dev) if mode is None else mode
    if mode not in COMPILE_MODES:
        raise ConfigError(f"unknown compile mode {mode!r}; choose one of {', '.join(COMPILE_MODES)}")
    if _uses_cudagraphs(mode) and dev.type != "cuda":
        raise ConfigError(f"compile mode {mode!r} uses CUDA graphs; on {dev.type} use 'default' or 'max-autotune-no-cudagraphs'")
    freeze = dev.type == "cpu" if freeze is None else bool(freeze)
    if warm_up:
        was_training = g.training
        g.eval()
        with torch.no_grad():
            g.synthesis(torch.zeros(1, g.num_ws, g.style_dim, device=dev))
        g.train(was_training)
    for module in (g, g.synthesis):
        module.compile(backend="inductor", mode=mode, dynamic=dynamic)
        if freeze:
            module._compiled_call_impl = _with_freezing(module._compiled_call_impl)
    setattr(g, _ATTR, {"backend": "inductor", "mode": mode, "freeze": freeze, "dynamic": dynamic,
                       "cudagraphs": _uses_cudagraphs(mode)})
    return g


def keep_freed_memory() -> bool:
    """Make this process's glibc malloc keep freed memory for reuse (CPU inference loops).

    Large blocks are then taken from the heap instead of fresh ``mmap`` pages (M_MMAP_MAX 0) and
    the heap is not trimmed (M_TRIM_THRESHOLD 2 GiB), so a pass reuses the pages of the one
    before instead of page-faulting on new ones. The process's memory then stays at its peak, and
    can grow past it from fragmentation (ffhq256 eager at batch 8 on the CPU: 9.3 GiB peak RSS
    instead of 4.6; at batch 1 1.7 instead of 1.5). Process-wide and not undone: for a process that
    only samples or benchmarks. Returns True where it applied (Linux with glibc), False elsewhere
    (nothing changes).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return mallopt(m_mmap_max, 0) == 1 and mallopt(m_trim_threshold, 2**31 - 1) == 1
