"""Export the generator to run outside Python: ONNX (onnxruntime, TensorRT, web and mobile runtimes)
and ``torch.export`` programs (``.pt2``), checked against PyTorch before they are written.

The exported graph is the whole sampling path, so a user needs nothing but the runtime:

* ``--input z`` (default): inputs ``z`` float32 [batch, style_dim], ``psi`` float32 scalar (the
  truncation, toward the mean w, or the class's mean w), and for a class-conditional model ``labels``
  int64 [batch] (class indices); output ``images`` uint8 [batch, 3, H, W] (RGB; H and W the model's
  height and width, 16 and 32 for a 32x16 model), the pixels ``stylenat generate`` writes (within
  one level: the graph's float arithmetic is reordered).
* ``--input w``: input ``ws`` float32 [batch, num_ws, style_dim] (projected or edited latents, as
  ``stylenat project`` and ``edit`` make them), output ``images`` as above.

The batch is dynamic; the size (height and width) is the model's. Attention runs on the tiled path
(plain gathers, matmuls and a softmax; never the flex kernels, which no exporter can lower), with
its index tables built before tracing so that they enter the graph as constants. The model's
config, class names, input kind, size and the stylenat version go into the file's metadata (ONNX
``metadata_props``; a ``stylenat.json`` extra file in a ``.pt2``): ``resolution`` is the side of a
square model ("256") or WIDTHxHEIGHT ("32x16"), ``width`` and ``height`` the output's W and H.
Seeds become z as in stylenat: ``torch.randn(style_dim, generator=torch.Generator().manual_seed(seed))``.

Not in the graph: ``truncation_cutoff`` (every ws index is truncated), style mixing (export ``w``
and mix the latents), other resolutions, half precision, and the flex/CUDA-graph fast paths. The
mean w (and the classes' mean w) are constants of the file, as they were at export: export again
after recomputing them. The graph does not check labels: an index outside 0..classes-1 gives a
wrong image, not an error (:class:`ExportedGenerator` checks them).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from stylenat._system import atomic_path, package_version
from stylenat.errors import ConfigError, MissingFileError, ModelFileError, UserError, first_line
from stylenat.models import GeneratorConfig, model_to_uint8
from stylenat.models.generator import Generator, seeds_to_z
from stylenat.nn.attention import na_backend
from stylenat.sampling import class_indices, generate, seeds_to_w

__all__ = ["FORMATS", "INPUTS", "DEFAULT_OPSET", "ONNX_EXTRA", "ExportReport", "ExportedGenerator", "export", "check_target",
           "load_exported", "is_exported"]

FORMATS = ("onnx", "torch-export")
INPUTS = ("z", "w")
SUFFIXES = {"onnx": ".onnx", "torch-export": ".pt2"}
# Opset 18: what onnxruntime >= 1.14, TensorRT >= 8.6 and onnxruntime-web read; the graph needs nothing newer.
# It is also the oldest the torch.export-based ONNX exporter writes.
DEFAULT_OPSET = 18
MIN_OPSET = 18
ONNX_EXTRA = 'pip install "stylenat[onnx]"'
FORMAT_TAG = "stylenat-export/1"
CHECK_SEEDS = (0, 1, 2)
CHECK_PSIS = (1.0, 0.7)  # two values: psi is an input, not a constant of the graph
MAX_LEVEL_DIFF = 1


class ZToImages(nn.Module):
    """z [B, D], psi [], (labels [B]) -> uint8 images [B, 3, H, W]: mapping, truncation, synthesis, pixels."""

    def __init__(self, g: Generator):
        super().__init__()
        self.g = g

    def forward(self, z: Tensor, psi: Tensor, labels: Tensor | None = None) -> Tensor:
        mapping = self.g.mapping
        w = mapping.embed(z, labels)
        w = mapping.center(labels, w).lerp(w, psi)
        return model_to_uint8(self.g.synthesis(w[:, None].expand(-1, self.g.num_ws, -1)), self.g.config)


class WsToImages(nn.Module):
    """ws [B, num_ws, D] -> uint8 images [B, 3, H, W]."""

    def __init__(self, g: Generator):
        super().__init__()
        self.g = g

    def forward(self, ws: Tensor) -> Tensor:
        return model_to_uint8(self.g.synthesis(ws), self.g.config)


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export` wrote and measured."""

    path: Path
    format: str
    input: str
    opset: int | None
    seconds: float  # tracing and writing
    max_level_diff: int | None  # largest pixel difference from PyTorch over the check (None: not checked)
    checked_images: int
    generator_config: GeneratorConfig


