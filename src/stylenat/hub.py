"""Hugging Face Hub-style model folders: written by ``stylenat export-hub``, read by ``stylenat.load``,
fetched as ``hf://OWNER/REPO[@REV]`` and uploaded by ``stylenat push-hub`` (these two need the
optional extra ``stylenat[hub]``: huggingface_hub).

A folder holds what the Hub and its users expect::

    config.json         {"format": "stylenat-hub/1", "library_name": "stylenat", "resolution" (an int for a
                         square, else [height, width] as in GeneratorConfig), "num_classes",
                         "classes", "generator": GeneratorConfig, "discriminator": DiscriminatorConfig | null,
                         "modules", "parameters", "files": {"model.safetensors": {"sha256", "size"}}, ...}
    model.safetensors   a stylenat model file (self-describing; see stylenat.models.io)
    README.md           the model card: YAML front matter (license, library_name, pipeline_tag, tags) and the
                        configuration, parameter counts, training data and metrics when known

Reading a folder checks ``model.safetensors`` against the sha256 in ``config.json``, and that both
describe the same generator. The Hub client does not hash what it downloads, so ``hf://`` models are
rechecked the same way, and against the Hub's LFS sha256 (the name the Hub cache gives the file).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from stylenat._download import offline
from stylenat._system import atomic_path, file_sha256, package_version
from stylenat.errors import ConfigError, DownloadError, MissingFileError, ModelFileError, UserError, first_line
from stylenat.models.config import size_text
from stylenat.models.io import MODEL_FILE, read_model_file, save_model
from stylenat.registry import get_entry, is_registered

__all__ = ["HUB_FORMAT", "CONFIG_FILE", "CARD_FILE", "export_hub", "is_hub_dir", "check_hub_dir", "hf_model_file",
           "push_hub", "parse_hf"]

HUB_FORMAT = "stylenat-hub/1"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
HUB_EXTRA = 'pip install "stylenat[hub]"'
_HF = re.compile(r"^hf://([A-Za-z0-9][\w.-]*/[\w.-]+)(?:@([^\s@]+))?$")


def _param_counts(modules: dict) -> dict[str, int]:
    counts = {}
    for name, module in modules.items():
        counts[name] = sum(p.numel() for p in module.parameters())
        if name == "g_ema":
            counts["mapping"] = sum(p.numel() for p in module.mapping.parameters())
            counts["synthesis"] = sum(p.numel() for p in module.synthesis.parameters())
    return counts


def export_hub(source, out_dir: str | os.PathLike, modules: tuple[str, ...] | None = None, *, preset: str | None = None,
               meta: dict | None = None, license: str | None = None, dataset: str | None = None,
               metrics: dict[str, float] | None = None, description: str | None = None) -> Path:
    """Write a Hub-style folder of model ``source`` (anything a MODEL argument accepts) into ``out_dir``.

    Args:
        source: a run directory, model file, official .pt (with ``preset``/``meta``), registry name, ...
        out_dir: the folder (created; files in it of the same names are replaced).
        modules: modules stored (default: "g_ema" and, when present, "d", the two that sampling and
            fine-tuning need).
        license: the model card's licence identifier (default: the registry entry's, else "other").
        dataset, metrics, description: for the model card (default: the registry entry's, when known).
    Returns the folder.
    """
    from stylenat.models.loading import resolve_models  # lazy: the loader imports this module

    entry = get_entry(source) if isinstance(source, str) and is_registered(source) and not Path(source).exists() else None
    loaded = resolve_models(source, preset, meta, None, device="cpu")
    wanted = list(modules) if modules else [n for n in ("g_ema", "d") if n in loaded]
    missing = [n for n in wanted if n not in loaded]
    if missing:
        raise ModelFileError(f"{source} holds {sorted(loaded)}, not {missing[0]!r}")
    kept = {n: loaded[n] for n in wanted}
    generators = [m for n, m in kept.items() if n.startswith("g")]
    if not generators:
        raise ConfigError(f"--modules {','.join(wanted)}: a Hub folder needs a generator (g_ema or g) besides any d")
    g = kept.get("g_ema") or generators[0]
    d = kept.get("d")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_path = save_model(out / MODEL_FILE, kept, g.config, None if d is None else d.config,
                            extra={"exported_from": str(source), "stylenat": package_version()})
    if entry is not None:
        license = license or entry.license
        dataset = dataset or entry.dataset
        description = description or entry.description
        if metrics is None and entry.fid is not None:
            metrics = {"fid50k (claimed by the authors)": entry.fid}
    config = {
        "format": HUB_FORMAT, "library_name": "stylenat", "stylenat_version": package_version(),
        "resolution": g.resolution, "num_classes": g.config.num_classes, "classes": list(g.config.classes),
        "generator": g.config.to_dict(), "discriminator": None if d is None else d.config.to_dict(),
        "modules": wanted, "parameters": _param_counts(kept),
        "files": {MODEL_FILE: {"sha256": file_sha256(model_path), "size": model_path.stat().st_size}},
        "license": license or "other", "dataset": dataset, "metrics": metrics or {},
    }
    if entry is not None:
        config["source"] = {"registry": entry.name, "url": entry.urls[0], "license_note": entry.license_note}
    with atomic_path(out / CONFIG_FILE) as tmp:
        Path(tmp).write_text(json.dumps(config, indent=2) + "\n")
    with atomic_path(out / CARD_FILE) as tmp:
        Path(tmp).write_text(_model_card(config, description, out.resolve().name))
    return out


def _model_card(config: dict, description: str | None, name: str) -> str:
    g = config["generator"]
    tags = ["stylenat", "gan", "image-generation", "neighborhood-attention",
            "class-conditional" if config["num_classes"] else "unconditional-image-generation"]
    front = ["---", f"license: {config['license']}", "library_name: stylenat"]
    if not config["num_classes"]:  # the Hub has no task for class-conditional image generation
        front.append("pipeline_tag: unconditional-image-generation")
    front += ["tags:"] + [f"- {t}" for t in tags] + ["---"]
    counts = config["parameters"]
    size = size_text(config["resolution"])  # WIDTHxHEIGHT: "256x256", "512x384"
    lines = front + ["", f"# {name}", "",
                     description or f"A StyleNAT generator ({size}).", "",
                     "StyleNAT (arXiv 2211.05770) is a style-based GAN whose generator is a transformer of Hydra "
                     "neighborhood attention. This folder was written by "
                     f"[stylenat](https://pypi.org/project/stylenat/) {config['stylenat_version']}.", "",
                     "## Use", "", "```bash", 'pip install "stylenat[hub]"',
                     f"stylenat generate hf://OWNER/{name} --seeds 0-7 --out samples/", "```", "",
                     "```python", "import torch", "import stylenat", "", f'g = stylenat.load("hf://OWNER/{name}")  # or a local copy of this folder',
                     "images = g(torch.randn(4, g.config.style_dim))", "```", "",
                     "## Model", "", "| | |", "|---|---|", f"| resolution | {size} |",
                     f"| classes | {', '.join(config['classes']) if config['classes'] else 'none (unconditional)'} |",
                     f"| style (z, w) size | {g['style_dim']} |", f"| mapping layers | {g['n_mlp']} |",
                     f"| channels per stage | {', '.join(map(str, g['channels']))} |",
                     f"| heads per stage | {', '.join(map(str, g['heads']))} |",
                     f"| kernels per stage | {'; '.join(','.join(map(str, k)) for k in g['kernels'])} |",
                     f"| dilations per stage | {'; '.join(','.join(map(str, k)) for k in g['dilations'])} |",
                     f"| modules | {', '.join(config['modules'])} |", ""]
    lines += ["## Parameters", "", "| module | parameters |", "|---|---:|"]
    lines += [f"| {k} | {v:,} |" for k, v in counts.items()] + [""]
    lines += ["## Training data", "", config["dataset"] or "Not stated.", ""]
    lines += ["## Metrics", ""]
    lines += (["| metric | value |", "|---|---:|"] + [f"| {k} | {v:.4g} |" for k, v in config["metrics"].items()]
              if config["metrics"] else ["None recorded."])
    note = (config.get("source") or {}).get("license_note")
    lines += ["", "## Licence", "", f"`{config['license']}`" + (f": {note}." if note else "."), ""]
    return "\n".join(lines)


def is_hub_dir(path: Path) -> bool:
    """Whether ``path`` is a folder written by :func:`export_hub` (its config.json says so)."""
    try:
        return path.is_dir() and json.loads((path / CONFIG_FILE).read_text()).get("format") == HUB_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_hub_dir(path: str | os.PathLike, etag: str | None = None) -> Path:
    """The model file of a Hub-style folder, after checking it against config.json (and a Hub LFS
    sha256 ``etag``); ModelFileError naming the difference otherwise."""
    path = Path(path)
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
        recorded = config["files"][MODEL_FILE]["sha256"]
        if not isinstance(recorded, str) or not re.fullmatch(r"[0-9a-f]{64}", recorded):
            raise ValueError(f"the sha256 of {MODEL_FILE} is {recorded!r}, not 64 hex digits")
    except FileNotFoundError:
        raise MissingFileError(f"{path} has no {CONFIG_FILE}; is it a folder written by `stylenat export-hub`?") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelFileError(f"{path / CONFIG_FILE} is damaged or not a stylenat model card ({first_line(exc)})") from None
    model = path / MODEL_FILE
    if not model.is_file():
        raise MissingFileError(f"{path} has no {MODEL_FILE}")
    digest = file_sha256(model)
    for want, what in ((recorded, CONFIG_FILE), (etag, "the Hub")):
        if want is not None and digest != want:
            raise ModelFileError(f"{model} has sha256 {digest[:16]}..., {what} says {want[:16]}...: the file is damaged "
                                 "or was changed after export")
    meta, _ = read_model_file(model)
    if meta["g_config"] != config.get("generator"):
        raise ModelFileError(f"{path}: {CONFIG_FILE} and {MODEL_FILE} describe different generators")
    return model


def parse_hf(spec: str) -> tuple[str, str | None]:
    """("OWNER/REPO", revision or None) of ``hf://OWNER/REPO[@REV]``."""
    match = _HF.match(spec)
    if not match:
        raise ConfigError(f"{spec!r}: a Hub model is written hf://OWNER/REPO or hf://OWNER/REPO@REVISION")
    return match.group(1), match.group(2)


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        raise UserError(f"hf:// models need huggingface_hub: {HUB_EXTRA}") from None
    return huggingface_hub


def _hub_error(exc: Exception, what: str) -> UserError:
    return DownloadError(f"{what}: {type(exc).__name__}: {first_line(exc)}")


def hf_model_file(spec: str) -> Path:
    """The checked model file of ``hf://OWNER/REPO[@REV]``, downloaded into the Hub cache on first use
    (``$HF_ENDPOINT``, ``$HF_TOKEN`` and ``$HF_HOME`` as the Hub client reads them; offline: cache only)."""
    repo, revision = parse_hf(spec)
    hub = _hub()
    endpoint = os.environ.get("HF_ENDPOINT") or None
    local_only = offline()
    paths = {}
    for name in (CONFIG_FILE, MODEL_FILE):
        try:
            paths[name] = Path(hub.hf_hub_download(repo, name, revision=revision, endpoint=endpoint,
                                                   local_files_only=local_only))
        except Exception as exc:  # the Hub client's errors: not found, offline and not cached, HTTP, network
            if local_only and type(exc).__name__ == "LocalEntryNotFoundError":
                raise DownloadError(f"{spec}: {name} is not in the Hugging Face cache and downloads are off "
                                    "($STYLENAT_OFFLINE/$HF_HUB_OFFLINE); run once online, or copy the folder and "
                                    "load it by path") from None
            raise _hub_error(exc, f"{spec}: cannot get {name}") from None
    # The Hub cache names each file's blob after its ETag, which for LFS files is their sha256.
    blob = paths[MODEL_FILE].resolve().name
    etag = blob if re.fullmatch(r"[0-9a-f]{64}", blob) else None
    if paths[CONFIG_FILE].parent != paths[MODEL_FILE].parent:
        raise ModelFileError(f"{spec}: the Hub cache put {CONFIG_FILE} and {MODEL_FILE} in different folders")
    return check_hub_dir(paths[MODEL_FILE].parent, etag)


def push_hub(folder: str | os.PathLike, repo: str, *, private: bool = False, revision: str | None = None,
             message: str | None = None) -> str:
    """Upload a folder written by :func:`export_hub` to Hub repository ``repo`` (created when missing);
    the commit's URL. The folder is checked first, so a damaged one is never published."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFileError(f"{folder} is not a folder (expected one written by `stylenat export-hub`)")
    check_hub_dir(folder)
    if not (folder / CARD_FILE).is_file():
        raise MissingFileError(f"{folder} has no {CARD_FILE} model card; write the folder with `stylenat export-hub`")
    parse_hf(f"hf://{repo}")
    hub = _hub()
    api = hub.HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)
    try:
        api.create_repo(repo, private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo, folder_path=str(folder), revision=revision,
                                 commit_message=message or f"Upload StyleNAT model (stylenat {package_version()})",
                                 allow_patterns=[CONFIG_FILE, MODEL_FILE, CARD_FILE])
    except Exception as exc:  # authentication, permissions, network: the Hub client's own errors
        raise _hub_error(exc, f"cannot upload {folder} to {repo}") from None
    return str(getattr(info, "commit_url", info))
