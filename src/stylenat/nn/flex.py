"""Neighborhood attention on PyTorch's flex_attention: the block layout and the compiled calls.

**Layout.** Queries of one dilation group are cut into 2-D tiles of ``q_tile`` = (ty, tx) tokens;
one tile is one query block of flex. Keys of the same group are cut into 2-D strips of
``kv_tile`` = (ry, rx) tokens, shifted by a per-axis ``offset`` so that the strips line up with the
union of a query tile's windows; one strip is one key block. Query and key sequences are ordered
differently (flex allows it): queries tile by tile, keys strip by strip, each padded to whole
blocks (padding queries repeat a real query of their tile, padding keys are masked out). A block
of the mask is non-empty when some query of the tile sees some key of the strip, and *full* when
every query sees every key; both follow per axis from closed forms, so building a block mask never
materializes anything of size tokens x tokens (nor blocks x blocks, on CUDA).

The layout of a layer shape is chosen by counting, per axis, the scores the kernel computes (every
non-empty block in full) against the scores NA needs (``k`` per query per axis): the product of the
two axis ratios is the ratio :func:`flex_layout_stats` reports. Among the block sizes flex's kernels
accept (multiples of ``granule``) the smallest ratio wins, ties going to larger blocks.

**Compiled calls, bounded.** Every call runs compiled. Each (layer shape, variant) gets its own
compiled function with its own code object, so dynamo's per-function recompile limit never
pools unrelated shapes; the variant is what dynamo would otherwise recompile for (dtype, batch 1
or more, grad mode, which inputs require grad, device, compile backend), and the batch dimension
is dynamic within it. After its first call a function runs under ``fail_on_recompile``: a guard that
fails raises :class:`FlexRecompileError` instead of recompiling or falling back to the unfused
flex_attention (which materializes B x heads x N x N scores). :data:`FLEX_GRAPH_LIMIT` caps the
number of compiled functions of a process.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import threading
import types
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "FLEX_GRAPH_LIMIT",
    "FlexRecompileError",
    "FlexGraphLimitError",
    "flex_block_mask",
    "flex_layout_stats",
    "flex_graph_count",
    "flex_graphs",
    "flex_compile_backend",
    "reset_flex_graphs",
]

# Compiled NA functions one process may hold: a safety net, since the count is bounded by
# construction. The most a preset's training run needs is church256's with bf16 autocast and flex
# forced on every layer: 22 layer shapes x 4 variants = 88 (tests/nn/test_flex_graphs.py).
FLEX_GRAPH_LIMIT = 128

# Q and KV block sizes tried by the layout search (tokens per block).
_Q_BLOCKS = (32, 64, 128)
_KV_BLOCKS = (16, 32, 64, 128)


class FlexRecompileError(RuntimeError):
    """A compiled flex NA call would recompile (and could fall back to the unfused kernel)."""


class FlexGraphLimitError(RuntimeError):
    """More distinct flex NA graphs than :data:`FLEX_GRAPH_LIMIT` were asked for."""


@functools.lru_cache(maxsize=256)
def axis_window(length: int, kernel: int, dilation: int) -> tuple[Tensor, Tensor, Tensor]:
    """For each pixel i of an axis: (group g, sub-position j, window start s in sub-grid units)."""
    i = torch.arange(length)
    g = i % dilation
    j = i // dilation
    group_len = torch.div(length - g + dilation - 1, dilation, rounding_mode="floor")
    s = torch.minimum(torch.clamp(j - kernel // 2, min=0), group_len - kernel)
    return g, j, s


# --------------------------------------------------------------------------------------------
# One axis
# --------------------------------------------------------------------------------------------


def _starts(group_len: int, kernel: int) -> list[int]:
    return [min(max(j - kernel // 2, 0), group_len - kernel) for j in range(group_len)]


@functools.lru_cache(maxsize=4096)
def _axis_cost(length: int, kernel: int, dilation: int, t: int, r: int, o: int) -> int:
    """Scores per axis the blocks compute: sum over (tile, touched strip) of t * r."""
    total = 0
    for g in range(dilation):
        lg = -(-(length - g) // dilation)
        s = _starts(lg, kernel)
        for t0 in range(0, lg, t):
            lo, hi = s[t0], s[min(t0 + t, lg) - 1] + kernel
            total += ((hi - 1 + o) // r - (lo + o) // r + 1) * t * r
    return total


@functools.lru_cache(maxsize=1024)
def _best_offset(length: int, kernel: int, dilation: int, t: int, r: int) -> tuple[int, int]:
    """(cost, offset) of the cheapest strip offset for query tiles of t and strips of r."""
    # Strip edges matter where a tile's window union starts: k // 2 before the tile inside a
    # group, 0 at its border. Small strips try every offset.
    offsets = range(r) if r <= 16 else sorted({0, (kernel // 2) % r, (r - kernel // 2) % r})
    return min((_axis_cost(length, kernel, dilation, t, r, o), o) for o in offsets)


@dataclass(frozen=True)
class _Axis:
    q_pix: Tensor  # [nT, t] pixel (along this axis) of each query slot
    q_real: Tensor  # [nT, t] slot holds its own query (not a padding repeat)
    q_j: Tensor  # [nT, t] sub-position
    q_s: Tensor  # [nT, t] window start (sub-grid units)
    q_grp: Tensor  # [nT] dilation group
    kv_pix: Tensor  # [nS, r] pixel of each key slot (padding repeats a real pixel)
    kv_j: Tensor  # [nS, r] sub-position (padding: clamped)
    kv_valid: Tensor  # [nS, r]
    kv_grp: Tensor  # [nS]
    touch: Tensor  # [nT, C] strips a tile touches (padded with 0)
    touch_ok: Tensor  # [nT, C]
    touch_full: Tensor  # [nT, C] every query of the tile sees every key of the strip
    back: Tensor  # [nS, R] tiles touching a strip (padded with 0)
    back_ok: Tensor
    back_full: Tensor


def _pad_lists(rows: list[list[tuple[int, bool]]]) -> tuple[Tensor, Tensor, Tensor]:
    width = max(1, max((len(r) for r in rows), default=1))
    idx = torch.zeros(len(rows), width, dtype=torch.long)
    ok = torch.zeros(len(rows), width, dtype=torch.bool)
    full = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        for c, (j, f) in enumerate(row):
            idx[i, c], ok[i, c], full[i, c] = j, True, f
    return idx, ok, full


@functools.lru_cache(maxsize=256)
def _axis(length: int, kernel: int, dilation: int, t: int, r: int, o: int) -> _Axis:
    q_pix, q_real, q_j, q_s, q_grp = [], [], [], [], []
    kv_pix, kv_j, kv_valid, kv_grp = [], [], [], []
    touch: list[list[tuple[int, bool]]] = []
    for g in range(dilation):
        lg = -(-(length - g) // dilation)
        s = _starts(lg, kernel)
        first_strip = len(kv_grp)
        strips = []
        for m in range((lg - 1 + o) // r + 1):
            p0 = m * r - o
            ps = list(range(p0, p0 + r))
            clamped = [min(max(p, 0), lg - 1) for p in ps]
            kv_pix.append([p * dilation + g for p in clamped])
            kv_j.append(clamped)
            kv_valid.append([0 <= p < lg for p in ps])
            kv_grp.append(g)
            strips.append((max(p0, 0), min(p0 + r, lg), p0 >= 0 and p0 + r <= lg))
        for t0 in range(0, lg, t):
            js = [min(j, lg - 1) for j in range(t0, t0 + t)]
            q_pix.append([j * dilation + g for j in js])
            q_real.append([j < lg for j in range(t0, t0 + t)])
            q_j.append(js)
            q_s.append([s[j] for j in js])
            q_grp.append(g)
            lo, hi = s[js[0]], s[js[-1]] + kernel
            row = []
            for m, (a, b, whole) in enumerate(strips):
                if a < hi and b > lo:  # some query's window meets the strip
                    full = whole and s[js[-1]] <= a and s[js[0]] + kernel >= b
                    row.append((first_strip + m, full))
            touch.append(row)
    back: list[list[tuple[int, bool]]] = [[] for _ in kv_grp]
    for ti, row in enumerate(touch):
        for si, full in row:
            back[si].append((ti, full))
    t_idx, t_ok, t_full = _pad_lists(touch)
    b_idx, b_ok, b_full = _pad_lists(back)
    as_t = functools.partial(torch.tensor, dtype=torch.long)
    return _Axis(as_t(q_pix), torch.tensor(q_real), as_t(q_j), as_t(q_s), as_t(q_grp),
                 as_t(kv_pix), as_t(kv_j), torch.tensor(kv_valid), as_t(kv_grp),
                 t_idx, t_ok, t_full, b_idx, b_ok, b_full)


# --------------------------------------------------------------------------------------------
# The 2-D layout and its block mask
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlexLayout:
    """Block layout of one NA layer shape (see the module docstring)."""

    shape: tuple[int, int]
    kernel: tuple[int, int]
    dilation: tuple[int, int]
    q_tile: tuple[int, int]
    kv_tile: tuple[int, int]
    offset: tuple[int, int]
    computed: int  # scores the kernel computes (non-empty blocks in full)
    needed: int  # scores NA needs: H * W * ky * kx

    @property
    def q_block(self) -> int:
        return self.q_tile[0] * self.q_tile[1]

    @property
    def kv_block(self) -> int:
        return self.kv_tile[0] * self.kv_tile[1]

    @property
    def ratio(self) -> float:
        return self.computed / self.needed


def _tile_shapes(block: int):
    for e in range(int(math.log2(block)) + 1):
        yield 2 ** e, block // 2 ** e


@functools.lru_cache(maxsize=256)
def choose_layout(h: int, w: int, kernel: tuple, dilation: tuple, granule: int = 16,
                  q_tile: tuple | None = None, kv_tile: tuple | None = None) -> FlexLayout:
    """The layout with the fewest computed scores per needed score (see the module docstring).

    ``granule``: block sizes must be multiples of it (flex's kernels need 16; CUDA's bf16 backward
    kernels 64). ``q_tile`` / ``kv_tile`` fix the tiles instead of searching.
    """
    (ky, kx), (dy, dx) = kernel, dilation
    q_shapes = [q_tile] if q_tile else [s for b in _Q_BLOCKS if b % granule == 0 for s in _tile_shapes(b)]
    kv_shapes = [kv_tile] if kv_tile else [s for b in _KV_BLOCKS if b % granule == 0 for s in _tile_shapes(b)]
    best = None
    for (ty, tx), (ry, rx) in itertools.product(q_shapes, kv_shapes):
        cy, oy = _best_offset(h, ky, dy, ty, ry)
        cx, ox = _best_offset(w, kx, dx, tx, rx)
        rank = (cy * cx, -(ty * tx), -(ry * rx))
        if best is None or rank < best[0]:
            best = (rank, (ty, tx), (ry, rx), (oy, ox))
    (computed, _, _), qt, kt, off = best
    return FlexLayout((h, w), (ky, kx), (dy, dx), qt, kt, off, computed, h * w * ky * kx)


def _compact(ok: Tensor, idx: Tensor, want: Tensor) -> tuple[Tensor, Tensor]:
    """Per row: how many entries satisfy ``want`` and their indices first (int32)."""
    sel = ok & want
    order = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True)
    return sel.sum(-1).to(torch.int32), idx.gather(-1, order).to(torch.int32)


def _pair_lists(ay_idx, ay_ok, ay_full, ax_idx, ax_ok, ax_full, n_cols_x: int):
    """Cartesian product of per-axis block lists: [rows_y * rows_x, Cy * Cx] (index, ok, full)."""
    ny, cy = ay_idx.shape
    nx, cx = ax_idx.shape
    idx = ay_idx[:, None, :, None] * n_cols_x + ax_idx[None, :, None, :]
    ok = ay_ok[:, None, :, None] & ax_ok[None, :, None, :]
    full = ay_full[:, None, :, None] & ax_full[None, :, None, :]
    return idx.reshape(ny * nx, cy * cx), ok.reshape(ny * nx, cy * cx), full.reshape(ny * nx, cy * cx)


@dataclass(frozen=True)
class FlexPlan:
    """Everything one flex NA call needs, on one device."""

    layout: FlexLayout
    q_perm: Tensor  # [Q_LEN] flat pixel of each query slot
    q_inv: Tensor  # [H*W] query slot holding each pixel's own output
    kv_perm: Tensor  # [KV_LEN] flat pixel of each key slot
    q_grp: Tensor  # [Q_LEN] (per query slot) dilation group id, sub-positions, window starts
    q_jy: Tensor
    q_jx: Tensor
    q_sy: Tensor
    q_sx: Tensor
    kv_grp: Tensor  # [KV_LEN] group id, -1 for padding
    kv_jy: Tensor
    kv_jx: Tensor
    block_mask: object  # torch BlockMask


def _build_plan(layout: FlexLayout, device: torch.device, full_width: bool) -> FlexPlan:
    from torch.nn.attention.flex_attention import BlockMask

    (h, w), (ky, kx), (dy, dx) = layout.shape, layout.kernel, layout.dilation
    ay = _axis(h, ky, dy, layout.q_tile[0], layout.kv_tile[0], layout.offset[0])
    ax = _axis(w, kx, dx, layout.q_tile[1], layout.kv_tile[1], layout.offset[1])
    n_ty, n_tx, n_sy, n_sx = len(ay.q_grp), len(ax.q_grp), len(ay.kv_grp), len(ax.kv_grp)

    def grid(a: Tensor, b: Tensor, combine) -> Tensor:  # [n_a, la] x [n_b, lb] -> block-major flat
        return combine(a[:, None, :, None], b[None, :, None, :]).reshape(-1)

    q_perm = grid(ay.q_pix, ax.q_pix, lambda y, x: y * w + x)
    real = grid(ay.q_real, ax.q_real, torch.logical_and)
    q_inv = torch.empty(h * w, dtype=torch.long)
    q_inv[q_perm[real]] = real.nonzero().flatten()
    kv_perm = grid(ay.kv_pix, ax.kv_pix, lambda y, x: y * w + x)
    kv_valid = grid(ay.kv_valid, ax.kv_valid, torch.logical_and)
    qg_y, qg_x = ay.q_grp[:, None].expand_as(ay.q_j), ax.q_grp[:, None].expand_as(ax.q_j)
    kg_y, kg_x = ay.kv_grp[:, None].expand_as(ay.kv_j), ax.kv_grp[:, None].expand_as(ax.kv_j)
    kv_grp = torch.where(kv_valid, grid(kg_y, kg_x, lambda y, x: y * dx + x), -1)
    zeros_y, zeros_x = torch.zeros_like(ay.q_j), torch.zeros_like(ax.q_j)
    kz_y, kz_x = torch.zeros_like(ay.kv_j), torch.zeros_like(ax.kv_j)

    n_q, n_kv = n_ty * n_tx, n_sy * n_sx
    t_idx, t_ok, t_full = _pair_lists(ay.touch, ay.touch_ok, ay.touch_full, ax.touch, ax.touch_ok, ax.touch_full, n_sx)
    b_idx, b_ok, b_full = _pair_lists(ay.back, ay.back_ok, ay.back_full, ax.back, ax.back_ok, ax.back_full, n_tx)
    kv_num, kv_idx = _compact(t_ok, t_idx, ~t_full)
    fkv_num, fkv_idx = _compact(t_ok, t_idx, t_full)
    q_num, q_idx = _compact(b_ok, b_idx, ~b_full)
    fq_num, fq_idx = _compact(b_ok, b_idx, b_full)
    if full_width:  # inductor's CPU kernel wants the index tensors as wide as the block count
        kv_idx, fkv_idx = (torch.nn.functional.pad(t, (0, max(0, n_kv - t.shape[-1])))[:, :max(n_kv, 1)] for t in (kv_idx, fkv_idx))
        q_idx, fq_idx = (torch.nn.functional.pad(t, (0, max(0, n_q - t.shape[-1])))[:, :max(n_q, 1)] for t in (q_idx, fq_idx))

    def dev(t: Tensor, dtype=torch.int32) -> Tensor:
        return t.to(device=device, dtype=dtype).contiguous()

    plan_tensors = dict(
        q_grp=dev(grid(qg_y, qg_x, lambda y, x: y * dx + x)),
        q_jy=dev(grid(ay.q_j, zeros_x, torch.add)), q_jx=dev(grid(zeros_y, ax.q_j, torch.add)),
        q_sy=dev(grid(ay.q_s, zeros_x, torch.add)), q_sx=dev(grid(zeros_y, ax.q_s, torch.add)),
        kv_grp=dev(kv_grp), kv_jy=dev(grid(ay.kv_j, kz_x, torch.add)), kv_jx=dev(grid(kz_y, ax.kv_j, torch.add)),
    )
    mask_mod = _make_mask_mod(plan_tensors, ky, kx)
    blocks = [dev(t)[None, None] for t in (kv_num, kv_idx, fkv_num, fkv_idx, q_num, q_idx, fq_num, fq_idx)]
    block_mask = BlockMask(
        (len(q_perm), len(kv_perm)), *blocks, BLOCK_SIZE=(layout.q_block, layout.kv_block), mask_mod=mask_mod,
    )
    return FlexPlan(layout, dev(q_perm, torch.long), dev(q_inv, torch.long), dev(kv_perm, torch.long),
                    block_mask=block_mask, **plan_tensors)


def _make_mask_mod(t: dict, ky: int, kx: int):
    q_grp, q_sy, q_sx, kv_grp, kv_jy, kv_jx = (t[n] for n in ("q_grp", "q_sy", "q_sx", "kv_grp", "kv_jy", "kv_jx"))

    def mask_mod(b, h, qi, ki):
        oy = kv_jy[ki] - q_sy[qi]
        ox = kv_jx[ki] - q_sx[qi]
        return (kv_grp[ki] == q_grp[qi]) & (oy >= 0) & (oy < ky) & (ox >= 0) & (ox < kx)

    return mask_mod


_PLANS: dict = {}
_PLANS_LOCK = threading.Lock()


# Inductor's CPU kernel reads block indices as wide as the block count (q blocks x kv blocks
# entries); beyond this many the tiled backend is the one to use on the CPU.
_CPU_FULL_WIDTH_MAX = 2**25


def flex_plan(h: int, w: int, kernel: tuple, dilation: tuple, device: torch.device, granule: int = 16,
              q_tile: tuple | None = None, kv_tile: tuple | None = None, full_width: bool = False) -> FlexPlan:
    """The cached plan of a layer shape on ``device`` (built once, then no host-device traffic).

    ``full_width``: index tensors padded to the block count, as inductor's CPU kernel wants them.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (h, w, kernel, dilation, str(device), granule, q_tile, kv_tile, full_width)
    plan = _PLANS.get(key)
    if plan is None:
        with _PLANS_LOCK:
            plan = _PLANS.get(key)
            if plan is None:
                layout = choose_layout(h, w, kernel, dilation, granule, q_tile, kv_tile)
                if full_width:
                    n_q, n_kv = _block_counts(layout)
                    if n_q * n_kv > _CPU_FULL_WIDTH_MAX:
                        raise ValueError(
                            f"backend 'flex' on the CPU needs {n_q} x {n_kv} block indices for a {h}x{w} map, "
                            "too many to hold; use the 'tiled' backend (the CPU default) for maps this large"
                        )
                plan = _PLANS[key] = _build_plan(layout, device, full_width)
    return plan


