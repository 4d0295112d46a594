"""StyleNAT generator: mapping network (z -> w) and a Hydra-NA transformer synthesis network.

Latents: the synthesis network reads ``ws`` [B, num_ws, style_dim] with num_ws = 2 per stage;
block j of stage s reads ``ws[:, 2s + j]`` (its two AdaINs). Nothing else reads a latent: the
upsampling layers and ToRGB are not modulated. ``g(z)`` broadcasts one w to every latent, exactly
like the official model, so style mixing is ``g.synthesis(ws)`` with rows taken from different w.

Class-conditional models (``num_classes > 0``) take class indices ``c`` [B]: as in StyleGAN2-ADA,
a learned embedding of the one-hot label is normalized like z and joins it at the mapping
network's input; truncation then moves w toward the mean w of its class (``class_w_avg``).

Tensors inside the synthesis network are channels-last tokens [B, H, W, C].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stylenat.models.config import GeneratorConfig
from stylenat.nn.attention import HydraNeighborhoodAttention
from stylenat.nn.layers import AdaIN, EqualLinear, FIRUpsample, sinusoidal_table

__all__ = ["Generator", "MappingNetwork", "SynthesisNetwork", "seeds_to_z", "upsample2x_bilinear"]


def seeds_to_z(seeds, dim: int, device: str | torch.device = "cpu") -> Tensor:
    """Latents [len(seeds), dim], each drawn from N(0, I) by its own seeded CPU generator, so an
    image depends on its seed only (not on the batch or the device it is drawn on)."""
    return torch.stack([torch.randn(dim, generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(device)


def _normalize(x: Tensor) -> Tensor:
    return x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + 1e-8)


class MappingNetwork(nn.Module):
    """PixelNorm, then ``n_mlp`` equalized linear layers with leaky ReLU; tracks the mean w.

    Args:
        style_dim: size of z and w.
        n_mlp: number of linear layers.
        lr_mul: learning-rate multiplier of every layer.
        num_classes: classes of a conditional model (0: unconditional); see the module docstring.
        w_avg_beta: decay of the running mean ``w_avg`` updated in training mode.
    """

    def __init__(self, style_dim: int, n_mlp: int, lr_mul: float, num_classes: int = 0, w_avg_beta: float = 0.995):
        super().__init__()
        self.style_dim = style_dim
        self.num_classes = num_classes
        self.w_avg_beta = w_avg_beta
        if num_classes:
            self.label_embed = EqualLinear(num_classes, style_dim)
        first = 2 * style_dim if num_classes else style_dim
        self.layers = nn.ModuleList(EqualLinear(first if i == 0 else style_dim, style_dim, lr_mul, activate=True)
                                    for i in range(n_mlp))
        self.register_buffer("w_avg", torch.zeros(style_dim))
        if num_classes:
            self.register_buffer("class_w_avg", torch.zeros(num_classes, style_dim))

    def check_labels(self, c: Tensor | None, batch: int) -> None:
        if self.num_classes == 0:
            if c is not None:
                raise ValueError("this model is unconditional: pass no class labels")
            return
        if c is None:
            raise ValueError(f"this model is class-conditional ({self.num_classes} classes): pass class labels")
        if c.shape != (batch,) or c.dtype not in (torch.int32, torch.int64):  # one_hot checks the range
            raise ValueError(f"class labels must be integer class indices of shape [{batch}], got {c.dtype} {tuple(c.shape)}")

    def embed(self, z: Tensor, c: Tensor | None = None) -> Tensor:
        """z [B, style_dim] (and class indices c [B]) -> w [B, style_dim]; no tracking, no truncation."""
        if z.ndim != 2 or z.shape[1] != self.style_dim:
            raise ValueError(f"z must have shape [batch, {self.style_dim}], got {tuple(z.shape)}")
        self.check_labels(c, z.shape[0])
        x = _normalize(z)
        if self.num_classes:
            y = self.label_embed(F.one_hot(c.to(z.device), self.num_classes).to(z.dtype))
            x = torch.cat([x, _normalize(y)], dim=1)
        for layer in self.layers:
            x = layer(x)
        return x

    def center(self, c: Tensor | None, like: Tensor) -> Tensor:
        """The point truncation moves toward: ``w_avg``, or each label's ``class_w_avg`` [B, style_dim]."""
        if self.num_classes and c is not None:
            return self.class_w_avg[c.to(self.class_w_avg.device)].to(like.dtype)
        return self.w_avg.to(like.dtype)

    def truncate(self, w: Tensor, psi: float, c: Tensor | None = None) -> Tensor:
        """Move w toward the mean w (of its class): center + psi * (w - center); w [B, D] or [B, N, D]."""
        center = self.center(c, w)
        if w.ndim == 3 and center.ndim == 2:
            center = center[:, None]
        return center.lerp(w, psi)

    def forward(self, z: Tensor, truncation_psi: float = 1.0, *, c: Tensor | None = None) -> Tensor:
        w = self.embed(z, c)
        if self.training:
            with torch.no_grad():
                self.w_avg.copy_(w.detach().float().mean(0).lerp(self.w_avg, self.w_avg_beta))
        return w if truncation_psi == 1 else self.truncate(w, truncation_psi, c)


