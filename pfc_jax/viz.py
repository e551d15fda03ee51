"""Pictures of explanations: coalition maps, saliency heat maps, side-by-side panels, PNG files.

Everything here works on one image with NumPy and returns `uint8` RGB arrays.

Example:
  >>> rgb = panel(image01, explanation.labels[0], explanation.saliency[0], "tench 0.95")
  >>> save_png("tench.png", rgb)
"""

from __future__ import annotations

import os

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pfc_jax import io

# 20 distinct colours (matplotlib's tab20); label i gets colour i modulo 20.
PALETTE = np.round(np.asarray(matplotlib.colormaps["tab20"].colors) * 255).astype(np.uint8)
_GAP = 4  # Pixels of white between the pictures of a panel.
_TITLE_HEIGHT = 16


def _check_map(values, name: str, shape: tuple[int, int] | None = None) -> np.ndarray:
  values = np.asarray(values)
  if values.ndim != 2:
    raise ValueError(f"`{name}` must have shape [H, W], got {values.shape}.")
  if shape is not None and values.shape != shape:
    raise ValueError(f"`{name}` must have the image's shape {shape}, got {values.shape}.")
  return values


def _check_image(image01) -> np.ndarray:
  image01 = np.asarray(image01, np.float32)
  if image01.ndim != 3 or image01.shape[-1] != 3:
    raise ValueError(f"`image01` must have shape [H, W, 3], got {image01.shape}.")
  return image01


def _to_uint8(image01: np.ndarray) -> np.ndarray:
  return np.round(np.clip(image01, 0.0, 1.0) * 255).astype(np.uint8)


def coalition_map(labels) -> np.ndarray:
  """Colours coalition labels with `PALETTE`.

  Args:
    labels: `[H, W]` non-negative integer labels.

  Returns:
    `[H, W, 3] uint8` RGB.
  """
  labels = _check_map(labels, "labels")
  if not np.issubdtype(labels.dtype, np.integer) or (labels.size and labels.min() < 0):
    raise ValueError(f"`labels` must be non-negative integers, got dtype {labels.dtype}.")
  return PALETTE[labels % len(PALETTE)]


def heatmap(saliency, cmap: str = "jet") -> np.ndarray:
  """Min-max normalises `saliency [H, W]` and colours it with a matplotlib colormap.

  Returns:
    `[H, W, 3] uint8` RGB; a constant map comes out as the colormap's lowest colour.
  """
  saliency = _check_map(saliency, "saliency").astype(np.float64)
  low, high = saliency.min(), saliency.max()
  normalised = (saliency - low) / (high - low) if high > low else np.zeros_like(saliency)
  return _to_uint8(matplotlib.colormaps[cmap](normalised)[..., :3])


def overlay(image01, saliency, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
  """The saliency heat map blended over the image.

  Args:
    image01: `[H, W, 3]` float RGB in [0, 1].
    saliency: `[H, W]` saliency of any scale, same size as the image.
    alpha: Weight of the heat map, in [0, 1].
    cmap: Matplotlib colormap name.

  Returns:
    `[H, W, 3] uint8` RGB.
  """
  image01 = _check_image(image01)
  saliency = _check_map(saliency, "saliency", image01.shape[:2])
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"`alpha` must lie in [0, 1], got {alpha}.")
  colours = heatmap(saliency, cmap).astype(np.float32) / 255
  return _to_uint8((1 - alpha) * image01 + alpha * colours)


def panel(image01, labels, saliency, title: str = "", min_side: int = 160) -> np.ndarray:
  """Image | coalitions | saliency heat map over the image, side by side under a title strip.

  Args:
    image01: `[H, W, 3]` float RGB in [0, 1].
    labels: `[H, W]` integer coalition labels.
    saliency: `[H, W]` saliency (min-max normalised for display).
    title: One line drawn above the pictures, e.g. the class name and probability.
    min_side: Pictures whose short side is below this are enlarged by the smallest integer
      factor f that reaches it (nearest neighbour, so pixels stay visible). 1 keeps the size.

  Returns:
    `[16 + f H, 3 f W + 8, 3] uint8` RGB on a white background.
  """
  image01 = _check_image(image01)
  labels = _check_map(labels, "labels", image01.shape[:2])
  factor = max(1, -(-min_side // min(image01.shape[:2])))
  enlarge = lambda a: np.repeat(np.repeat(a, factor, axis=0), factor, axis=1)
  tiles = [enlarge(t) for t in
           (_to_uint8(image01), coalition_map(labels), overlay(image01, saliency))]
  gap = np.full((tiles[0].shape[0], _GAP, 3), 255, np.uint8)
  pictures = np.concatenate([tiles[0], gap, tiles[1], gap, tiles[2]], axis=1)
  strip = Image.new("RGB", (pictures.shape[1], _TITLE_HEIGHT), "white")
  ImageDraw.Draw(strip).text((2, 2), title, fill="black", font=ImageFont.load_default())
  return np.concatenate([np.asarray(strip), pictures], axis=0)


def save_png(path: str | os.PathLike, rgb) -> None:
  """Writes `rgb [H, W, 3] uint8` to `path` as PNG, atomically."""
  rgb = np.asarray(rgb)
  if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
    raise ValueError(f"`rgb` must be [H, W, 3] uint8, got shape {rgb.shape} and dtype {rgb.dtype}.")
  with io.atomic_path(path) as tmp:
    Image.fromarray(rgb).save(tmp, format="PNG")
