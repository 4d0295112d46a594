"""The `stylenat` command: one entry point, one sub-command per job.

Each sub-command parses its arguments and calls one library function. Errors a user can cause
(:class:`stylenat.errors.UserError`) surface as one line on stderr and exit status 2; any other
exception is a bug and keeps its traceback. ``STYLENAT_DEBUG=1`` shows the traceback of user
errors too. Exit statuses: 0 done, 1 a bug, 2 a user error, 3 training stopped on a non-finite
loss, 75 training stopped by a signal after writing a checkpoint (resume it), 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys

from stylenat._size import parse_size
from stylenat.errors import ConfigError, UserError


def parse_ints(text: str, name: str = "value") -> list[int]:
    """Integers from "0-63", "1,5,9" or "0-3,10" (ranges inclusive, order kept).

    text: the list; name: the option it came from, for the error message (e.g. "--seeds").
    """
    out: list[int] = []
    try:
        for part in str(text).split(","):
            lo, sep, hi = part.strip().partition("-")
            if sep and lo:  # "a-b"; a leading "-" would be a negative number, not a range
                first, last = int(lo), int(hi)
                if last < first:
                    raise ValueError
                out.extend(range(first, last + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise ConfigError(f"{name}: cannot read {text!r}; use a list like 0-63, 1,5,9 or 0-3,10") from None
    return out


def _size_flag(text: str):
    """An image size option: N (a square) or WIDTHxHEIGHT, as models hold it (an int or (height, width))."""
    try:
        return parse_size(text, "size")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cmd_info(args: argparse.Namespace) -> int:
    import platform

    import torch

    from stylenat import __version__
    from stylenat.nn.attention import available_backends

    print(f"stylenat {__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}")
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        print(f"device: cuda ({torch.cuda.device_count()}x {names})")
    else:
        print(f"device: cpu ({torch.get_num_threads()} threads)")
    print("attention backends:")
    for dev in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        print(f"  {dev}: {', '.join(available_backends(dev))}")
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from stylenat.data import prepare_dataset

    report = prepare_dataset(args.src, args.dst, args.size, filter=args.filter, crop=args.crop, fill=args.fill,
                             labels=args.labels, workers=args.workers)
    print(f"stylenat prepare: {report.summary()}")
    return 0


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    from stylenat.train.flags import add_train_arguments

    add_train_arguments(p)


class _LazyParser(argparse.ArgumentParser):
    """A sub-command parser that adds its arguments on first use (``add_arguments(parser)``): the
    train options come from TrainConfig, whose import brings torch (about a second) that
    ``stylenat --help``, ``models`` or ``download`` need not wait for."""

    def __init__(self, *args, add_arguments=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._add_arguments = add_arguments

    def _ready(self) -> None:
        add, self._add_arguments = self._add_arguments, None
        if add is not None:
            add(self)

    def parse_known_args(self, args=None, namespace=None):
        self._ready()
        return super().parse_known_args(args, namespace)

    def format_usage(self):
        self._ready()
        return super().format_usage()

    def format_help(self):
        self._ready()
        return super().format_help()


def _cmd_train(args: argparse.Namespace) -> int:
    from stylenat.train import NonFiniteError, TrainingStopped, resume, train
    from stylenat.train.flags import config_from_args, flag_values
    from stylenat.train.signals import STOPPED_EXIT_STATUS

    try:
        if args.resume:
            resume(args.resume, steps=flag_values(args).get("steps"))
            return 0
        train(config_from_args(args))
    except NonFiniteError as exc:
        print(f"stylenat train: stopped: {exc}; the last checkpoint is intact (resume with --resume, "
              f"or pass --on-nonfinite skip)", file=sys.stderr)
        return 3
    except TrainingStopped as exc:
        print(f"stylenat train: {exc}; continue with: stylenat train --resume {exc.checkpoint.parents[1]}", file=sys.stderr)
        return STOPPED_EXIT_STATUS
    return 0


def _cmd_fid(args: argparse.Namespace) -> int:
    from stylenat.metrics.registry import evaluate

    result = evaluate(args.first, args.real, num=args.num, kid=args.kid, resolution=args.resolution,
                      inception=args.inception, batch=args.batch, device=args.device, workers=args.workers)
    line = f"FID {result['fid']:.4f} ({result['num_fake']} vs {result['num_real']} images)"
    if args.kid:
        line += f", KID {result['kid']:.6f} +- {result['kid_std']:.6f}"
    print(line)
    return 0


def _cmd_metrics(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from stylenat._system import atomic_path
    from stylenat.metrics.registry import measure

    names = [n for n in args.metrics.split(",") if n]
    values = measure(args.first, args.real, names, num=args.num, resolution=args.resolution, inception=args.inception,
                     batch=args.batch, device=args.device, workers=args.workers, per_class=args.per_class)
    for key, value in values.items():
        if not key.startswith("num_"):
            print(f"{key} {value:.4f}" if abs(value) >= 1e-3 else f"{key} {value:.6g}")
    counts = ", ".join(f"{n}: {values[f'num_fake_{n}']} vs {values[f'num_real_{n}']}" for n in map(str.lower, names))
    print(f"images compared ({counts}); wrote {args.out}", file=sys.stderr)
    record = {"first": str(args.first), "real": str(args.real), "metrics": names, "results": values}
    with atomic_path(args.out) as tmp:
        Path(tmp).write_text(json.dumps(record, indent=2) + "\n")
    return 0


def _cmd_convert_official(args: argparse.Namespace) -> int:
    from stylenat.models.io import save_model
    from stylenat.models.loading import read_official_meta
    from stylenat.models.official import load_official_checkpoint

    if (args.preset is None) == (args.meta is None):
        raise UserError("give exactly one of --preset NAME or --meta META.json")
    meta = args.preset if args.meta is None else read_official_meta(args.meta)
    modules = load_official_checkpoint(args.checkpoint, meta)
    g = modules["g_ema"]
    d = modules.get("d")
    save_model(args.out, modules, g.config, None if d is None else d.config,
               extra={"source": str(args.checkpoint), "official_meta": meta})
    print(f"wrote {args.out} ({', '.join(modules)}; {g.config.size_text})")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from stylenat.registry import cached_model, entries

    print(f"{'name':<12} {'images':>9} {'FID':>7} {'file':>9} {'cached':<7} {'licence':<8} what")
    for name, e in entries().items():
        try:
            cached = "yes" if cached_model(name) is not None else "no"
        except UserError:  # a damaged cache entry is listed, not fatal
            cached = "damaged"
        res = e.size_text or "-"
        fid = f"{e.fid:.3f}" if e.fid is not None else "-"
        size = f"{e.size / 2**20:.0f} MiB" if e.size else "-"
        print(f"{name:<12} {res:>9} {fid:>7} {size:>9} {cached:<7} {e.license or '-':<8} {e.description or e.urls[0]}")
    return 0


def _cmd_download(args: argparse.Namespace) -> int:
    from stylenat.registry import fetch

    for name in args.names:
        print(f"{name}: {fetch(name, force=args.force)}")
    return 0


def _cmd_export_hub(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from stylenat.hub import export_hub
    from stylenat.models.loading import read_official_meta

    metrics = None
    if args.metrics:
        try:
            record = json.loads(Path(args.metrics).read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"--metrics {args.metrics}: not a readable JSON file ({exc})") from None
        results = record.get("results", record) if isinstance(record, dict) else None
        if not isinstance(results, dict):
            raise UserError(f"--metrics {args.metrics}: expected the JSON that `stylenat metrics --out` writes")
        metrics = {k: v for k, v in results.items() if isinstance(v, (int, float)) and not k.startswith("num_")}
    modules = tuple(args.modules.split(",")) if args.modules else None
    out = export_hub(args.model, args.dir, modules, preset=args.preset,
                     meta=read_official_meta(args.meta) if args.meta else None, license=args.license,
                     dataset=args.dataset, metrics=metrics, description=args.description)
    print(f"wrote {out}: config.json, model.safetensors, README.md")
    return 0


def _cmd_push_hub(args: argparse.Namespace) -> int:
    from stylenat.hub import push_hub

    print(f"uploaded {args.dir} to {args.repo}: {push_hub(args.dir, args.repo, private=args.private, revision=args.revision, message=args.message)}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from stylenat.export import SUFFIXES, check_target, export

    out = args.out or f"{_output_stem(args.model)}{SUFFIXES[args.format]}"
    check_target(out, args.format, args.input, args.opset)  # before loading (or downloading) the model
    report = export(_load_generator(args), out, args.format, args.input, args.opset, check=not args.no_check,
                    check_seeds=parse_ints(args.check_seeds, "--check-seeds"))
    g = report.generator_config
    what = "ws" if args.input == "w" else ("z, psi, labels" if g.num_classes else "z, psi")
    checked = ("not checked (--no-check)" if report.max_level_diff is None else
               f"checked against PyTorch on {report.checked_images} images: largest pixel difference "
               f"{report.max_level_diff} level{'s' if report.max_level_diff != 1 else ''}")
    opset = f", opset {report.opset}" if report.opset else ""
    print(f"wrote {report.path} ({args.format}{opset}; inputs {what}; {report.seconds:.1f} s); {checked}")
    return 0


def _output_stem(model: str) -> str:
    """An output name for ``model``: the registry name, or the file's or folder's name without suffix."""
    from pathlib import Path

    return Path(str(model).rstrip("/")).stem or "generator"


def _load_generator(args: argparse.Namespace):
    from stylenat.export import is_exported
    from stylenat.models import resolve_model

    if is_exported(args.model):
        raise UserError(f"{args.model} is an exported model: `stylenat generate` samples it; for `stylenat {args.command}` "
                        "give the model it was exported from")

    return resolve_model(args.model, preset=args.preset, meta=args.meta, device=args.device)


def _safe_name(text: str) -> str:
    """A class name made safe for a file name."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)


