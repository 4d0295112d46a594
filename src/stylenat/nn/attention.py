"""Exact 2-D neighborhood attention (NA) and the Hydra-NA module of StyleNAT.

Semantics (natten 0.17's, which StyleNAT was trained with), per axis of length L with kernel k and
dilation d, for pixel i:

* dilation group g = i mod d, sub-position j = i div d, group length Lg = ceil((L - g) / d);
* window start s = clamp(j - k // 2, 0, Lg - k); keys are sub-positions s .. s + k - 1 of the
  same group (pixels t * d + g), so near a border the window shifts inward and every query sees
  exactly k keys per axis;
* the 2-D window is the product of both axis windows; the relative-position bias of a key is
  ``rpb[h, (key_y - q_y) + ky - 1, (key_x - q_x) + kx - 1]`` with offsets in sub-grid steps.

One function, :func:`na2d`, runs every backend:

``reference``
    Dense attention over all H*W keys with the NA window as a mask. Quadratic in H*W; it exists
    to be read and to anchor the tests.
``tiled``
    The fast CPU path. Queries of one dilation group are cut into T x T tiles; the keys any query
    of a tile can see lie inside one (T+k-1) x (T+k-1) block of that group, so each tile is one
    small dense attention with a mask. Memory grows with H*W*(T+k-1)^2, never (H*W)^2.
``flex``
    PyTorch flex_attention with a block mask built from a 2-D tile layout (:mod:`stylenat.nn.flex`),
    always compiled: on CUDA for training and inference, on the CPU for inference only. A call
    that would recompile raises instead of falling back to the unfused kernel.

``na2d(backend="auto")`` (what every model uses) picks one per call with :func:`choose_backend`;
``STYLENAT_NA_BACKEND=auto|tiled|flex|reference`` or the :func:`na_backend` context manager force
one backend for every such call.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from stylenat.nn.flex import axis_window as _axis_window
from stylenat.nn.flex import flex_block_mask, flex_layout_stats, run_flex

__all__ = [
    "na2d",
    "available_backends",
    "choose_backend",
    "HydraNeighborhoodAttention",
    "split_heads",
    "BACKENDS",
    "na_backend",
    "forced_backend",
    "flex_block_mask",
    "flex_layout_stats",
]

BACKENDS = ("reference", "tiled", "flex")

# Query tile edge of the tiled backend. With k = 7 a tile of 8 sees a 14 x 14 key block, a good
# balance of wasted (masked) scores against matrix-product size on CPU; see benchmarks/attention.py.
DEFAULT_TILE = 8


def _pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    try:
        y, x = value
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an int or a (y, x) pair, got {value!r}") from None
    return (int(y), int(x))


def _check_axis(length: int, kernel: int, dilation: int, axis: str) -> None:
    if kernel < 1 or dilation < 1:
        raise ValueError(f"kernel_size and dilation must be >= 1 (axis {axis}: kernel {kernel}, dilation {dilation})")
    if kernel * dilation > length:
        raise ValueError(
            f"kernel_size * dilation = {kernel} * {dilation} = {kernel * dilation} is larger than the "
            f"feature map ({axis} = {length}); use a smaller kernel or dilation"
        )
    if kernel % 2 == 0 and kernel * dilation != length:
        raise ValueError(
            f"even kernel_size {kernel} on axis {axis} is only allowed when it covers the whole map "
            f"(kernel * dilation == {length}, i.e. full attention); use an odd kernel"
        )


def check_na_args(
    shape: Sequence[int], kernel_size, dilation=1, rpb_shape: Sequence[int] | None = None
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Validate a neighborhood-attention configuration for q of ``shape`` [B, heads, H, W, D].

    Returns the (y, x) kernel and dilation pairs; raises ValueError naming the problem.
    """
    if len(shape) != 5:
        raise ValueError(f"q, k, v must be 5-D [B, heads, H, W, head_dim], got shape {tuple(shape)}")
    ks = _pair(kernel_size, "kernel_size")
    dil = _pair(dilation, "dilation")
    _, heads, h, w, _ = shape
    _check_axis(h, ks[0], dil[0], "H")
    _check_axis(w, ks[1], dil[1], "W")
    if rpb_shape is not None:
        want = (heads, 2 * ks[0] - 1, 2 * ks[1] - 1)
        if tuple(rpb_shape) != want:
            raise ValueError(f"rpb must have shape [heads, 2*ky-1, 2*kx-1] = {list(want)}, got {list(rpb_shape)}")
    return ks, dil


