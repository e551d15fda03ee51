"""Agreement (adjusted Rand index) of the cheap coalition variants with the full variant.

Runs the full variant (the authors' code: every layer trained at full resolution) on the shared
photos, then each cheap variant, and prints the mean adjusted Rand index (Hubert and Arabie, 1985)
of each variant's labels with the full variant's, next to the ARI of the full variant with itself
under another seed (the noise floor: the method is not deterministic across seeds).

Example:
  python scripts/coalition_agreement.py --photos ../shared/evaldata/imagenet-sample \
      --size 64 --count 12 --max-steps 300
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import time

import jax
import numpy as np
from PIL import Image

import pfc_jax.coalitions as coalitions

Config = coalitions.CoalitionConfig
# Variant name -> its config at photo side `size`.
VARIANTS = {
    "full, other seed": lambda size: Config(),
    "frozen backbone": lambda size: Config(train_backbone=False),
    "frozen backbone, lr 0.1": lambda size: Config(train_backbone=False, learning_rate=0.1),
    "frozen backbone, half resolution": lambda size: Config.fast(resolution=size // 2),
    "frozen backbone, half res., lr 0.1": lambda size: Config.fast(
        resolution=size // 2, learning_rate=0.1),
    "half resolution": lambda size: Config(resolution=size // 2),
    "width 0.25": lambda size: Config(width=0.25),
}


def adjusted_rand_index(labels_a: np.ndarray, labels_b: np.ndarray) -> float:
  """Adjusted Rand index of two labelings of the same pixels (1: identical partitions).

  Args:
    labels_a: `[...]` non-negative integer labels.
    labels_b: `[...]` non-negative integer labels, same shape.

  Returns:
    The ARI, a float in [-1, 1]; 1.0 when both labelings are a single cluster.
  """
  a = np.asarray(labels_a).ravel()
  b = np.asarray(labels_b).ravel()
  table = np.zeros((a.max() + 1, b.max() + 1), np.int64)
  np.add.at(table, (a, b), 1)
  pairs = lambda counts: (counts * (counts - 1) // 2).sum()
  index = pairs(table)
  rows, cols, total = pairs(table.sum(1)), pairs(table.sum(0)), pairs(np.array([a.size]))
  expected = rows * cols / total
  maximum = (rows + cols) / 2
  if maximum == expected:
    return 1.0
  return float((index - expected) / (maximum - expected))


def load_photos(folder: pathlib.Path, count: int, size: int) -> np.ndarray:
  """The first `count` photos of `folder` (sorted by name), centre-cropped, `[N, size, size, 3]`."""
  files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
  if not files:
    raise ValueError(f"`--photos` {folder} holds no JPEG or PNG photos.")
  photos = []
  for path in files[:count]:
    image = Image.open(path).convert("RGB")
    short = min(image.size)
    left, top = (image.width - short) // 2, (image.height - short) // 2
    image = image.crop((left, top, left + short, top + short)).resize((size, size), Image.BILINEAR)
    photos.append(np.asarray(image, np.float32) / 255.0)
  return np.stack(photos)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--photos", type=pathlib.Path,
                      default=pathlib.Path("../shared/evaldata/imagenet-sample"))
  parser.add_argument("--size", type=int, default=64, help="photo side in pixels")
  parser.add_argument("--count", type=int, default=12, help="number of photos")
  parser.add_argument("--max-steps", type=int, default=300, help="max_steps of every variant")
  parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
  args = parser.parse_args()

  photos = load_photos(args.photos, args.count, args.size)
  print(f"{len(photos)} photos at {args.size} px, max_steps {args.max_steps}")

  def run(config, seed):
    config = dataclasses.replace(config, max_steps=args.max_steps)
    start = time.perf_counter()
    result = coalitions.extract_coalitions(photos, jax.random.key(seed), config)
    labels = np.asarray(result.labels)
    return result, (time.perf_counter() - start) / len(photos), labels

  full, seconds, full_labels = run(coalitions.CoalitionConfig(), seed=1)
  print(f"{'variant':34s} {'mean ARI':>8s} {'s/image':>8s} {'coalitions':>10s} {'steps':>6s}")
  print(f"{'full (reference)':34s} {1.0:8.3f} {seconds:8.2f} {np.mean(full.num):10.1f} "
        f"{np.mean(full.steps):6.0f}")
  for name in args.variants:
    result, seconds, labels = run(VARIANTS[name](args.size), seed=2)
    ari = np.mean([adjusted_rand_index(x, y) for x, y in zip(labels, full_labels)])
    print(f"{name:34s} {ari:8.3f} {seconds:8.2f} {np.mean(result.num):10.1f} "
          f"{np.mean(result.steps):6.0f}", flush=True)


if __name__ == "__main__":
  main()