def _block_counts(layout: FlexLayout) -> tuple[int, int]:
    (h, w), (ky, kx), (dy, dx) = layout.shape, layout.kernel, layout.dilation
    ay = _axis(h, ky, dy, layout.q_tile[0], layout.kv_tile[0], layout.offset[0])
    ax = _axis(w, kx, dx, layout.q_tile[1], layout.kv_tile[1], layout.offset[1])
    return len(ay.q_grp) * len(ax.q_grp), len(ay.kv_grp) * len(ax.kv_grp)


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def flex_block_mask(h: int, w: int, kernel, dilation=1, device="cpu", *, q_tile=None, kv_tile=None, granule: int = 16):
    """The torch BlockMask that ``na2d(backend="flex")`` uses for an ``h x w`` map.

    Its ``BLOCK_SIZE`` is (query block, key block); its sequence lengths are the padded query and
    key sequences of the layout. Built from the layout's closed forms, never from a dense mask.
    """
    return flex_plan(h, w, _pair(kernel), _pair(dilation), device, granule,
                     None if q_tile is None else _pair(q_tile), None if kv_tile is None else _pair(kv_tile)).block_mask


def flex_layout_stats(h: int, w: int, kernel, dilation=1, *, q_tile=None, kv_tile=None, granule: int = 16) -> dict:
    """Tiles, block sizes and the computed / needed score ratio of a layer shape (a dict)."""
    lay = choose_layout(h, w, _pair(kernel), _pair(dilation), granule,
                        None if q_tile is None else _pair(q_tile), None if kv_tile is None else _pair(kv_tile))
    return {"shape": list(lay.shape), "kernel": list(lay.kernel), "dilation": list(lay.dilation),
            "q_tile": list(lay.q_tile), "kv_tile": list(lay.kv_tile), "offset": list(lay.offset),
            "q_block": lay.q_block, "kv_block": lay.kv_block, "computed": lay.computed, "needed": lay.needed,
            "ratio": lay.ratio}