def _cmd_generate(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from stylenat.data.images import save_image_grid
    from stylenat.sampling import generate

    seeds = parse_ints(args.seeds, "--seeds")
    grid = tuple(parse_ints(args.grid.replace("x", ","), "--grid")) if args.grid else None
    if grid is not None and args.classes:
        raise UserError("--classes lays out its own grid (one row per class); drop --grid")
    if args.classes and args.cls is not None:
        raise UserError("--classes makes one row for every class; drop --class (or drop --classes for one class)")
    if grid is not None and (len(grid) != 2 or min(grid) < 1 or grid[0] * grid[1] < len(seeds)):
        raise UserError(f"--grid {args.grid}: need ROWSxCOLS with room for all {len(seeds)} seeds")
    if args.batch is not None and args.batch < 1:
        raise UserError(f"--batch {args.batch}: give at least 1 image per pass")
    if args.no_images and grid is None and not args.classes:
        raise UserError("--no-images without --grid would write nothing; add --grid ROWSxCOLS")
    from stylenat.export import is_exported, load_exported

    if is_exported(args.model):  # an exported file runs on its own runtime (onnxruntime, or the .pt2 program)
        if args.compile or args.preset or args.meta or args.device:
            raise UserError(f"{args.model} is an exported model (run on the CPU by its runtime): --compile, --preset, "
                            "--meta and --device do not apply")
        g = load_exported(args.model)
        sample = g.generate
        args.batch = args.batch or EXPORTED_BATCH
    else:
        g = _load_generator(args)
        if args.compile:
            from stylenat.models.compiled import compile_generator

            compile_generator(g, "default")  # no CUDA graphs: the images are kept across passes

        def sample(seeds, psi, labels, batch):
            return generate(g, seeds, psi, batch, labels=labels)
        args.batch = args.batch or 16
    if args.classes:  # one row per class, one column per seed
        if not g.config.num_classes:
            raise UserError("--classes: this model is unconditional (it has no classes)")
        classes = range(g.config.num_classes)
        images = torch.cat([sample(seeds, args.trunc, k, args.batch) for k in classes])
        grid = (len(classes), len(seeds))
        seeds = [f"{s:04d}-{g.config.classes[k]}" for k in classes for s in seeds]
    else:
        images = sample(seeds, args.trunc, args.cls, args.batch)
        seeds = [f"{s:04d}" for s in seeds]
    out = Path(args.out)
    if not args.no_images:
        for seed, image in zip(seeds, images):
            save_image_grid(image[None], out / f"seed{_safe_name(seed)}.png", (1, 1))
    if grid is not None:
        save_image_grid(images, out / "grid.png", grid)
    print(f"wrote {0 if args.no_images else len(seeds)} images{' and grid.png' if grid else ''} to {out}")
    return 0


EXPORTED_BATCH = 4  # `generate FILE.onnx` default batch: ffhq256 in onnxruntime needs ~1.7 GiB per image in flight


def _float_list(text: str, name: str) -> list[float]:
    """Numbers from "-3,-1.5,0,1.5,3"; name: the option it came from, for the error message."""
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"{name}: cannot read {text!r}; use a list like -3,-1.5,0,1.5,3") from None


