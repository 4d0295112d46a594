"""Metrics: Inception features, FID, KID, precision/recall, SWD, LPIPS, and a registry of named metrics."""

from stylenat.metrics.distances import frechet_distance, kernel_inception_distance
from stylenat.metrics.features import dataset_features, generator_features
from stylenat.metrics.inception import load_inception
from stylenat.metrics.registry import METRICS, calc_metric, evaluate, measure, parse_metric

__all__ = ["METRICS", "calc_metric", "dataset_features", "evaluate", "frechet_distance", "generator_features",
           "kernel_inception_distance", "load_inception", "measure", "parse_metric"]
