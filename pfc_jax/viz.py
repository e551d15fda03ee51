"""Pictures of explanations: coalition maps, saliency heat maps, side-by-side panels, PNG files.

Everything here works on one image with NumPy and returns `uint8` RGB arrays, which
`save_png` writes and `matplotlib.pyplot.imshow` shows as they are.

Colour maps:

- Coalitions: `PALETTE`, matplotlib's 20 "tab20" colours; coalition i gets colour i modulo 20, so
  colours repeat only past 20 coalitions (the coalition network's default `num_channels` is 20).
  The colours name coalitions and have no order.
- Saliency: matplotlib's "jet" (`SALIENCY_CMAP`) over the map min-max normalised per image: dark
  blue is the image's least salient pixel (where the classifier tolerated the most
  perturbation), then cyan, green, yellow and dark red for its most salient one. `panel` draws the colour bar, labelled
  with the map's own values at both ends and in the middle. Jet is the usual choice in saliency
  figures, so panels can be compared by eye with published ones; its lightness does not grow
  with the value, so pass `cmap="viridis"` (or any matplotlib name) where that matters.

Example:
  >>> rgb = panel(image01, explanation.labels[0], explanation.saliency[0], "tench  p = 0.95")
  >>> save_png("tench.png", rgb)
"""

from __future__ import annotations

import functools
import math
import os

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pfc_jax import io
from pfc_jax._inputs import check_image

# 20 distinct colours (matplotlib's tab20); label i gets colour i modulo 20.
PALETTE = np.round(np.asarray(matplotlib.colormaps["tab20"].colors) * 255).astype(np.uint8)
SALIENCY_CMAP = "jet"
PANEL_MIN_SIDE = 224  # Pictures of a panel are enlarged to at least this many pixels a side.

# Panel layout, in pixels.
_GAP = 4  # White between the pictures of a panel.
_TITLE_HEIGHT, _TITLE_FONT = 24, 16
_CAPTION_HEIGHT, _CAPTION_FONT = 20, 13
_BAR_GAP, _BAR_WIDTH, _TICK = 8, 14, 3  # Colour bar: gap before it, its width, its ticks.


@functools.cache
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
  """Pillow's default scalable font, `size` px high."""
  return ImageFont.load_default(size=size)


def _check_map(values, name: str, shape: tuple[int, int] | None = None) -> np.ndarray:
  values = np.asarray(values)
  if values.ndim != 2:
    raise ValueError(f"`{name}` must have shape [H, W], got {values.shape}.")
  if shape is not None and values.shape != shape:
    raise ValueError(f"`{name}` must have the image's shape {shape}, got {values.shape}.")
  return values


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


def heatmap(saliency, cmap: str = SALIENCY_CMAP) -> np.ndarray:
  """Min-max normalises `saliency [H, W]` and colours it with a matplotlib colormap.

  Returns:
    `[H, W, 3] uint8` RGB; a constant map comes out as the colormap's lowest colour.
  """
  saliency = _check_map(saliency, "saliency").astype(np.float64)
  low, high = saliency.min(), saliency.max()
  normalised = (saliency - low) / (high - low) if high > low else np.zeros_like(saliency)
  return _to_uint8(matplotlib.colormaps[cmap](normalised)[..., :3])


def overlay(image01, saliency, alpha: float = 0.5, cmap: str = SALIENCY_CMAP) -> np.ndarray:
  """The saliency heat map blended over the image.

  Args:
    image01: `[H, W, 3]` float RGB in [0, 1].
    saliency: `[H, W]` saliency of any scale, same size as the image.
    alpha: Weight of the heat map, in [0, 1].
    cmap: Matplotlib colormap name.

  Returns:
    `[H, W, 3] uint8` RGB.

  Raises:
    ValueError: for an image that is not float RGB `[H, W, 3]` in [0, 1] (as every function
      taking images checks: a 0-255 or uint8 image would otherwise draw white), a saliency map
      of another size, or `alpha` outside [0, 1].
  """
  image01 = check_image(image01)
  saliency = _check_map(saliency, "saliency", image01.shape[:2])
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"`alpha` must lie in [0, 1], got {alpha}.")
  colours = heatmap(saliency, cmap).astype(np.float32) / 255
  return _to_uint8((1 - alpha) * image01 + alpha * colours)