def _check_seed_options(args: argparse.Namespace, uses_seeds: bool) -> None:
    """Refuse --trunc and --class when every source is a latent file: both act on seeds only (a
    latent file is a point in w, used as it is, and already holds its class), and ignoring them
    silently would leave the user believing they applied."""
    if uses_seeds:
        return
    if args.trunc != 1:
        raise ConfigError("--trunc truncates the latents of seeds toward the mean w; latent files are used as they are "
                          "(drop --trunc, or use seeds)")
    if args.cls is not None:
        raise ConfigError("--class picks the class of seeds; a latent file already holds the class it was made with "
                          "(drop --class)")


def _seeds_or_latents(g, seeds: str | None, latents: str | None, flag: str):
    """The seeds of option ``flag``, or (when given instead) ws [N, num_ws, style_dim] of comma-separated latent files."""
    if latents is None:
        return parse_ints(seeds, flag)
    import torch

    from stylenat.models.latents import load_latent

    return torch.stack([load_latent(path.strip(), g) for path in latents.split(",")])


def _cmd_mix(args: argparse.Namespace) -> int:
    from stylenat.data.images import save_image_grid
    from stylenat.sampling import style_mix

    _check_seed_options(args, args.rows is not None or args.cols is not None)
    g = _load_generator(args)
    grid = style_mix(g, _seeds_or_latents(g, args.rows, args.row_latents, "--rows"),
                     _seeds_or_latents(g, args.cols, args.col_latents, "--cols"),
                     parse_ints(args.layers, "--layers"), args.trunc, args.batch, labels=args.cls)
    save_image_grid(grid.flatten(0, 1), args.out, tuple(grid.shape[:2]))
    print(f"wrote {args.out} ({grid.shape[0]}x{grid.shape[1]} cells)")
    return 0


def _cmd_video(args: argparse.Namespace) -> int:
    from stylenat.sampling import check_video_path, interpolate, save_video

    check_video_path(args.out)  # fail before rendering, not after
    _check_seed_options(args, args.seeds is not None)
    g = _load_generator(args)
    frames = interpolate(g, _seeds_or_latents(g, args.seeds, args.latents, "--seeds"), args.frames, loop=args.loop,
                         space=args.space, truncation_psi=args.trunc, batch=args.batch, labels=args.cls)
    save_video(frames, args.out, fps=args.fps, loop=args.loop)
    print(f"wrote {args.out} ({len(frames)} frames at {args.fps:g} fps)")
    return 0


PROJECT_VIDEO_FRAMES = 100  # --video records the latent's image this many times, evenly over the steps


def _projection_folders(paths: list, target: str, out: str) -> list:
    """One output folder per target file: OUT/<name without extension>, a folder target's subfolders kept."""
    from collections import Counter
    from pathlib import Path

    target, out = Path(target), Path(out)
    folders = [out / (p.relative_to(target).with_suffix("") if target.is_dir() else p.stem) for p in paths]
    twice = [f for f, n in Counter(folders).items() if n > 1]
    if twice:
        names = [p.name for p, f in zip(paths, folders) if f == twice[0]]
        raise ConfigError(f"targets {' and '.join(names)} would share the output folder {twice[0]}; rename one")
    return folders


