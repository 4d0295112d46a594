"""StyleNAT: a style-based GAN whose generator is built from Hydra neighborhood attention."""

__version__ = "0.1.0"

__all__ = ["__version__", "load", "project"]


def load(path, which: str = "g_ema", device="cpu", preset: str | None = None, meta=None):
    """Module ``which`` ("g_ema", "g" or "d") of a stylenat model, in eval mode on ``device``.

    ``path`` is a model file, a checkpoint directory, a training run directory (its newest
    checkpoint), a folder written by ``stylenat export-hub``, a registered name such as "ffhq256"
    (downloaded, checked and cached on first use; see ``stylenat.registry``) or
    ``hf://OWNER/REPO[@REV]`` (with ``stylenat[hub]``). Official ``.pt`` checkpoints need their
    configuration: ``preset`` (e.g. "ffhq256") or ``meta`` (official terms, a dict or JSON file).
    """
    from stylenat.models.loading import resolve_model  # lazy: `import stylenat` stays free of torch

    return resolve_model(path, preset=preset, meta=meta, which=which, device=device)


def __getattr__(name: str):
    """``stylenat.project``: :func:`stylenat.projection.project`, imported on first use (PEP 562)."""
    if name == "project":
        from stylenat.projection import project  # lazy, as in load(): `import stylenat` stays free of torch

        return project
    raise AttributeError(f"module 'stylenat' has no attribute {name!r}")