# --------------------------------------------------------------------------------------------
# The compiled call
# --------------------------------------------------------------------------------------------


def _na_flex(q: Tensor, k: Tensor, v: Tensor, rpb: Tensor | None, plan: FlexPlan, scale: float,
             kernel_options: dict | None) -> Tensor:
    """gather -> flex_attention -> scatter; the function every compiled unit runs (rpb: [heads, table])."""
    from torch.nn.attention.flex_attention import flex_attention

    b, heads, h, w, d = q.shape
    n = h * w
    ky, kx = plan.layout.kernel
    qf = q.reshape(b, heads, n, d).index_select(2, plan.q_perm)
    kf = k.reshape(b, heads, n, d).index_select(2, plan.kv_perm)
    vf = v.reshape(b, heads, n, d).index_select(2, plan.kv_perm)
    score_mod = None
    if rpb is not None:
        table = rpb
        q_jy, q_jx, kv_jy, kv_jx = plan.q_jy, plan.q_jx, plan.kv_jy, plan.kv_jx
        width = 2 * kx - 1

        def score_mod(score, b_, h_, qi, ki):
            ry = (kv_jy[ki] - q_jy[qi] + (ky - 1)).clamp(0, 2 * ky - 2)
            rx = (kv_jx[ki] - q_jx[qi] + (kx - 1)).clamp(0, 2 * kx - 2)
            return score + table[h_, ry * width + rx]

    out = flex_attention(qf, kf, vf, score_mod=score_mod, block_mask=plan.block_mask, scale=scale,
                         kernel_options=kernel_options)
    return out.index_select(2, plan.q_inv).reshape(b, heads, h, w, d)