def _lpips_for(args: argparse.Namespace, device) -> tuple:
    """(the LPIPS module, or None for the weight-free fallback; a line saying which distance is used)."""
    from pathlib import Path

    from stylenat.errors import MissingFileError
    from stylenat.metrics.lpips import LIN_NAME, VGG_NAME, load_lpips, lpips_available

    if args.distance == "pyramid":
        return None, "distance: laplacian-pyramid (--distance pyramid)"
    named = args.lpips_vgg or args.lpips_lin  # naming a weights file asks for LPIPS: no quiet fallback then
    if args.distance == "lpips" or named or lpips_available(args.lpips_vgg, args.lpips_lin):
        try:
            return load_lpips(args.lpips_vgg, args.lpips_lin, device=device), "distance: lpips-vgg16"
        except MissingFileError as exc:
            # One file named and present: the error is about the other one, so name it first.
            files = [("--lpips-vgg", args.lpips_vgg, f"the VGG16 weights ({VGG_NAME})"),
                     ("--lpips-lin", args.lpips_lin, f"its lin weights ({LIN_NAME})")]
            for (flag, given, _), (other, other_given, what) in (files, files[::-1]):
                if given and not other_given and Path(given).is_file():
                    raise MissingFileError(f"{flag} is given, but LPIPS's second file, {what}, is missing "
                                           f"(pass it with {other} PATH). {exc}") from None
            raise
    return None, ("distance: laplacian-pyramid, the fallback: no LPIPS weights found (--distance lpips "
                  "says where to get and put them)")