def _metadata(g: Generator, fmt: str, input: str, opset: int | None) -> dict[str, str]:
    cfg = g.config
    return {"format": FORMAT_TAG, "stylenat_version": package_version(), "export_format": fmt, "input": input,
            "opset": "" if opset is None else str(opset), "generator_config": json.dumps(cfg.to_dict()),
            "classes": json.dumps(list(cfg.classes)), "num_ws": str(cfg.num_ws),
            # A square's side as ever ("256"); a rectangle as WIDTHxHEIGHT ("32x16"); W and H apart too.
            "resolution": str(cfg.resolution) if isinstance(cfg.resolution, int) else cfg.size_text,
            "width": str(cfg.width), "height": str(cfg.height),
            "style_dim": str(cfg.style_dim), "images": "uint8 [batch, 3, H, W] RGB",
            "z": "z ~ N(0, I); stylenat's seed s: torch.randn(style_dim, generator=torch.Generator().manual_seed(s))"}


def _example(g: Generator, input: str, batch: int = 2) -> tuple[tuple, dict, list[str]]:
    """(example inputs, dynamic shapes, input names) of the exported function."""
    batch_dim = torch.export.Dim("batch", min=1, max=4096)
    if input == "w":
        return (torch.zeros(batch, g.num_ws, g.style_dim),), {"ws": {0: batch_dim}}, ["ws"]
    args = (torch.zeros(batch, g.style_dim), torch.tensor(0.7))
    shapes = {"z": {0: batch_dim}, "psi": None}
    if g.config.num_classes:
        return (*args, torch.zeros(batch, dtype=torch.long)), {**shapes, "labels": {0: batch_dim}}, ["z", "psi", "labels"]
    return args, shapes, ["z", "psi"]