@dataclass
class _Unit:
    fn: object
    name: str
    calls: int = 0


_UNITS: dict = {}
_UNITS_LOCK = threading.Lock()
_COMPILE = {"backend": "inductor"}


@contextlib.contextmanager
def flex_compile_backend(backend):
    """Compile flex NA calls with another ``torch.compile`` backend inside the block.

    For tests and diagnostics: ``"aot_eager"`` traces forward and backward graphs (with the bias
    gradient) without inductor; a callable counts graphs. Each backend has its own functions.
    """
    before = _COMPILE["backend"]
    _COMPILE["backend"] = backend
    try:
        yield
    finally:
        _COMPILE["backend"] = before


def flex_graph_count() -> int:
    """Compiled flex NA functions in this process (each one graph; see :data:`FLEX_GRAPH_LIMIT`)."""
    return len(_UNITS)


def flex_graphs() -> list[str]:
    """The names of the compiled flex NA functions: layer shape and variant."""
    return sorted(u.name for u in _UNITS.values())


def reset_flex_graphs() -> None:
    """Forget every compiled flex NA function (tests; also frees their kernels)."""
    with _UNITS_LOCK:
        _UNITS.clear()
    torch._dynamo.reset()


def _fresh_function(name: str):
    code = _na_flex.__code__.replace(co_name=name, co_qualname=name) if hasattr(_na_flex.__code__, "co_qualname") \
        else _na_flex.__code__.replace(co_name=name)
    fn = types.FunctionType(code, _na_flex.__globals__, name, _na_flex.__defaults__, _na_flex.__closure__)
    fn.__kwdefaults__ = _na_flex.__kwdefaults__
    return fn


