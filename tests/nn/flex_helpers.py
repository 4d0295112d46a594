"""Compile backends that run the flex NA graphs on the CPU where PyTorch's own kernels do not.

PyTorch runs flex_attention compiled on the CPU for inference only. To check the *compiled* graphs
of training (forward and backward, the bias gradient included) on the CPU, these backends trace
with AOT autograd exactly as inductor would, then execute the traced graphs eagerly:

* :func:`dense_backend` runs both graphs with flex's dense reference implementations (exact,
  quadratic in tokens: small shapes only).
* :class:`CountingBackend` counts the graphs dynamo hands it and runs flex's two operators as
  shape-only stand-ins (zeros), so whole training phases at full resolution cost no N x N work.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
import torch.nn.attention.flex_attention as flex_api
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func
from torch._higher_order_ops.flex_attention import flex_attention as flex_hop
from torch._higher_order_ops.flex_attention import flex_attention_backward as flex_bwd_hop
from torch._higher_order_ops.flex_attention import sdpa_dense_backward
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes


class _Passthrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _DenseBackward(_Passthrough):
    """flex's dense backward, with the gradient of captured buffers (the bias) kept.

    Inside an AOT backward graph nothing requires grad, and the dense implementation then drops
    the bias gradient; re-marking the floating-point buffers restores it.
    """


@flex_bwd_hop.py_impl(_DenseBackward)
def _dense_backward(mode, query, key, value, out, lse, grad_out, grad_lse, fw_graph, joint_graph, block_mask,
                    scale, kernel_options, score_mod_buffers=(), mask_mod_buffers=()):
    buffers = tuple(b.detach().requires_grad_() if isinstance(b, torch.Tensor) and b.is_floating_point() else b
                    for b in score_mod_buffers)
    with _disable_current_modes():
        return sdpa_dense_backward(query, key, value, out, lse, grad_out, grad_lse, fw_graph, joint_graph,
                                   block_mask, scale, kernel_options, buffers, mask_mod_buffers)


class _ShapeOnly(_Passthrough):
    """flex's forward and backward as zeros of the right shapes (no scores are computed)."""


_FORWARD_OUTPUTS = 3 if "max_scores" in inspect.getsource(flex_api.flex_attention) else 2


@flex_hop.py_impl(_ShapeOnly)
def _shape_only_forward(mode, query, key, value, score_mod, block_mask, scale, kernel_options,
                        score_mod_buffers=(), mask_mod_buffers=()):
    with _disable_current_modes():
        out = query.new_zeros(*query.shape[:-1], value.shape[-1])
        lse = query.new_zeros(query.shape[:-1], dtype=torch.float32)
        return (out, lse, lse.clone())[:_FORWARD_OUTPUTS]


@flex_bwd_hop.py_impl(_ShapeOnly)
def _shape_only_backward(mode, query, key, value, out, lse, grad_out, grad_lse, fw_graph, joint_graph, block_mask,
                         scale, kernel_options, score_mod_buffers=(), mask_mod_buffers=()):
    with _disable_current_modes():
        grads = [torch.zeros_like(b) if isinstance(b, torch.Tensor) and b.is_floating_point() else None
                 for b in score_mod_buffers]
        return torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value), tuple(grads)


def _run_in(mode_cls, gm):
    inner = make_boxed_func(gm)

    def run(args):
        with mode_cls():
            return inner(args)

    run._boxed_call = True
    return run


@contextlib.contextmanager
def cpu_backward_allowed():
    """flex_attention refuses inputs that require grad on the CPU before tracing; allow them."""
    before = flex_api._validate_device
    flex_api._validate_device = lambda *args: None
    try:
        yield
    finally:
        flex_api._validate_device = before


def dense_backend():
    """AOT-traced forward and backward graphs, run with flex's dense implementations."""
    return aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm),
                        bw_compiler=lambda gm, _: _run_in(_DenseBackward, gm))


class CountingBackend:
    """Counts the graphs dynamo compiles; runs them AOT-traced with shape-only flex operators."""

    __name__ = "counting"

    def __init__(self):
        self.graphs = 0
        self.backward_graphs = 0
        self._aot = aot_autograd(fw_compiler=self._forward, bw_compiler=self._backward)

    def _forward(self, gm, _):
        return _run_in(_ShapeOnly, gm)

    def _backward(self, gm, _):
        self.backward_graphs += 1
        return _run_in(_ShapeOnly, gm)

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return self._aot(gm, example_inputs)
