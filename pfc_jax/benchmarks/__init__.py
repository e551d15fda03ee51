"""Benchmarks with known ground truth for measuring saliency faithfulness."""

from pfc_jax.benchmarks import shapes
from pfc_jax.benchmarks.shapes import CLASS_NAMES, ShapesData, generate

__all__ = ["CLASS_NAMES", "ShapesData", "generate", "shapes"]