class Mlp(nn.Module):
    """Token-wise two-layer MLP with GELU.

    Args:
        dim: input and output channels.
        hidden: hidden channels.
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x += Attn(AdaIN1(x, w)); x += MLP(AdaIN2(x, w)).

    Args:
        dim: channels.
        heads: attention heads.
        kernels: NA kernel per head group.
        dilations: NA dilation per head group.
        mlp_ratio: MLP hidden width over dim.
        style_dim: size of w.
    """

    def __init__(self, dim: int, heads: int, kernels, dilations, mlp_ratio: float, style_dim: int):
        super().__init__()
        self.norm1 = AdaIN(dim, style_dim)
        self.attn = HydraNeighborhoodAttention(dim, heads, list(kernels), list(dilations))
        self.norm2 = AdaIN(dim, style_dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x, w))
        return x + self.mlp(self.norm2(x, w))


def upsample2x_bilinear(x: Tensor) -> Tensor:
    """Bilinear x2 upsampling (align_corners=False) of channels-last tokens [B, H, W, C] -> [B, 2H, 2W, C].

    Eagerly this is ``F.interpolate`` (its channels-last kernel). Under ``torch.compile`` it is the
    same interpolation written as one gather per axis with per-row weights, so that inductor keeps
    the channels innermost: its decomposition of ``F.interpolate`` writes an NCHW map and the next
    LayerNorm then reads it across channels, which made the 128 -> 256 upsampling 3x slower than
    eager on the CPU. Both agree to float rounding (about 1e-7 relative).
    """
    if not torch.compiler.is_compiling():
        return F.interpolate(x.permute(0, 3, 1, 2), scale_factor=2, mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    for dim in (1, 2):
        n = x.shape[dim]
        # PyTorch's source index for align_corners=False: (dst + 0.5) / 2 - 0.5, clamped at 0.
        src = ((torch.arange(2 * n, device=x.device, dtype=torch.float32) + 0.5) * 0.5 - 0.5).clamp(min=0)
        lo = src.long()
        hi = (lo + 1).clamp(max=n - 1)
        lam = (src - lo).to(x.dtype).view(-1, *([1] * (x.ndim - dim - 1)))
        x = x.index_select(dim, lo) * (1 - lam) + x.index_select(dim, hi) * lam
    return x


class StageUpsample(nn.Module):
    """Bilinear x2, LayerNorm, linear C_in -> C_out (no bias), + alpha * 2-D sinusoidal codes.

    Args:
        in_dim: channels in.
        out_dim: channels out; the first half of the codes follows x (columns), the second y (rows).
        out_size: output (height, width) (twice the input's), or an int for a square.
    """

    def __init__(self, in_dim: int, out_dim: int, out_size):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.reduction = nn.Linear(in_dim, out_dim, bias=False)
        self.alpha = nn.Parameter(torch.zeros(1))
        self.out_shape = (out_size, out_size) if isinstance(out_size, int) else tuple(out_size)
        # Positions 1..n of an axis are the first n rows of any longer table: one table serves both axes.
        self.register_buffer("codes", sinusoidal_table(max(self.out_shape), out_dim // 2), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        x = self.reduction(self.norm(upsample2x_bilinear(x)))
        h, w = self.out_shape
        half = self.codes.shape[1]
        codes = torch.cat([self.codes[None, :w, :].expand(h, w, half), self.codes[:h, None, :].expand(h, w, half)], dim=-1)
        return x + codes.to(x.dtype) * self.alpha


class Stage(nn.Module):
    """Two blocks at one resolution, then (except at the last stage) the upsampling to the next.

    Args:
        blocks: the two :class:`Block` of this stage.
        upsample: a :class:`StageUpsample`, or None at the last stage.
    """

    def __init__(self, blocks: list[Block], upsample: StageUpsample | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.upsample = upsample


class ToRGB(nn.Module):
    """1x1 conv to RGB plus a bias; adds the running RGB skip (FIR-upsampled when it is smaller).

    Args:
        dim: input channels.
        upsample_skip: the incoming skip has half this layer's resolution.
    """

    def __init__(self, dim: int, upsample_skip: bool):
        super().__init__()
        self.conv = nn.Conv2d(dim, 3, kernel_size=1)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))
        self.upsample = FIRUpsample() if upsample_skip else None

    def forward(self, x: Tensor, skip: Tensor | None) -> Tensor:
        # The 1x1 conv as a matmul over the channels-last tokens: the same weights, and no NCHW copy
        # of x (compiled, the convolution copied the 256x256 map to NCHW first).
        out = F.linear(x, self.conv.weight.flatten(1), self.conv.bias).permute(0, 3, 1, 2).contiguous() + self.bias
        if skip is None:
            return out
        return out + (self.upsample(skip) if self.upsample is not None else skip)


class SynthesisNetwork(nn.Module):
    """ws [B, num_ws, style_dim] -> raw image [B, 3, H, W] in the model's output space.

    Args:
        config: the generator configuration.
    """

    def __init__(self, config: GeneratorConfig):
        super().__init__()
        shapes = config.stage_shapes()
        ch = config.channels
        self.num_ws = config.num_ws
        self.style_dim = config.style_dim
        self.const = nn.Parameter(torch.randn(1, ch[0], *shapes[0]))
        self.stages = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        last = len(shapes) - 1
        for s, (h, w) in enumerate(shapes):
            blocks = [
                Block(ch[s], config.heads[s], config.kernels[s], config.dilations[s], config.mlp_ratio, config.style_dim)
                for _ in range(2)
            ]
            upsample = StageUpsample(ch[s], ch[s + 1], (2 * h, 2 * w)) if s < last else None
            self.stages.append(Stage(blocks, upsample))
            self.to_rgbs.append(ToRGB(ch[min(s + 1, last)], upsample_skip=s < last))

    def forward(self, ws: Tensor) -> Tensor:
        if ws.ndim != 3 or ws.shape[1:] != (self.num_ws, self.style_dim):
            raise ValueError(f"ws must have shape [batch, {self.num_ws}, {self.style_dim}], got {tuple(ws.shape)}")
        x = self.const.permute(0, 2, 3, 1).expand(ws.shape[0], -1, -1, -1)
        skip = None
        for s, (stage, to_rgb) in enumerate(zip(self.stages, self.to_rgbs)):
            for j, block in enumerate(stage.blocks):
                x = block(x, ws[:, 2 * s + j])
            if stage.upsample is not None:
                x = stage.upsample(x)
            skip = to_rgb(x, skip)
        return skip


class Generator(nn.Module):
    """z -> raw image. See the module docstring for how latents are read.

    Args:
        config: the generator configuration.
    """

    def __init__(self, config: GeneratorConfig):
        super().__init__()
        self.config = config
        self.mapping = MappingNetwork(config.style_dim, config.n_mlp, config.lr_mlp, config.num_classes)
        self.synthesis = SynthesisNetwork(config)
        self.apply(_init_weights)

    @property
    def style_dim(self) -> int:
        return self.config.style_dim

    @property
    def num_ws(self) -> int:
        return self.config.num_ws

    @property
    def resolution(self) -> int | tuple[int, int]:
        """The config's size: an int for a square, else (height, width)."""
        return self.config.resolution

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the images."""
        return self.config.shape

    @property
    def w_avg(self) -> Tensor:
        return self.mapping.w_avg

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def forward(self, z: Tensor, truncation_psi: float = 1.0, truncation_cutoff: int | None = None, *,
                c: Tensor | None = None) -> Tensor:
        """Raw images [B, 3, H, W]; truncation moves latents 0 .. cutoff-1 (default all) toward the
        mean w (of each image's class, for a conditional model; ``c``: class indices [B])."""
        ws = self.mapping(z, c=c).unsqueeze(1).repeat(1, self.num_ws, 1)
        if truncation_psi != 1:
            cut = self.num_ws if truncation_cutoff is None else truncation_cutoff
            ws[:, :cut] = self.mapping.truncate(ws[:, :cut], truncation_psi, c)
        return self.synthesis(ws)

    @torch.no_grad()
    def compute_w_avg(self, n: int = 10000, seed: int = 0, batch: int = 1000) -> Tensor:
        """Set ``w_avg`` to the mean of w over ``n`` seeded z (for weights trained elsewhere); for a
        conditional model, over labels drawn uniformly too."""
        gen = torch.Generator().manual_seed(seed)
        dev = self.w_avg.device
        total = torch.zeros(self.style_dim, dtype=torch.float64, device=dev)
        for start in range(0, n, batch):
            z = torch.randn(min(batch, n - start), self.style_dim, generator=gen).to(dev)
            c = torch.randint(self.num_classes, (len(z),), generator=gen).to(dev) if self.num_classes else None
            total += self.mapping.embed(z, c).double().sum(0)
        self.w_avg.copy_(total / n)
        return self.w_avg

    @torch.no_grad()
    def compute_class_w_avg(self, n: int = 1000, seed: int = 0) -> Tensor:
        """Set each class's mean w, ``class_w_avg`` [num_classes, style_dim], to the mean of w over the
        latents of seeds seed .. seed+n-1 with that label (``seeds_to_z``: what sampling draws)."""
        dev = self.w_avg.device
        z = seeds_to_z(range(seed, seed + n), self.style_dim, dev)
        for k in range(self.num_classes):
            c = torch.full((n,), k, dtype=torch.long, device=dev)
            self.mapping.class_w_avg[k] = self.mapping.embed(z, c).double().mean(0).to(self.mapping.class_w_avg.dtype)
        return self.mapping.class_w_avg


def _init_weights(m: nn.Module) -> None:
    # The official init: transformer linears trunc-normal 0.02; ToRGB xavier with a tiny gain so the
    # first images are near the mean; equalized layers and the constant keep their N(0, 1).
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        nn.init.xavier_normal_(m.weight, gain=0.02)
        nn.init.zeros_(m.bias)
