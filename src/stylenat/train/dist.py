"""Process-group set-up for torchrun and the collectives the training loop uses.

The loop does not wrap G and D in DistributedDataParallel: R1 needs a double backward, the G
step backpropagates through a frozen D and gradients are accumulated over micro-batches, all of
which DDP handles only with care. Instead every rank averages its gradients with one all-reduce
per optimizer step (after the local backward passes), so all ranks apply identical updates and
never drift apart; buffers are averaged after each step for the same reason.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from stylenat.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: rank of world, and the device it trains on."""

    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def init_distributed(device_name: str) -> DistInfo:
    """Join the process group that torchrun describes in the environment (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name, local_rank)
    if world == 1:
        return DistInfo(0, 1, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # Other ranks wait at a barrier while rank 0 writes checkpoints or measures FID (minutes).
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None,
                                timeout=datetime.timedelta(hours=2))
    return DistInfo(dist.get_rank(), dist.get_world_size(), device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def broadcast_module(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank."""
    if _active():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def _average(tensors: list[torch.Tensor]) -> None:
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


@torch.no_grad()
def average_gradients(module: nn.Module) -> None:
    """Replace every gradient by its mean over ranks (one coalesced all-reduce)."""
    if _active():
        _average([p.grad for p in module.parameters() if p.grad is not None])


@torch.no_grad()
def average_buffers(buffers: list[torch.Tensor]) -> None:
    """Set floating buffers to rank 0's value plus the mean difference of every rank's from it (a
    broadcast and an all-reduce), so ranks hold the same model. Buffers equal on every rank (the
    constants, the spectral-norm vectors every rank moved alike) keep every bit, which a plain mean
    does not (x + x + x over 3 ranks rounds); the others (G's tracked w_avg) get their mean."""
    if not (_active() and buffers):
        return
    ref = torch.cat([b.reshape(-1) for b in buffers])
    dist.broadcast(ref, src=0)
    ref = [r.view_as(b) for r, b in zip(ref.split([b.numel() for b in buffers]), buffers)]
    changes = torch._foreach_sub(buffers, ref)
    _average(changes)
    torch._foreach_copy_(buffers, torch._foreach_add(ref, changes))


def all_ranks_true(flag: bool, device: torch.device) -> bool:
    """True only if ``flag`` holds on every rank (so all ranks take the same branch)."""
    return any_rank([flag], device, reduce="all")[0]


def any_rank(flags: list[bool], device: torch.device, reduce: str = "any") -> list[bool]:
    """Each flag OR-ed (``reduce="any"``) or AND-ed (``"all"``) over ranks, in one all-reduce."""
    if not _active():
        return [bool(f) for f in flags]
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if reduce == "any" else dist.ReduceOp.MIN)
    return [bool(v) for v in t.tolist()]


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Each value's mean over ranks (every rank has the same keys), in float32, in one all-reduce."""
    if not _active():
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float32, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, (t / dist.get_world_size()).tolist()))


def sum_(t: torch.Tensor) -> None:
    """Sum ``t`` over ranks, in place."""
    if _active():
        dist.all_reduce(t)


def gather_objects(obj) -> list:
    """Every rank's ``obj`` (JSON-able), in rank order, on every rank."""
    if not _active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if _active():
        dist.barrier()
