"""StyleNAT: a style-based GAN whose generator is built from Hydra neighborhood attention."""

__version__ = "0.1.0"

__all__ = ["__version__", "load"]


def load(path, which: str = "g_ema", device="cpu"):
    """Module ``which`` ("g_ema", "g" or "d") of a stylenat model file, in eval mode on ``device``.

    ``path`` may also be a training run directory (its latest checkpoint) or a checkpoint directory.
    """
    from stylenat.models.io import load_model  # lazy: `import stylenat` stays free of torch
    from stylenat.train.checkpoint import model_file_in

    return load_model(model_file_in(path), which=which, device=device)
