"""Datasets (prepared or raw folder/zip, built-in demo faces), the dataset tool and image grids."""

from stylenat.data.dataset import ImageDataset, dataset_classes, native_resolution, open_dataset
from stylenat.data.demo import draw_face
from stylenat.data.images import save_image_grid
from stylenat.data.prepare import PrepareReport, prepare_dataset

__all__ = ["ImageDataset", "dataset_classes", "native_resolution", "PrepareReport", "draw_face", "open_dataset", "prepare_dataset", "save_image_grid"]
