"""StyleNAT: a style-based GAN whose generator is built from Hydra neighborhood attention."""

__version__ = "0.1.0"

__all__ = ["__version__", "load", "project"]


def load(path, which: str = "g_ema", device="cpu"):
    """Module ``which`` ("g_ema", "g" or "d") of a stylenat model, in eval mode on ``device``.

    ``path`` is a model file, a checkpoint directory or a training run directory (its newest
    checkpoint). Official ``.pt`` checkpoints need their configuration:
    ``stylenat.models.resolve_model(path, preset=...)``.
    """
    from stylenat.models.io import load_model  # lazy: `import stylenat` stays free of torch

    return load_model(path, which=which, device=device)


def __getattr__(name: str):
    """``stylenat.project``: :func:`stylenat.projection.project`, imported on first use (PEP 562)."""
    if name == "project":
        from stylenat.projection import project  # lazy, as in load(): `import stylenat` stays free of torch

        return project
    raise AttributeError(f"module 'stylenat' has no attribute {name!r}")