# --------------------------------------------------------------------------------------------
# Per-axis window geometry (shared by every backend; cached, tiny integer tensors)
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _axis_dense(length: int, kernel: int, dilation: int) -> tuple[Tensor, Tensor]:
    """[L, L] membership mask (query, key) and bias index key_sub - q_sub + k - 1 (0 where masked)."""
    g, j, s = _axis_window(length, kernel, dilation)
    same = g[:, None] == g[None, :]
    kj = j[None, :]
    inside = same & (kj >= s[:, None]) & (kj < s[:, None] + kernel)
    rel = torch.where(inside, kj - j[:, None] + kernel - 1, torch.zeros((), dtype=torch.long))
    return inside, rel


@dataclass(frozen=True)
class _AxisTiles:
    q_idx: Tensor  # [n, Tq] pixel of each query slot (padding repeats a real query of the tile)
    k_idx: Tensor  # [n, U] pixel of each key slot (padding repeats a real key, masked out)
    mask: Tensor  # [n, Tq, U] key slot inside the query's window
    rel: Tensor  # [n, Tq, U] bias index key_sub - q_sub + k - 1 (0 where masked)
    inv: Tensor  # [L] flat slot (tile * Tq + slot) holding each pixel's own query


@functools.lru_cache(maxsize=256)
def _axis_tiles(length: int, kernel: int, dilation: int, tile: int) -> _AxisTiles:
    _, _, s_all = _axis_window(length, kernel, dilation)
    longest = -(-length // dilation)
    tq = min(tile, longest)
    u = min(tq + kernel - 1, longest)
    q_rows, k_rows, masks, rels = [], [], [], []
    inv = torch.empty(length, dtype=torch.long)
    n = 0
    for g in range(dilation):
        group_len = -(-(length - g) // dilation)
        start_of = s_all[g::dilation]  # window start per sub-position of this group
        for t0 in range(0, group_len, tq):
            js = torch.arange(t0, t0 + tq).clamp(max=group_len - 1)
            s = start_of[js]
            k0 = max(0, min(int(s[0]), group_len - u))
            ks = torch.arange(k0, k0 + u)
            inside = (ks[None, :] >= s[:, None]) & (ks[None, :] < s[:, None] + kernel)
            q_rows.append(js * dilation + g)
            k_rows.append(ks.clamp(max=group_len - 1) * dilation + g)
            masks.append(inside)
            rels.append(torch.where(inside, ks[None, :] - js[:, None] + kernel - 1, 0))
            real = torch.arange(t0, min(t0 + tq, group_len))
            inv[real * dilation + g] = n * tq + (real - t0)
            n += 1
    return _AxisTiles(torch.stack(q_rows), torch.stack(k_rows), torch.stack(masks), torch.stack(rels), inv)


@functools.lru_cache(maxsize=128)
def _tiled_bias_index(h: int, w: int, ks: tuple, dil: tuple, tile: int) -> Tensor:
    """Flat bias-table index of every (tile y, tile x, query slot, key slot), in score layout.

    Shape [ny, nx, Tqy*Tqx, Uy*Ux], int32. Entries outside the window point one past the
    (2ky-1)*(2kx-1) table, where the caller appends -inf: the mask costs no pass of its own.
    """
    ay = _axis_tiles(h, ks[0], dil[0], tile)
    ax = _axis_tiles(w, ks[1], dil[1], tile)
    ny, tqy, uy = ay.mask.shape
    nx, tqx, ux = ax.mask.shape
    table_w = 2 * ks[1] - 1
    outside = (2 * ks[0] - 1) * table_w
    allowed = ay.mask[:, None, :, None, :, None] & ax.mask[None, :, None, :, None, :]
    index = ay.rel[:, None, :, None, :, None] * table_w + ax.rel[None, :, None, :, None, :]
    index = torch.where(allowed, index, outside)
    return index.reshape(ny, nx, tqy * tqx, uy * ux).to(torch.int32).contiguous()


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------


def _na2d_reference(q: Tensor, k: Tensor, v: Tensor, ks, dil, rpb: Tensor | None) -> Tensor:
    b, heads, h, w, d = q.shape
    in_y, rel_y = _axis_dense(h, ks[0], dil[0])
    in_x, rel_x = _axis_dense(w, ks[1], dil[1])
    allowed = (in_y[:, None, :, None] & in_x[None, :, None, :]).reshape(h * w, h * w).to(q.device)
    scores = q.reshape(b, heads, h * w, d) @ k.reshape(b, heads, h * w, d).transpose(-1, -2)
    if rpb is not None:
        index = (rel_y[:, None, :, None] * rpb.shape[-1] + rel_x[None, :, None, :]).reshape(h * w, h * w)
        scores = scores + rpb.reshape(heads, -1)[:, index.to(q.device)].to(scores.dtype)
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = scores.softmax(dim=-1) @ v.reshape(b, heads, h * w, d)
    return out.reshape(b, heads, h, w, d)


def _gather_tiles(x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """x [B, h, H, W, D] -> [B, h, ny, nx, len_row*len_col, D] for row index [ny, r], col index [nx, c]."""
    b, heads, _, _, d = x.shape
    ny, r = rows.shape
    nx, c = cols.shape
    x = x.index_select(2, rows.reshape(-1)).index_select(3, cols.reshape(-1))
    x = x.reshape(b, heads, ny, r, nx, c, d).permute(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(b, heads, ny, nx, r * c, d)


def _na2d_tiled(q: Tensor, k: Tensor, v: Tensor, ks, dil, rpb: Tensor | None, tile: int = DEFAULT_TILE) -> Tensor:
    b, heads, h, w, d = q.shape
    qy, qx, ky, kx, index, inv_y, inv_x, index_shape = _tiled_tensors(h, w, ks, dil, tile, q.device)
    qt = _gather_tiles(q, qy, qx)
    kt = _gather_tiles(k, ky, kx)
    vt = _gather_tiles(v, ky, kx)
    # Bias table (one shared zero row without rpb) plus a -inf entry for keys outside the window.
    table = rpb.reshape(heads, -1) if rpb is not None else q.new_zeros(1, (2 * ks[0] - 1) * (2 * ks[1] - 1))
    table = torch.cat([table, table.new_full((table.shape[0], 1), float("-inf"))], dim=1)
    # Gathered from the table in its own precision, cast after: the bias gradient then sums in
    # float32 even when q is bfloat16 (summing thousands of bf16 terms loses 5-17 % of it).
    bias = table.index_select(1, index).reshape(table.shape[0], *index_shape).to(q.dtype)
    scores = torch.matmul(qt, kt.transpose(-1, -2)) + bias  # [B, h, ny, nx, Tqy*Tqx, Uy*Ux]
    out = scores.softmax(dim=-1) @ vt  # [B, h, ny, nx, Tqy*Tqx, D]
    ny, tqy = qy.shape
    nx, tqx = qx.shape
    out = out.reshape(b, heads, ny, nx, tqy, tqx, d).permute(0, 1, 2, 4, 3, 5, 6).reshape(b, heads, ny * tqy, nx * tqx, d)
    return out.index_select(2, inv_y).index_select(3, inv_x)


# The tiled path's index tensors, per device: built once, so a call copies nothing to the device.
_TILED_DEVICE: dict = {}


def _tiled_tensors(h: int, w: int, ks: tuple, dil: tuple, tile: int, dev: torch.device) -> tuple:
    key = (h, w, ks, dil, tile, str(dev))
    found = _TILED_DEVICE.get(key)
    if found is None:
        ay = _axis_tiles(h, ks[0], dil[0], tile)
        ax = _axis_tiles(w, ks[1], dil[1], tile)
        index = _tiled_bias_index(h, w, ks, dil, tile)
        found = _TILED_DEVICE[key] = tuple(
            t.to(dev) for t in (ay.q_idx, ax.q_idx, ay.k_idx, ax.k_idx, index.reshape(-1), ay.inv, ax.inv)
        ) + (index.shape,)
    return found


# --------------------------------------------------------------------------------------------
# Public function and backend choice
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _flex_importable() -> bool:
    """flex needs a torch whose BlockMask takes its sequence lengths and set_stance (torch >= 2.6)."""
    try:
        import inspect

        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except Exception:  # pragma: no cover - depends on the torch build
        return False
    return "seq_lengths" in inspect.signature(BlockMask.__init__).parameters and hasattr(torch.compiler, "set_stance")


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends usable on ``device`` (default: CUDA if present, else CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    names = ["reference", "tiled"]
    if _flex_importable() and (device.type != "cuda" or torch.cuda.is_available()):
        names.append("flex")
    return names


def _check_backend_name(name: str, where: str) -> str:
    if name not in ("auto",) + BACKENDS:
        raise ValueError(f"{where}: unknown attention backend {name!r}; choose auto, tiled, flex or reference")
    return name


# What "auto" resolves to when forced: the environment's choice, changed by na_backend().
_FORCED = [_check_backend_name(os.environ.get("STYLENAT_NA_BACKEND", "auto").strip() or "auto", "STYLENAT_NA_BACKEND")]


def forced_backend() -> str:
    """The backend every ``auto`` call is forced to, or ``"auto"`` (none forced)."""
    return _FORCED[0]


@contextlib.contextmanager
def na_backend(name: str):
    """Force the backend of every ``na2d(backend="auto")`` call (every model) inside the block.

    ``name``: ``"auto"`` (the per-call choice again), ``"tiled"``, ``"flex"`` or ``"reference"``.
    The environment variable ``STYLENAT_NA_BACKEND`` sets the same for a whole process.
    """
    before = _FORCED[0]
    _FORCED[0] = _check_backend_name(name, "na_backend")
    try:
        yield
    finally:
        _FORCED[0] = before


def choose_backend(q: Tensor) -> str:
    """The backend ``na2d(backend="auto")`` uses for a tensor like ``q``.

    A forced backend (:func:`na_backend`, ``STYLENAT_NA_BACKEND``) wins. Otherwise:

    flex_attention on CUDA for float16/bfloat16/float32 maps of at least 16x16 tokens with
    head_dim >= 16 (its compiled kernels cover those; smaller maps gain nothing from a block mask),
    the tiled path everywhere else (CPU, float64, small maps or heads). Under
    ``torch.use_deterministic_algorithms(True)`` it is always the tiled path: flex accumulates the
    bias gradient with atomic adds, whose order varies from run to run.
    """
    if _FORCED[0] != "auto":
        return _FORCED[0]
    _, _, h, w, d = q.shape
    if (
        q.device.type == "cuda"
        and not torch.are_deterministic_algorithms_enabled()
        and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and h * w >= 256
        and d >= 16
        and _flex_importable()
    ):
        return "flex"
    return "tiled"


def na2d(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kernel_size,
    dilation=1,
    rpb: Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """2-D neighborhood attention.

    Args:
        q, k, v: ``[B, heads, H, W, head_dim]``; same shape, dtype and device.
        kernel_size: window edge, an int or a ``(y, x)`` pair; odd, or equal to the map
            (full attention, e.g. kernel 4 on a 4 x 4 map).
        dilation: step between window keys, an int or a ``(y, x)`` pair; kernel * dilation
            must not exceed the map on that axis.
        rpb: relative-position bias ``[heads, 2*ky-1, 2*kx-1]`` or None.
        scale: multiplies q; default ``head_dim ** -0.5``.
        backend: ``"auto"`` or one of :data:`BACKENDS`.

    Returns:
        ``[B, heads, H, W, head_dim]``, differentiable in q, k, v and rpb.
    """
    if not (isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor)):
        raise ValueError("q, k and v must be tensors")
    if q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must have the same shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    ks, dil = check_na_args(q.shape, kernel_size, dilation, None if rpb is None else rpb.shape)
    if q.dtype != k.dtype or q.dtype != v.dtype or q.device != k.device or q.device != v.device:
        raise ValueError("q, k, v must share dtype and device")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if rpb is not None:
        # float32 at least for half-precision q: its gradient is a sum over every query
        rpb = rpb.to(dtype=torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype)
    if backend == "auto":
        backend = choose_backend(q)
    if backend == "flex":
        if not _flex_importable():
            raise ValueError(f"backend 'flex' needs torch >= 2.6 with flex_attention (this is {torch.__version__}); use 'tiled'")
        return run_flex(q, k, v, ks, dil, rpb, float(scale))
    q = q * scale
    if backend == "tiled":
        return _na2d_tiled(q, k, v, ks, dil, rpb)
    if backend == "reference":
        return _na2d_reference(q, k, v, ks, dil, rpb)
    raise ValueError(f"unknown backend {backend!r}; choose 'auto' or one of {BACKENDS}")


# --------------------------------------------------------------------------------------------
# Hydra neighborhood attention
# --------------------------------------------------------------------------------------------


def split_heads(num_heads: int, num_groups: int) -> list[int]:
    """Heads per group: contiguous split; the LAST ``num_heads % num_groups`` groups get one extra."""
    if num_groups < 1 or num_heads < num_groups:
        raise ValueError(f"cannot split {num_heads} heads into {num_groups} groups (need at least one head each)")
    base, extra = divmod(num_heads, num_groups)
    return [base + (1 if p >= num_groups - extra else 0) for p in range(num_groups)]


def _broadcast(values, n: int, name: str) -> list:
    values = list(values) if isinstance(values, (list, tuple)) else [values]
    if len(values) == 1:
        values = values * n
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries but there are {n} head groups")
    return values


class HydraNeighborhoodAttention(nn.Module):
    """Multi-head attention whose head groups each run NA with their own kernel and dilation.

    Args:
        dim: channels C of the ``[B, H, W, C]`` input and output.
        num_heads: total heads; head_dim = dim // num_heads.
        kernel_sizes: a sequence with one kernel per head group, each an int or a (y, x) pair;
            a bare int or a one-element sequence broadcasts to every group.
        dilations: one dilation per head group; broadcasts likewise.
        qkv_bias: bias on the fused qkv projection.
        legacy_rpb_names: store the biases as ``rpb0``, ``rpb1``, ... (the released FFHQ
            checkpoints) instead of the list ``rpb.0``, ``rpb.1``, ...
        backend: passed to :func:`na2d`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_sizes=7,
        dilations=1,
        qkv_bias: bool = True,
        legacy_rpb_names: bool = False,
        backend: str = "auto",
    ):
        super().__init__()
        ks_list = list(kernel_sizes) if isinstance(kernel_sizes, (list, tuple)) else [kernel_sizes]
        dil_list = list(dilations) if isinstance(dilations, (list, tuple)) else [dilations]
        groups = max(len(ks_list), len(dil_list))
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.kernel_sizes = [_pair(k, "kernel_size") for k in _broadcast(ks_list, groups, "kernel_sizes")]
        self.dilations = [_pair(d, "dilation") for d in _broadcast(dil_list, groups, "dilations")]
        self.group_heads = split_heads(num_heads, groups)
        self.legacy_rpb_names = legacy_rpb_names
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        tables = [
            nn.Parameter(torch.zeros(nh, 2 * ky - 1, 2 * kx - 1))
            for nh, (ky, kx) in zip(self.group_heads, self.kernel_sizes)
        ]
        for t in tables:
            nn.init.trunc_normal_(t, std=0.02)
        if legacy_rpb_names:
            for i, t in enumerate(tables):
                self.register_parameter(f"rpb{i}", t)
        else:
            self.rpb = nn.ParameterList(tables)

    @property
    def num_groups(self) -> int:
        return len(self.group_heads)

    def rpb_tables(self) -> list[Tensor]:
        if self.legacy_rpb_names:
            return [getattr(self, f"rpb{i}") for i in range(self.num_groups)]
        return list(self.rpb)

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """[B, H, W, C] -> q, k, v each [B, heads, H, W, head_dim]."""
        b, h, w, c = x.shape
        qkv = self.qkv(x).reshape(b, h, w, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(3, 0, 4, 1, 2, 5).unbind(0)
        return q, k, v

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, c = x.shape
        if c != self.dim:
            raise ValueError(f"expected {self.dim} channels in the last dimension, got {c}")
        q, k, v = self.qkv_heads(x)
        outs = []
        start = 0
        for nh, ks, dil, table in zip(self.group_heads, self.kernel_sizes, self.dilations, self.rpb_tables()):
            sl = slice(start, start + nh)
            outs.append(na2d(q[:, sl], k[:, sl], v[:, sl], ks, dil, rpb=table, scale=self.scale, backend=self.backend))
            start += nh
        out = torch.cat(outs, dim=1).permute(0, 2, 3, 1, 4).reshape(b, h, w, c)
        return self.proj(out)

