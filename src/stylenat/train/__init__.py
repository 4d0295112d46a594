"""Training: the recipe (TrainConfig), the loop, checkpoints and distributed set-up."""

from stylenat.train.config import TRAIN_PRESETS, TrainConfig, get_train_preset
from stylenat.train.loop import NonFiniteError, TrainingStopped, resume, train

__all__ = ["TRAIN_PRESETS", "NonFiniteError", "TrainConfig", "TrainingStopped", "get_train_preset", "resume", "train"]