def _backend_name(backend) -> str:
    return backend if isinstance(backend, str) else getattr(backend, "__name__", type(backend).__name__)


def _variant(q: Tensor, k: Tensor, v: Tensor, rpb: Tensor | None) -> tuple:
    grad = torch.is_grad_enabled()
    needs = tuple(bool(t is not None and t.requires_grad) for t in (q, k, v, rpb)) if grad else (False,) * 4
    return (str(q.dtype).removeprefix("torch."), "b1" if q.shape[0] == 1 else "bN",
            "grad" if grad else "nograd", needs, rpb is not None)


def _global_state() -> tuple:
    """The process-wide settings dynamo guards every compiled frame on (autocast is switched off
    around the call, so it is not among them): one function per combination."""
    matmul = torch.backends.cuda.matmul
    return (bool(matmul.allow_tf32), bool(matmul.allow_fp16_reduced_precision_reduction),
            bool(matmul.allow_bf16_reduced_precision_reduction), torch.get_num_threads(),
            torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            str(torch.get_default_dtype()), torch.is_inference_mode_enabled())


def run_flex(q: Tensor, k: Tensor, v: Tensor, ks: tuple, dil: tuple, rpb: Tensor | None, scale: float) -> Tensor:
    """NA through the compiled flex kernel (see the module docstring)."""
    dev = q.device
    backend = _COMPILE["backend"]
    variant = _variant(q, k, v, rpb)
    if dev.type == "cpu" and backend == "inductor":
        if any(variant[3]):
            raise ValueError(
                "backend 'flex' on the CPU runs PyTorch's compiled CPU flex_attention, which is inference "
                "only: call it under torch.no_grad() (or without inputs that require grad), or use the "
                "'tiled' backend to train on the CPU"
            )
        if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"backend 'flex' supports float32, bfloat16 and float16, got {q.dtype}; use 'tiled'")
    _, heads, h, w, d = q.shape
    training = variant[2] == "grad" and any(variant[3])
    if dev.type == "cuda":
        if d < 16:
            raise ValueError(f"backend 'flex' on CUDA needs head_dim >= 16 (flex_attention's kernels), got {d}; "
                             "use 'tiled' or 'auto'")
        if training and torch.are_deterministic_algorithms_enabled():
            raise ValueError("backend 'flex' accumulates the bias gradient with atomic adds, which is not "
                             "deterministic; use 'tiled' (what 'auto' picks) with deterministic algorithms")
    # CUDA's bf16/fp16 backward kernels need 64-token blocks on Hopper (sm90) and 128 elsewhere
    # (their only configs outside autotuning); float32 and every forward take 16.
    granule = 16
    if dev.type == "cuda" and q.dtype != torch.float32 and training:
        granule = 64 if torch.cuda.get_device_capability(dev) == (9, 0) else 128
    plan = flex_plan(h, w, ks, dil, dev, granule, full_width=dev.type == "cpu" and backend == "inductor")
    lay = plan.layout
    options = None
    if dev.type == "cuda":
        # Every query (padding repeats included) sees at least one key: no fully masked rows.
        options = {"BLOCK_M": min(lay.q_block, 64), "BLOCK_N": min(lay.kv_block, 64), "ROWS_GUARANTEED_SAFE": True}
    if torch.compiler.is_compiling():  # inside someone's torch.compile: let that compile inline it
        return _na_flex(q, k, v, None if rpb is None else rpb.reshape(heads, -1), plan, scale, options)
    # One stride pattern per function (dynamo guards on strides): the heads of a fused qkv
    # projection arrive as strided views, and the gather below copies them anyway.
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if rpb is not None:  # a plain tensor (a Parameter would be another guard) laid out [heads, table]
        rpb = rpb.reshape(heads, -1)
    if not torch.is_grad_enabled():  # views keep requires_grad under no_grad; dynamo guards on it
        q, k, v = q.detach(), k.detach(), v.detach()
        rpb = None if rpb is None else rpb.detach()
    key = (h, w, ks, dil, heads, d, str(plan.q_perm.device), granule, _backend_name(backend), scale) + variant \
        + _global_state()
    unit = _UNITS.get(key)
    if unit is None:
        with _UNITS_LOCK:
            unit = _UNITS.get(key)
            if unit is None:
                if len(_UNITS) >= FLEX_GRAPH_LIMIT:
                    raise FlexGraphLimitError(
                        f"more than {FLEX_GRAPH_LIMIT} compiled flex attention graphs were asked for "
                        f"(new: {_describe(key)}); something varies per call that should not (shapes, "
                        "dtypes); use backend 'tiled' or report it"
                    )
                name = "na2d_flex_" + "_".join(str(part) for part in key[:6]).replace(" ", "").replace(",", "x") \
                    .replace("(", "").replace(")", "") + f"_{len(_UNITS)}"
                fn = torch.compile(_fresh_function(name), backend=backend, fullgraph=True, dynamic=None)
                unit = _UNITS[key] = _Unit(fn, _describe(key))
    if variant[1] == "bN":
        for t in (q, k, v):
            torch._dynamo.maybe_mark_dynamic(t, 0)
    # q, k, v arrive in autocast's dtype already; inside, nothing more is cast.
    no_autocast = torch.autocast(dev.type, enabled=False)
    if unit.calls == 0:
        with no_autocast:
            out = unit.fn(q, k, v, rpb, plan, scale, options)
    else:
        try:
            with torch.compiler.set_stance("fail_on_recompile"), no_autocast:
                out = unit.fn(q, k, v, rpb, plan, scale, options)
        except RuntimeError as exc:
            if "fail_on_recompile" not in str(exc):
                raise
            raise FlexRecompileError(
                f"compiled flex attention for {unit.name} would recompile (and could fall back to the "
                f"unfused kernel, which materializes every score): {exc}"
            ) from None
    unit.calls += 1
    return out


def _describe(key: tuple) -> str:
    h, w, ks, dil, heads, d, device, granule, backend, _, dtype, batch, grad, needs, has_rpb, tf32, *_ = key
    need = "".join(n for n, f in zip("qkvb", needs) if f) or "-"
    return (f"{h}x{w} k{ks[0]}x{ks[1]} d{dil[0]}x{dil[1]} heads {heads} dim {d} on {device}, {dtype}, {batch}, "
            f"{grad}, requires grad: {need}, {backend}{', tf32' if tf32 else ''}")
