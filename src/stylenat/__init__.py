"""StyleNAT: a style-based GAN whose generator is built from Hydra neighborhood attention."""

__version__ = "0.1.0"

__all__ = ["__version__"]