@contextlib.contextmanager
def _quiet_exporter():
    """The ONNX exporter logs a line per missing torchvision op and warns about its own internals."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _require_onnx() -> None:
    missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if not _importable(name)]
    if missing:
        raise UserError(f"ONNX export needs {', '.join(missing)}: {ONNX_EXTRA}")


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def check_target(path: str | os.PathLike, format: str, input: str, opset: int) -> Path:
    """``path`` as a Path after checking what :func:`export` is asked for, before any work is done."""
    if format not in FORMATS:
        raise ConfigError(f"export format {format!r}: choose one of {', '.join(FORMATS)}")
    if input not in INPUTS:
        raise ConfigError(f"export input {input!r}: choose z (z, psi, labels) or w (ws)")
    path = Path(path)
    want = SUFFIXES[format]
    if path.is_dir():
        raise ConfigError(f"{path} is a folder; give the file to write, e.g. {path / ('generator' + want)}")
    if path.suffix.lower() != want:
        raise ConfigError(f"{path}: a {format} file is named *{want} (that is how `stylenat generate` and runtimes "
                          f"recognise it)")
    if format == "onnx":
        if not isinstance(opset, int) or opset < MIN_OPSET:
            raise ConfigError(f"--opset {opset}: the ONNX exporter writes opset {MIN_OPSET} or newer")
        _require_onnx()
    return path


def export(g: Generator, path: str | os.PathLike, format: str = "onnx", input: str = "z", opset: int = DEFAULT_OPSET,
           check: bool = True, check_seeds: Sequence[int] = CHECK_SEEDS, optimize: bool = True) -> ExportReport:
    """Export generator ``g`` (its weights as they are; use g_ema) to ``path``.

    Args:
        g: a stylenat generator; a copy of it, on the CPU in float32 and eval mode, is traced.
        path: the output file (``.onnx`` or ``.pt2``); written only after the check passed.
        format: "onnx" or "torch-export".
        input: "z" (z, psi, labels) or "w" (ws); see the module docstring.
        opset: the ONNX opset.
        check: run the exported file (onnxruntime, or the loaded program) on ``check_seeds`` at two psi
            values and compare with :func:`stylenat.sampling.generate`; fail above one pixel level.
        optimize: let the ONNX exporter fold constants and drop redundant ops.
    Returns an :class:`ExportReport`.
    """
    path = check_target(path, format, input, opset)
    g = copy.deepcopy(g).float().cpu().eval()  # the caller's model keeps its device, dtype and mode
    args, shapes, names = _example(g, input)
    module = WsToImages(g) if input == "w" else ZToImages(g)
    start = time.monotonic()
    with atomic_path(path) as tmp, na_backend("tiled"), torch.no_grad():
        module(*args)  # builds the tiled path's index tables, so the trace takes them as constants
        if format == "onnx":
            _export_onnx(module, args, shapes, names, tmp, _metadata(g, format, input, opset), opset, optimize)
        else:
            program = torch.export.export(module, args, dynamic_shapes=shapes, strict=False)
            extra = {"stylenat.json": json.dumps(_metadata(g, format, input, None))}
            with open(tmp, "wb") as f:  # a file object: the archive writer wants a .pt2 name otherwise
                torch.export.save(program, f, extra_files=extra)
        seconds = time.monotonic() - start
        diff, count = None, 0
        if check:
            diff, count = _check(load_exported(tmp, suffix=SUFFIXES[format]), g, check_seeds)
            if diff > MAX_LEVEL_DIFF:
                raise ModelFileError(f"the exported {format} file differs from PyTorch by up to {diff} pixel levels "
                                     f"(allowed {MAX_LEVEL_DIFF}) on seeds {list(check_seeds)}; nothing was written")
    return ExportReport(path, format, input, opset if format == "onnx" else None, seconds, diff, count, g.config)


def _export_onnx(module, args, shapes, names, path, metadata: dict, opset: int, optimize: bool) -> None:
    import onnx

    with _quiet_exporter():
        program = torch.onnx.export(module, args, input_names=names, output_names=["images"], dynamic_shapes=shapes,
                                    dynamo=True, opset_version=opset, optimize=optimize, verbose=False)
    if program is None:  # pragma: no cover - the dynamo exporter always returns its program
        raise RuntimeError("torch.onnx.export returned no program")
    model = program.model_proto
    written = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if written != opset:
        raise ConfigError(f"--opset {opset}: the ONNX exporter wrote opset {written} instead; use --opset {written}")
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.producer_name, model.producer_version = "stylenat", package_version()
    onnx.save_model(model, path)


def _check(exported: "ExportedGenerator", g: Generator, seeds: Sequence[int]) -> tuple[int, int]:
    """Largest pixel difference between ``exported`` and PyTorch over ``seeds`` (x two psi), and the image count."""
    worst, count = 0, 0
    labels = [s % g.config.num_classes for s in seeds] if g.config.num_classes else None
    for psi in CHECK_PSIS:
        want = generate(g, seeds, psi, batch=4, labels=labels)
        if exported.input == "w":
            ws = seeds_to_w(g, seeds, psi, labels)[:, None].expand(-1, g.num_ws, -1)
            got = exported.synthesize(ws)
        else:
            got = exported.generate(seeds, psi, labels=labels, batch=4)
        worst = max(worst, int((got.int() - want.int()).abs().max()))
        count += len(seeds)
    return worst, count


# ---- running exported files -------------------------------------------------------------------


def is_exported(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an exported generator (by its suffix: .onnx or .pt2)."""
    return Path(str(path)).suffix.lower() in SUFFIXES.values()