def _cmd_project(args: argparse.Namespace) -> int:
    import time

    from stylenat._system import Progress
    from stylenat.projection import load_target, project, resolve_label, save_projection, target_files, w_stats
    from stylenat.sampling import check_video_path

    if args.video:
        check_video_path(f"optimization.{args.video}")  # fail before optimising, not after
    g = _load_generator(args)
    label = resolve_label(g, args.cls)  # a missing or unknown class fails before any image is read
    paths = target_files(args.target)
    targets = [load_target(path, g.resolution) for path in paths]  # a bad file fails now, not hours in
    folders = _projection_folders(paths, args.target, args.out)
    lpips, line = _lpips_for(args, g.w_avg.device)  # loaded once for all targets
    print(line if label is None else f"{line}; class {label} ({g.config.classes[label]})")
    stats = w_stats(g, label=label)  # the start point: 10,000 mapping passes, the same for every target
    record_every = max(1, args.steps // PROJECT_VIDEO_FRAMES) if args.video else 0
    for path, target, folder in zip(paths, targets, folders):
        progress, start = Progress(f"project {path.name}", args.steps), time.monotonic()

        def show(step: int, steps: int, loss: dict) -> None:
            progress.update(step, f" steps, loss {loss['total']:.4f}, {time.monotonic() - start:.0f} s")

        result = project(g, target, label=label, steps=args.steps, space=args.space, seed=args.seed, lpips=lpips,
                         distance="pyramid" if lpips is None else "lpips", stats=stats, record_every=record_every,
                         callback=show)
        seconds = time.monotonic() - start
        save_projection(result, folder, g, args.video, info={"target": str(path), "seed": args.seed, "seconds": seconds})
        curve = result.losses["total"]
        print(f"{path}: loss {curve[0]:.4f} -> {curve[-1]:.4f}, PSNR {result.psnr:.2f} dB "
              f"({result.distance}, {args.space}, {seconds:.1f} s) -> {folder}")
    return 0


def _cmd_directions(args: argparse.Namespace) -> int:
    from stylenat.editing import save_directions, sefa_directions

    g = _load_generator(args)
    layers = parse_ints(args.layers, "--layers") if args.layers else None
    directions, values = sefa_directions(g, layers)
    save_directions(args.out, directions, values, g, layers)
    print(f"wrote {args.out}: {len(values)} SeFa directions of ws {args.layers or f'0-{g.num_ws - 1}'}; "
          "top eigenvalues (share of the sum):")
    for i, value in enumerate(values[:args.top].tolist()):
        print(f"  {i:>3}  {value:10.4f}  ({100 * value / float(values.sum()):4.1f}%)")
    return 0


def _cmd_edit(args: argparse.Namespace) -> int:
    from stylenat.data.images import save_image_grid
    from stylenat.editing import load_directions, render_edits, sefa_directions
    from stylenat.sampling import as_ws

    _check_seed_options(args, args.seeds is not None)
    g = _load_generator(args)
    ws = as_ws(g, _seeds_or_latents(g, args.seeds, args.latents, "--seeds"), args.trunc, labels=args.cls)
    strengths = _float_list(args.strengths, "--strengths")
    layers = parse_ints(args.layers, "--layers") if args.layers else None
    if args.directions:
        directions, _, file_layers = load_directions(args.directions, g)
        layers = file_layers if layers is None else layers  # directions act on the ws they were found for
    else:
        directions, _ = sefa_directions(g, layers)
    if not 0 <= args.direction < len(directions):
        raise ConfigError(f"--direction {args.direction}: there are {len(directions)} directions (0-{len(directions) - 1})")
    images = render_edits(g, ws, directions[args.direction], strengths, layers, args.batch)  # [N, T, 3, S, S]
    save_image_grid(images.flatten(0, 1), args.out, tuple(images.shape[:2]))
    print(f"wrote {args.out} ({len(ws)} rows; columns: strengths {args.strengths} along direction {args.direction})")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import torch

    from stylenat.metrics.throughput import benchmark
    from stylenat.models import PRESETS, build_generator, default_device
    from stylenat.models.compiled import keep_freed_memory

    fast = args.mode == "fast"
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.model in PRESETS and not Path(args.model).exists():
        g = build_generator(args.model).to(default_device(args.device))  # random weights time the same
    else:
        g = _load_generator(args)
    cuda = next(g.parameters()).device.type == "cuda"
    # The fast mode: bf16 autocast and TF32 on CUDA; on the CPU float32, and freed memory kept for reuse.
    dtype = args.dtype or ("bfloat16" if fast and cuda else "float32")
    if fast and cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    kept = keep_freed_memory() if fast and not cuda else False
    batches = parse_ints(args.batch, "--batch") if args.batch else None
    report = {"model": args.model, **benchmark(g, batches, args.warmup, args.iters, getattr(torch, dtype),
                                               mode=args.mode, compile_mode=args.compile_mode)}
    if report["compile"] is not None:
        report["compile"]["keep_freed_memory"] = kept
    print(f"{report['device_name']} ({report['device']}), {report['mode']} mode, {report['dtype']}, "
          f"{report['parameters']:,} parameters, {report['gflops_per_image']:.4g} GFLOP/image")
    if report["compile"] is not None:
        c = report["compile"]
        print(f"compiled: inductor, mode {c['mode']}, freeze {c['freeze']}, setup {c['setup_s']:.1f} s; compile time "
              + ", ".join(f"batch {r['batch']} {r['compile_s']:.1f} s" for r in report["results"]))
    print(f"{'batch':>5} {'img/s':>9} {'ms/img':>9} {'peak MiB':>9} {'TFLOP/s':>8} {'of peak':>8}")
    for r in report["results"]:
        frac = "-" if r["peak_fraction"] is None else f"{100 * r['peak_fraction']:.1f}%"
        print(f"{r['batch']:>5} {r['img_per_s']:>9.2f} {r['ms_per_img']:>9.2f} {r['peak_memory_bytes'] / 2**20:>9.0f} "
              f"{r['achieved_tflops']:>8.3g} {frac:>8}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _cmd_attention(args: argparse.Namespace) -> int:
    from stylenat.attention_maps import attention_maps, render_attention_maps
    from stylenat.data.images import save_image_grid

    pixel = parse_ints(args.pixel, "--pixel")
    if len(pixel) != 2:
        raise UserError(f"--pixel takes Y,X, got {args.pixel!r}")
    resolutions = parse_ints(args.resolutions, "--resolutions") if args.resolutions else None
    image, maps = attention_maps(_load_generator(args), args.seed, tuple(pixel), resolutions, args.trunc, args.cls)
    cells, grid = render_attention_maps(image, maps, tuple(pixel), args.cell)
    save_image_grid(cells, args.out, grid)
    print(f"wrote {args.out} ({grid[0]} rows: resolution x block; columns: image, then head groups)")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from stylenat.app import require_app_extra

    require_app_extra()  # before loading the model: fail in a second, not after it
    from stylenat.app.server import serve

    serve(_load_generator(args), host=args.host, port=args.port)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stylenat", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_LazyParser)

    p = sub.add_parser("info", help="print the version, the device and the usable attention backends")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("prepare", help="turn a folder or zip of images into an RGB PNG dataset of one size")
    p.add_argument("src", help="folder (searched recursively) or zip of images")
    p.add_argument("dst", help="output folder, or a zip file if it ends in .zip; must not exist")
    p.add_argument("--size", required=True, metavar="N|WxH",
                   help="output size: N (a square) or WIDTHxHEIGHT, e.g. 256 or 512x384")
    p.add_argument("--filter", default="lanczos", choices=["lanczos", "box", "bicubic"], help="resampling filter")
    p.add_argument("--crop", default="center", choices=["center", "none"],
                   help="center: cut the largest centred region of the output's aspect; none: fit the whole image "
                        "inside and pad it (a letterbox)")
    p.add_argument("--fill", default="black", metavar="COLOUR",
                   help="padding colour of --crop none: a name (black, white, gray, ...) or #rrggbb (default black)")
    p.add_argument("--labels", metavar="folders|none|FILE.csv",
                   help="class labels: folders (one class per first-level folder, named after it), a CSV file with "
                        "columns path,label (labels are class names), or none; default: StyleGAN's dataset.json in SRC "
                        "when there is one (integer labels are class indices)")
    p.add_argument("--workers", type=int, default=1, help="decoding processes (default 1)")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("train", help="train a generator (or --resume a run directory)",
                       description="Train StyleNAT. Unset options come from the preset's TrainConfig; every "
                                   "option named after a field sets that field (docs/training.md has the table).",
                       epilog="SIGTERM, SIGINT (Ctrl-C) or SIGUSR1 stop the run after the current step with a "
                              "checkpoint and exit status 75 (a second signal stops at once); --resume continues it. "
                              "Exit status 3: stopped on a non-finite loss; 2: a user error.",
                       add_arguments=_add_train_arguments)
    p.set_defaults(func=_cmd_train)

    def measure_args(p):
        """The two image sets and how they are read: shared by fid and metrics."""
        p.add_argument("first", metavar="MODEL_OR_FOLDER", help="a model (its g_ema): model file, run directory, registered name "
                                                                 "or hf://OWNER/REPO; or an image folder/zip")
        p.add_argument("real", metavar="REAL_FOLDER_OR_ZIP", help="real images: folder or zip (raw or prepared), or demo")
        p.add_argument("--inception", metavar="PATH", help="pt_inception-2015-12-05-6726825d.pth (default: $STYLENAT_INCEPTION, then the cache dir)")
        p.add_argument("--resolution", type=_size_flag, metavar="N|WxH",
                       help="size both sets are read at (default: the model's; needed for two image sets); a model's "
                            "images at another size are Lanczos-resized to it")
        p.add_argument("--batch", type=int, default=32, help="images per forward (default 32)")
        p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
        p.add_argument("--workers", type=int, default=0, help="image-decoding processes (default 0: in the main process)")

    p = sub.add_parser("fid", help="FID (and KID) of a model or an image set against a real image set",
                       description="FID with the TF-ported Inception (pt_inception-2015-12-05). Real-set "
                                   "statistics are cached in $STYLENAT_CACHE (default ~/.cache/stylenat).")
    measure_args(p)
    p.add_argument("--num", type=int, default=50000, help="generated images, or images taken from the first set (default 50000)")
    p.add_argument("--kid", action="store_true", help="also compute KID (100 subsets of 1000)")
    p.set_defaults(func=_cmd_fid)

    p = sub.add_parser("metrics", help="FID, KID, precision/recall and SWD of a model or an image set against real images",
                       description="Metrics by name: fid, kid, pr (precision/recall, k=3), swd (sliced Wasserstein "
                                   "distance of Laplacian-pyramid patches, x1e3; needs no weights file), each with an "
                                   "optional image count, e.g. fid50k, swd2k. fid, kid and pr need the Inception "
                                   "weights (--inception).")
    measure_args(p)
    p.add_argument("--metrics", default="fid", help="comma-separated names, e.g. fid,kid,pr,swd (default fid)")
    p.add_argument("--num", type=int, help="images of the first set for every metric (default: each name's count; "
                                            "fid/kid/pr 50000, swd 10000)")
    p.add_argument("--per-class", action="store_true", help="also every metric per class of the labelled real data "
                                                            "(a conditional model's images of that class against them)")
    p.add_argument("--out", default="metrics.json", help="JSON file of the results (default metrics.json)")
    p.set_defaults(func=_cmd_metrics)

    p = sub.add_parser("convert-official", help="convert an official StyleNAT checkpoint (.pt) to a stylenat model file")
    p.add_argument("checkpoint", metavar="CKPT", help="official checkpoint {'g', 'd', 'g_ema', 'args'}")
    p.add_argument("out", metavar="OUT", help="output .safetensors model file")
    p.add_argument("--preset", help="configuration by preset name: ffhq256, ffhq1024, church256")
    p.add_argument("--meta", metavar="META.json", help="configuration in official terms (size, generator_channels, heads, kernels, dilations, ...)")
    p.set_defaults(func=_cmd_convert_official)


    def model_args(p, what="model file, run directory, export-hub folder, registered name (e.g. ffhq256) or hf://OWNER/REPO"):
        p.add_argument("model", metavar="MODEL", help=f"{what} (its g_ema), or an official .pt with --preset/--meta")
        p.add_argument("--preset", help="official checkpoints: the preset they were trained with (ffhq256, ...)")
        p.add_argument("--meta", metavar="META.json", help="official checkpoints: configuration in official terms")
        p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when present)")

    def class_arg(p):
        p.add_argument("--class", dest="cls", metavar="N|NAME", help="class-conditional models: the class (index or name)")

    def sampling_args(p, batch_help="images per forward pass (default 16)"):
        p.add_argument("--trunc", type=float, default=1.0, help="truncation psi: 1 none (default), 0 the mean image "
                                                                "(of the class, for a conditional model)")
        p.add_argument("--batch", type=int, default=16, help=batch_help)
        class_arg(p)

    p = sub.add_parser("generate", help="images from seeds: one PNG per seed and/or a grid")
    model_args(p, "model file, run directory, export-hub folder, registered name (e.g. ffhq256), hf://OWNER/REPO, "
                  "or an exported .onnx/.pt2")
    p.add_argument("--seeds", required=True, help="seeds, e.g. 0-63, 1,5,9 or 0-3,10")
    p.add_argument("--grid", metavar="ROWSxCOLS", help="also write grid.png, e.g. 8x8")
    p.add_argument("--no-images", action="store_true", help="write only the grid")
    p.add_argument("--classes", action="store_true", help="class-conditional models: a grid.png with one row per class "
                                                          "(columns: the seeds), and seed<N>-<class>.png files; "
                                                          "every class, so not with --class")
    p.add_argument("--out", required=True, help="output folder (seed0000.png, ..., grid.png)")
    p.add_argument("--compile", action="store_true", help="run the generator compiled (torch.compile, inductor): "
                                                          "faster passes after a slow first one per batch size")
    sampling_args(p, "images per forward pass (default 16; 4 for an exported file: onnxruntime holds nearly four "
                     "times PyTorch's memory per image)")
    p.set_defaults(func=_cmd_generate, batch=None)

    p = sub.add_parser("mix", help="style-mixing grid: rows' latents with some ws indices from the columns")
    model_args(p)
    rows = p.add_mutually_exclusive_group(required=True)
    rows.add_argument("--rows", help="row seeds (their images form column 0)")
    rows.add_argument("--row-latents", metavar="FILES", help="rows from latent files instead (comma-separated, e.g. from project)")
    cols = p.add_mutually_exclusive_group(required=True)
    cols.add_argument("--cols", help="column seeds (their images form row 0)")
    cols.add_argument("--col-latents", metavar="FILES", help="columns from latent files instead (comma-separated)")
    p.add_argument("--layers", required=True, help="ws indices taken from the column seed, e.g. 0-3 (coarse) or 8-13 (fine)")
    p.add_argument("--out", required=True, help="output PNG")
    sampling_args(p)
    p.set_defaults(func=_cmd_mix)

    p = sub.add_parser("video", help="interpolation video through the seeds' latents (.gif, or .mp4 with stylenat[video])")
    model_args(p)
    keys = p.add_mutually_exclusive_group(required=True)
    keys.add_argument("--seeds", help="key-frame seeds in order, e.g. 0-5")
    keys.add_argument("--latents", metavar="FILES", help="key frames from latent files instead (comma-separated; "
                                                         "w+ latents interpolate per ws index; --space w)")
    p.add_argument("--frames", type=int, default=30, help="frames from one seed to the next (default 30)")
    p.add_argument("--loop", action=argparse.BooleanOptionalAction, default=True, help="return to the first seed (default on)")
    p.add_argument("--space", choices=["w", "z"], default="w", help="w: linear in w (default); z: spherical in z")
    p.add_argument("--fps", type=float, default=30, help="frames per second (default 30)")
    p.add_argument("--out", required=True, help="output .gif or .mp4")
    sampling_args(p)
    p.set_defaults(func=_cmd_video)

    p = sub.add_parser("project", help="find the latent of real images (GAN inversion): latent file, image, "
                                        "side-by-side, loss curve",
                       description="StyleGAN2's projector: Adam on a latent from the mean w, a perceptual distance "
                                   "plus pixel MSE. Writes OUT/<target name>/: latent.safetensors, projected.png, "
                                   "side_by_side.png (target | projection), losses.json[, optimization.gif|mp4].")
    model_args(p)
    p.add_argument("target", metavar="TARGET", help="an image, or a folder of images (searched recursively); "
                                                     "cropped and resized to the model like `stylenat prepare`")
    p.add_argument("--out", default="projections", help="output folder, one subfolder per target (default projections)")
    p.add_argument("--steps", type=int, default=1000, help="optimisation steps per target (default 1000)")
    p.add_argument("--space", choices=["w", "w+"], default="w+", help="w: one latent for every layer; w+: one per ws index (default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the latent noise (default 0)")
    p.add_argument("--distance", choices=["auto", "lpips", "pyramid"], default="auto",
                   help="auto (default): LPIPS VGG16 when its weights are found, else the weight-free laplacian pyramid")
    p.add_argument("--lpips-vgg", metavar="PATH", help="vgg16-397923af.pth (default: $STYLENAT_LPIPS_VGG, the cache dir, torch hub)")
    p.add_argument("--lpips-lin", metavar="PATH", help="LPIPS v0.1 VGG lin weights (default: $STYLENAT_LPIPS, the cache dir)")
    p.add_argument("--video", choices=["gif", "mp4"], help="also write the optimisation beside the target as a video "
                                                          "(mp4 needs stylenat[video])")
    p.add_argument("--class", dest="cls", metavar="N|NAME", help="class-conditional models (required for them): the "
                                                                 "targets' class (index or name); the projection starts "
                                                                 "from that class's mean w")
    p.set_defaults(func=_cmd_project)

    p = sub.add_parser("directions", help="SeFa latent directions (closed form, from the style weights) into a file")
    model_args(p)
    p.add_argument("--layers", help="ws indices whose style weights are factorised, e.g. 0-3 (default all)")
    p.add_argument("--top", type=int, default=10, help="eigenvalues printed (default 10)")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.set_defaults(func=_cmd_directions)

    p = sub.add_parser("edit", help="edit grid: seeds or latent files (rows) moved along a SeFa direction by each strength (columns)")
    model_args(p)
    sources = p.add_mutually_exclusive_group(required=True)
    sources.add_argument("--seeds", help="row seeds, e.g. 0-3")
    sources.add_argument("--latents", "--latent", metavar="FILES", help="rows from latent files instead (comma-separated)")
    p.add_argument("--direction", type=int, default=0, help="direction index, by eigenvalue (default 0: the largest)")
    p.add_argument("--strengths", default="-3,-1.5,0,1.5,3",
                   help="steps along the direction in w units (default -3,-1.5,0,1.5,3)")
    p.add_argument("--layers", help="ws indices to move, e.g. 0-3 (default: the --directions file's, else all); "
                                    "without --directions, SeFa of these")
    p.add_argument("--directions", metavar="FILE", help="directions from `stylenat directions` (default: SeFa computed here)")
    p.add_argument("--out", required=True, help="output PNG")
    sampling_args(p)
    p.set_defaults(func=_cmd_edit)

    p = sub.add_parser("bench", help="generator throughput (img/s), memory and FLOP utilisation",
                       description="The paper's protocol: g_ema, 10 warm-up and 500 timed passes with CUDA events "
                                   "(CPU default: 3 and 10, wall clock), at batch 1 and a large batch.")
    model_args(p, "preset name (random weights: they time the same), model file, run directory, registered name "
                  "or hf://OWNER/REPO")
    p.add_argument("--batch", help="batch sizes (default 1,32 on CUDA, 1,8 on CPU)")
    p.add_argument("--warmup", type=int, help="untimed passes (default 10 on CUDA, 3 on CPU)")
    p.add_argument("--iters", type=int, help="timed passes (default 500 on CUDA, 10 on CPU)")
    p.add_argument("--mode", choices=["paper", "fast"], default="paper",
                   help="paper (default): the model as it is, eager; fast: compiled with torch.compile (inductor), "
                        "on CUDA with CUDA graphs, bf16 autocast and TF32, on the CPU in float32 with frozen weights "
                        "and freed memory kept for reuse; the compile time is reported apart from the timed passes")
    p.add_argument("--compile-mode", choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                   help="torch.compile mode of --mode fast (default: reduce-overhead on CUDA, default on the CPU)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"],
                   help="float32, or bfloat16 autocast (default float32; bfloat16 in the fast mode on CUDA)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls on CUDA (the paper's fp32/TF32 setting)")
    p.add_argument("--out", metavar="JSON", help="also write the results as JSON")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("attention", help="attention weights of every head group at one pixel, as heat maps")
    model_args(p)
    p.add_argument("--seed", type=int, default=0, help="the image's seed (default 0)")
    p.add_argument("--pixel", required=True, metavar="Y,X", help="query pixel in output-image coordinates")
    p.add_argument("--resolutions", help="stages to show, e.g. 16,32 (default all)")
    p.add_argument("--trunc", type=float, default=1.0, help="truncation psi (default 1: none)")
    class_arg(p)
    p.add_argument("--cell", type=int, default=128, help="longer side of each heat-map cell in pixels; cells keep the image's aspect (default 128)")
    p.add_argument("--out", default="attention.png", help="output PNG (default attention.png)")
    p.set_defaults(func=_cmd_attention)

    p = sub.add_parser("serve", help="latent explorer in the browser: sample, mix, interpolate, edit, project, attention",
                       description='A local web app on the model (needs: pip install "stylenat[app]"); works offline.')
    model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="TCP port (default 7860; 0: any free port)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("models", help="the registry of released models: name, size, claimed FID, cached or not",
                       description="Built-in entries, then those of the JSON file $STYLENAT_REGISTRY names, then "
                                   "stylenat.registry.register() calls.")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("download", help="download, check and cache released models by name (done on first use anyway)",
                       description="Into $STYLENAT_CACHE/models (default ~/.cache/stylenat/models), resumable; "
                                   "$STYLENAT_MIRROR replaces the hosts; $STYLENAT_OFFLINE=1 forbids downloads.")
    p.add_argument("names", nargs="+", metavar="NAME", help="registered model names (see `stylenat models`)")
    p.add_argument("--force", action="store_true", help="download again even when cached")
    p.set_defaults(func=_cmd_download)

    p = sub.add_parser("export-hub", help="write a Hugging Face Hub-style folder: config.json, model.safetensors, README.md")
    model_args(p)
    p.add_argument("dir", metavar="DIR", help="output folder")
    p.add_argument("--modules", help="modules stored, e.g. g_ema or g_ema,d (default: g_ema and d when present)")
    p.add_argument("--license", help="licence identifier of the model card (default: the registry's, else other)")
    p.add_argument("--dataset", help="what the model was trained on, for the model card")
    p.add_argument("--metrics", metavar="JSON", help="metrics for the model card: the file `stylenat metrics --out` wrote")
    p.add_argument("--description", help="one paragraph for the model card")
    p.set_defaults(func=_cmd_export_hub)

    p = sub.add_parser("push-hub", help="upload an export-hub folder to the Hugging Face Hub (needs stylenat[hub] and a token)")
    p.add_argument("dir", metavar="DIR", help="folder written by export-hub (checked before upload)")
    p.add_argument("repo", metavar="OWNER/REPO", help="Hub model repository (created when missing)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--revision", help="branch to commit to (default main)")
    p.add_argument("--message", help="commit message")
    p.set_defaults(func=_cmd_push_hub)

    p = sub.add_parser("export", help="export the generator to ONNX or torch.export, checked against PyTorch",
                       description="The whole sampling path in one graph: z, psi (and labels) -> uint8 images, or "
                                   "ws -> images with --input w; batch dynamic. ONNX needs: pip install "
                                   '"stylenat[onnx]". `stylenat generate FILE.onnx` samples the result.')
    model_args(p)
    p.add_argument("--format", choices=["onnx", "torch-export"], default="onnx",
                   help="onnx (default; onnxruntime, TensorRT, web) or torch-export (a .pt2 program for torch.export.load)")
    p.add_argument("--out", help="output file (default: MODEL's name with .onnx or .pt2)")
    p.add_argument("--input", choices=["z", "w"], default="z",
                   help="z (default): inputs z, psi (truncation, a scalar) and labels for conditional models; "
                        "w: input ws [batch, num_ws, style_dim], for projected or edited latents")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument("--check-seeds", default="0-2", help="seeds of the check against PyTorch, each at psi 1 and 0.7 "
                                                        "(default 0-2)")
    p.add_argument("--no-check", action="store_true", help="skip the check (not recommended)")
    p.set_defaults(func=_cmd_export)

    return parser


# Options whose value is a list of numbers that may start with a minus, e.g. --strengths -3,-1.5,0,1.5,3.
NUMBER_LIST_OPTIONS = ("--strengths",)


def attach_number_lists(argv: list[str]) -> list[str]:
    """``argv`` with "--strengths -3,0,3" joined into "--strengths=-3,0,3".

    argparse takes any value that starts with "-" (other than a single negative number) for an
    option and fails with "expected one argument"; the "=" form is always read as the value. A
    value counts when it starts with "-" and a digit or ".": no option looks like that. Tokens
    after "--" are left alone.
    """
    import re

    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--":
            return out + argv[i:]
        value = argv[i + 1] if i + 1 < len(argv) else ""
        if token in NUMBER_LIST_OPTIONS and re.match(r"-\.?\d", value):
            out.append(f"{token}={value}")
            i += 2
        else:
            out.append(token)
            i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(attach_number_lists(list(sys.argv[1:] if argv is None else argv)))
    debug = os.environ.get("STYLENAT_DEBUG", "") not in ("", "0")
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        if debug:
            raise
        print(f"stylenat {args.command}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"stylenat {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