def colour_bar(low: float, high: float, height: int, cmap: str = SALIENCY_CMAP) -> np.ndarray:
  """A vertical colour bar from `high` (top) to `low` (bottom), labelled at the ends and middle.

  Args:
    low: Value of the colormap's lowest colour (the saliency map's minimum).
    high: Value of its highest colour (the map's maximum).
    height: Height in pixels, at least 2.
    cmap: Matplotlib colormap name.

  Returns:
    `[height, 14 + L, 3] uint8` RGB: the bar, then its labels on white, L pixels wide to fit
    them.
  """
  if height < 2:
    raise ValueError(f"`height` must be at least 2, got {height}.")
  fractions = np.linspace(1.0, 0.0, height)  # Top row: the highest colour.
  column = _to_uint8(matplotlib.colormaps[cmap](fractions)[:, :3])
  bar = np.repeat(column[:, None], _BAR_WIDTH, axis=1)
  texts, font = tick_labels(low, high), _font(_CAPTION_FONT)
  width = _TICK + 2 + max(math.ceil(font.getlength(text)) for text in texts) + 2
  labels = Image.new("RGB", (width, height), "white")
  draw = ImageDraw.Draw(labels)
  for text, y, anchor in zip(texts, (0, height // 2, height - 1), ("lt", "lm", "lb")):
    draw.line([(0, y), (_TICK, y)], fill="black")
    draw.text((_TICK + 2, y), text, fill="black", font=font, anchor=anchor)
  return np.concatenate([bar, np.asarray(labels)], axis=1)


def tick_labels(low: float, high: float) -> list[str]:
  """Labels of `high`, the midpoint and `low`, with the fewest decimals (at least 1, at most 6)
  that tell apart values `(high - low) / 10` apart, so a narrow range does not read as one value.
  """
  span = high - low
  decimals = 2 if span <= 0 else int(np.clip(np.ceil(-np.log10(span)) + 1, 1, 6))
  return [f"{value:.{decimals}f}" for value in (high, (low + high) / 2, low)]


def _text_strip(width: int, height: int, texts: list[tuple[int, str]], size: int) -> np.ndarray:
  """A white `[height, width, 3] uint8` strip with each `(x, text)` written from x."""
  strip = Image.new("RGB", (width, height), "white")
  draw = ImageDraw.Draw(strip)
  for x, text in texts:
    draw.text((x + 2, height // 2), text, fill="black", font=_font(size), anchor="lm")
  return np.asarray(strip)


def panel(image01, labels, saliency, title: str = "", min_side: int = PANEL_MIN_SIDE,
          cmap: str = SALIENCY_CMAP) -> np.ndarray:
  """Image | coalitions | saliency over the image, with a colour bar, captions and a title.

  The captions above the pictures read "image", "N coalitions" (the distinct labels in
  `labels`) and "saliency"; the colour bar at the right is labelled with the saliency map's
  minimum, midpoint and maximum (the overlay min-max normalises the map, see the module
  docstring).

  Args:
    image01: `[H, W, 3]` float RGB in [0, 1].
    labels: `[H, W]` integer coalition labels.
    saliency: `[H, W]` saliency of any scale.
    title: One line drawn above everything, e.g. the class name and its probability.
    min_side: Pictures whose short side is below this are enlarged by the smallest integer
      factor f that reaches it (nearest neighbour, so pixels stay visible). 1 keeps the size.
      Default 224.
    cmap: Matplotlib colormap of the saliency overlay and its colour bar.

  Returns:
    `[24 + 20 + f H, 3 f W + 8 + 8 + 14 + L, 3] uint8` RGB on a white background, L the width
    of the colour bar's labels.

  Raises:
    ValueError: for an image that is not float RGB `[H, W, 3]` in [0, 1], or maps of another
      size.
  """
  image01 = check_image(image01)
  labels = _check_map(labels, "labels", image01.shape[:2])
  saliency = _check_map(saliency, "saliency", image01.shape[:2])
  factor = max(1, -(-min_side // min(image01.shape[:2])))
  enlarge = lambda a: np.repeat(np.repeat(a, factor, axis=0), factor, axis=1)
  tiles = [enlarge(t) for t in (_to_uint8(image01), coalition_map(labels),
                                overlay(image01, saliency, cmap=cmap))]
  height, width = tiles[0].shape[:2]
  gap = np.full((height, _GAP, 3), 255, np.uint8)
  bar_gap = np.full((height, _BAR_GAP, 3), 255, np.uint8)
  bar = colour_bar(float(np.min(saliency)), float(np.max(saliency)), height, cmap)
  pictures = np.concatenate([tiles[0], gap, tiles[1], gap, tiles[2], bar_gap, bar], axis=1)
  num_coalitions = np.unique(labels).size
  captions = _text_strip(pictures.shape[1], _CAPTION_HEIGHT, [
      (0, "image"), (width + _GAP, f"{num_coalitions} coalition" + "s" * (num_coalitions != 1)),
      (2 * (width + _GAP), "saliency (higher = more relevant)")], _CAPTION_FONT)
  title_strip = _text_strip(pictures.shape[1], _TITLE_HEIGHT, [(0, title)], _TITLE_FONT)
  return np.concatenate([title_strip, captions, pictures], axis=0)


def save_png(path: str | os.PathLike, rgb) -> None:
  """Writes `rgb [H, W, 3] uint8` to `path` as PNG, atomically."""
  rgb = np.asarray(rgb)
  if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
    raise ValueError(f"`rgb` must be [H, W, 3] uint8, got shape {rgb.shape} and dtype {rgb.dtype}.")
  with io.atomic_path(path) as tmp:
    Image.fromarray(rgb).save(tmp, format="PNG")