class ExportedGenerator:
    """An exported generator run by onnxruntime (``.onnx``) or as a loaded program (``.pt2``).

    Attributes: ``config`` (GeneratorConfig), ``input`` ("z" or "w"), ``metadata`` (str -> str);
    ``resolution`` (an int for a square, else (height, width), as the config's), ``shape`` (H, W),
    ``height``, ``width``.
    """

    def __init__(self, path: str | os.PathLike, suffix: str | None = None, threads: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise MissingFileError(f"{self.path} is not a file (expected an .onnx or .pt2 file from `stylenat export`)")
        kind = (suffix or self.path.suffix).lower()
        if kind == ".onnx":
            self.metadata, self._run = self._open_onnx(threads)
        else:
            self.metadata, self._run = self._open_program()
        if self.metadata.get("format") != FORMAT_TAG:
            raise ModelFileError(f"{self.path} was not exported by stylenat (no {FORMAT_TAG!r} metadata)")
        self.config = GeneratorConfig.from_dict(json.loads(self.metadata["generator_config"]))
        self.input = self.metadata["input"]

    def _open_onnx(self, threads: int | None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError(f"running an .onnx model needs onnxruntime: {ONNX_EXTRA}") from None
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: its constant-folding notes are not the user's business
        # Memory patterns pre-plan one buffer per intermediate for the whole run: with the attention's
        # score tensors that took ffhq256 from 2.6 to 4.1 GB at batch 1 (and out of 24 GB at batch 8),
        # for no speed (measured: benchmarks/export.py).
        options.enable_mem_pattern = False
        if threads:
            options.intra_op_num_threads = threads
        try:
            session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's own errors for damaged or foreign files
            raise ModelFileError(f"{self.path} is not a readable ONNX model ({first_line(exc)})") from None
        names = [i.name for i in session.get_inputs()]

        def run(*arrays: np.ndarray) -> np.ndarray:
            return session.run(["images"], dict(zip(names, arrays)))[0]

        return dict(session.get_modelmeta().custom_metadata_map), run

    def _open_program(self):
        extra = {"stylenat.json": ""}
        try:
            with open(self.path, "rb") as f:
                program = torch.export.load(f, extra_files=extra)
        except Exception as exc:  # a damaged or foreign archive
            raise ModelFileError(f"{self.path} is not a readable torch.export program ({first_line(exc)})") from None
        module = program.module()

        def run(*arrays: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return module(*(torch.from_numpy(a) for a in arrays)).numpy()

        try:
            metadata = json.loads(extra["stylenat.json"] or "{}")
        except ValueError:
            metadata = {}
        return metadata, run

    def __call__(self, z_or_ws: np.ndarray, psi: float = 1.0, labels: np.ndarray | None = None) -> np.ndarray:
        """uint8 images [B, 3, H, W] of z (with psi, labels) or of ws, as the file's input kind says."""
        if self.input == "w":
            return self._run(np.ascontiguousarray(z_or_ws, dtype=np.float32))
        arrays = [np.ascontiguousarray(z_or_ws, dtype=np.float32), np.asarray(psi, dtype=np.float32)]
        if arrays[1].ndim:
            raise ConfigError(f"psi is one number for the whole batch, got an array of shape {arrays[1].shape}")
        if self.config.num_classes:
            c = np.ascontiguousarray(labels, dtype=np.int64)
            if c.shape != (len(arrays[0]),) or c.min(initial=0) < 0 or c.max(initial=0) >= self.config.num_classes:
                # the graph does not check: a one-hot of an index out of range is all zeros, not an error
                raise ConfigError(f"labels must be {len(arrays[0])} class indices in 0-{self.config.num_classes - 1}, "
                                  f"got {labels!r}")
            arrays.append(c)
        return self._run(*arrays)

    def generate(self, seeds: Sequence[int], truncation_psi: float = 1.0, labels=None, batch: int = 16) -> Tensor:
        """uint8 [len(seeds), 3, H, W] for seeds, like :func:`stylenat.sampling.generate`."""
        if self.input != "z":
            raise ConfigError(f"{self.path} takes latents ws (exported with --input w), not seeds; export with "
                              "--input z to sample seeds")
        if not len(seeds):
            return torch.zeros(0, 3, *self.shape, dtype=torch.uint8)
        z = seeds_to_z(seeds, self.config.style_dim).numpy()
        c = class_indices(self, labels, len(z))
        out = [self(z[i:i + batch], truncation_psi, None if c is None else c[i:i + batch].numpy())
               for i in range(0, len(z), batch)]
        return torch.from_numpy(np.concatenate(out))

    def synthesize(self, ws: Tensor) -> Tensor:
        """uint8 images of latents ws [N, num_ws, style_dim] (a file exported with --input w)."""
        if self.input != "w":
            raise ConfigError(f"{self.path} takes z (exported with --input z); export with --input w for latents")
        return torch.from_numpy(self(ws.detach().float().cpu().contiguous().numpy()))

    @property
    def resolution(self) -> int | tuple[int, int]:
        """The model's size as its config holds it: an int for a square, else (height, width)."""
        return self.config.resolution

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the images."""
        return self.config.shape

    @property
    def height(self) -> int:
        return self.config.height

    @property
    def width(self) -> int:
        return self.config.width

    @property
    def num_ws(self) -> int:
        return self.config.num_ws


def load_exported(path: str | os.PathLike, suffix: str | None = None, threads: int | None = None) -> ExportedGenerator:
    """An exported generator file, ready to run (see :class:`ExportedGenerator`)."""
    return ExportedGenerator(path, suffix, threads)
