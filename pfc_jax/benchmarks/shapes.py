"""A synthetic ground-truth benchmark: one class object among class-neutral distractors.

Every image holds exactly one class object (a cross, ring, triangle or star) at a random place,
scale and rotation, plus one to three distractors (discs, ellipses, squares) that appear in every
class, on a textured background (smooth noise or stripes). Objects and distractors draw their
colours from one palette, independently of the class, so only the class object's shape tells the
classes apart: a faithful saliency map must point at it. Its pixel mask and box are returned.

Image `i` of `generate(num, size, seed)` depends only on `(seed, i)`, so any prefix of a larger
set is the smaller set, and the benchmark is reproducible from its seed alone.

Example:
  >>> data = generate(8, size=64, seed=0)
  >>> data.images.shape, data.labels.shape, data.masks.shape, data.boxes.shape
  ((8, 64, 64, 3), (8,), (8, 64, 64), (8, 4))
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

CLASS_NAMES = ("cross", "ring", "triangle", "star")
DISTRACTOR_KINDS = ("disc", "ellipse", "square")

# Saturated colours shared by class objects and distractors; backgrounds stay muted (see
# `_background`), so every object differs from the background by at least 0.15 in some channel.
PALETTE = np.array([
    [0.9, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.2, 0.9], [0.95, 0.9, 0.1],
    [0.85, 0.1, 0.85], [0.1, 0.85, 0.9], [0.98, 0.98, 0.98], [0.05, 0.05, 0.05],
], np.float32)

OBJECT_RADIUS = (0.12, 0.22)  # Class object's outer radius, as a fraction of the image size.
DISTRACTOR_RADIUS = (0.08, 0.16)  # Distractor radius, as a fraction of the image size.
NUM_DISTRACTORS = (1, 3)  # Inclusive range of distractors per image.
MIN_SIZE = 16


class ShapesData(NamedTuple):
  """A generated benchmark set.

  Attributes:
    images: `[N, size, size, 3] float32` RGB in [0, 1].
    labels: `[N] int32` class indices into `CLASS_NAMES`.
    masks: `[N, size, size] bool`, the class object's pixels.
    boxes: `[N, 4] int32` `(y0, x0, y1, x1)`, the mask's bounding box, end-exclusive.
  """

  images: np.ndarray
  labels: np.ndarray
  masks: np.ndarray
  boxes: np.ndarray


def _polygon_mask(ys: np.ndarray, xs: np.ndarray, vertices: np.ndarray) -> np.ndarray:
  """Even-odd rule point-in-polygon for pixel centres; `vertices [V, 2]` as (y, x)."""
  inside = np.zeros(np.broadcast_shapes(ys.shape, xs.shape), bool)
  for (y0, x0), (y1, x1) in zip(vertices, np.roll(vertices, -1, axis=0)):
    crosses = (y0 > ys) != (y1 > ys)
    with np.errstate(divide="ignore", invalid="ignore"):
      x_at_y = x0 + (ys - y0) * (x1 - x0) / (y1 - y0)
    inside ^= crosses & (xs < x_at_y)
  return inside


def _star_vertices(radii: np.ndarray, angle: float) -> np.ndarray:
  """Polar vertex list `[V, 2]` (y, x) around the origin, evenly spaced from `angle`."""
  phi = angle + 2 * np.pi * np.arange(len(radii)) / len(radii)
  return np.stack([radii * np.sin(phi), radii * np.cos(phi)], axis=1)


def _shape_mask(kind: str, ys: np.ndarray, xs: np.ndarray, radius: float, angle: float,
                aspect: float = 1.0) -> np.ndarray:
  """Pixels of shape `kind` centred at the origin of `(ys, xs)` (pixel-centre offsets)."""
  if kind == "disc":
    return ys**2 + xs**2 <= radius**2
  if kind == "ellipse":
    u = xs * np.cos(angle) + ys * np.sin(angle)
    v = -xs * np.sin(angle) + ys * np.cos(angle)
    return (u / radius)**2 + (v / (radius * aspect))**2 <= 1.0
  if kind == "ring":
    distance = np.sqrt(ys**2 + xs**2)
    return (distance <= radius) & (distance >= 0.55 * radius)
  if kind == "square":
    vertices = _star_vertices(np.full(4, radius), angle)
  elif kind == "triangle":
    vertices = _star_vertices(np.full(3, radius), angle)
  elif kind == "star":
    vertices = _star_vertices(np.tile([radius, 0.42 * radius], 5), angle)
  elif kind == "cross":
    arm = 0.32 * radius
    half = np.array([[arm, radius], [arm, arm], [radius, arm], [radius, -arm], [arm, -arm],
                     [arm, -radius]])  # (y, x); the outline is point-symmetric.
    outline = np.concatenate([half, -half])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    vertices = outline @ rotation.T
  else:
    raise ValueError(f"unknown shape kind {kind!r}")
  return _polygon_mask(ys, xs, vertices)


def _bilinear_matrix(coarse: int, size: int) -> np.ndarray:
  """`[size, coarse]` weights that resample `coarse` samples to `size` linearly."""
  t = np.linspace(0, coarse - 1, size)
  return np.maximum(0.0, 1.0 - np.abs(t[:, None] - np.arange(coarse)[None, :]))


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
  """A muted textured background `[size, size, 3]`: smooth colour noise or tinted stripes."""
  base = rng.uniform(0.35, 0.65) + rng.uniform(-0.08, 0.08, 3)
  if rng.random() < 0.5:
    coarse = int(rng.integers(3, 7))
    grid = rng.uniform(-0.12, 0.12, (coarse, coarse, 3))
    interp = _bilinear_matrix(coarse, size)
    texture = np.einsum("hk,klc,wl->hwc", interp, grid, interp)
  else:
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(4.0, 12.0)
    yy, xx = np.mgrid[:size, :size]
    wave = np.sin(2 * np.pi * (yy * np.sin(angle) + xx * np.cos(angle)) / period)
    texture = wave[..., None] * rng.uniform(-0.12, 0.12, 3)
  return np.clip(base + texture, 0.0, 1.0)


def _render_one(seed: int, index: int, size: int) -> tuple[np.ndarray, int, np.ndarray]:
  """Image `[size, size, 3]`, label and object mask `[size, size]` of image `index`."""
  rng = np.random.default_rng([seed, index])
  label = int(rng.integers(len(CLASS_NAMES)))
  image = _background(rng, size)
  centres = np.arange(size) + 0.5

  radius = rng.uniform(*OBJECT_RADIUS) * size
  cy, cx = rng.uniform(radius, size - radius, 2)
  placed = [(cy, cx, radius)]
  for _ in range(int(rng.integers(NUM_DISTRACTORS[0], NUM_DISTRACTORS[1] + 1))):
    kind = DISTRACTOR_KINDS[rng.integers(len(DISTRACTOR_KINDS))]
    d_radius = rng.uniform(*DISTRACTOR_RADIUS) * size
    angle, aspect = rng.uniform(0, np.pi), rng.uniform(0.45, 0.8)
    colour = rng.integers(len(PALETTE))
    for _ in range(20):  # Keep distractors clear of every object placed so far.
      dy, dx = rng.uniform(d_radius, size - d_radius, 2)
      if all(np.hypot(dy - y, dx - x) > d_radius + r + 1.0 for y, x, r in placed):
        mask = _shape_mask(kind, centres[:, None] - dy, centres[None, :] - dx, d_radius, angle,
                           aspect)
        image[mask] = PALETTE[colour]
        placed.append((dy, dx, d_radius))
        break

  mask = _shape_mask(CLASS_NAMES[label], centres[:, None] - cy, centres[None, :] - cx, radius,
                     rng.uniform(0, 2 * np.pi))
  image[mask] = PALETTE[rng.integers(len(PALETTE))]
  return image.astype(np.float32), label, mask


def _bounding_box(mask: np.ndarray) -> np.ndarray:
  """`(y0, x0, y1, x1)` end-exclusive box of a non-empty `[H, W]` mask."""
  rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
  return np.array([rows[0], cols[0], rows[-1] + 1, cols[-1] + 1], np.int32)


def generate(num: int, size: int = 64, seed: int = 0) -> ShapesData:
  """Generates `num` benchmark images; image `i` depends only on `(seed, i)`.

  Args:
    num: Number of images, >= 0.
    size: Image height and width in pixels, >= 16.
    seed: Non-negative integer seed. Training uses seed 0, evaluation other seeds (see
      `scripts/train_shapes.py`).

  Returns:
    A `ShapesData` with images `[num, size, size, 3] float32` in [0, 1], labels `[num] int32`,
    masks `[num, size, size] bool` and boxes `[num, 4] int32`.

  Raises:
    ValueError: if `num`, `size` or `seed` is out of range.
  """
  if int(num) != num or num < 0:
    raise ValueError(f"`num` must be a non-negative integer, got {num!r}.")
  if int(size) != size or size < MIN_SIZE:
    raise ValueError(f"`size` must be an integer >= {MIN_SIZE}, got {size!r}.")
  if int(seed) != seed or seed < 0:
    raise ValueError(f"`seed` must be a non-negative integer, got {seed!r}.")
  images = np.zeros((num, size, size, 3), np.float32)
  labels = np.zeros((num,), np.int32)
  masks = np.zeros((num, size, size), bool)
  for i in range(num):
    images[i], labels[i], masks[i] = _render_one(int(seed), i, int(size))
  boxes = np.stack([_bounding_box(m) for m in masks]) if num else np.zeros((0, 4), np.int32)
  return ShapesData(images, labels, masks, boxes)
