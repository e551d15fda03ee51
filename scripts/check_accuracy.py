"""Top-1 / top-5 accuracy of a built-in ImageNet classifier on a folder of labelled photos.

Checks that a weights port plus `pfc_jax.data.load_image` reproduce the reference accuracy:

  python scripts/check_accuracy.py --model squeezenet1_1 \
    --weights ../shared/evaldata/squeezenet1_1.safetensors \
    --images ../shared/evaldata/imagenet-sample \
    --labels ../shared/evaldata/imagenet-sample/labels.csv

`--labels` is a CSV with columns `file` (relative to `--images`) and `class_index`.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import jax
import numpy as np

from pfc_jax import data, models, weights


def read_labels(path: Path) -> list[tuple[str, int]]:
  """`(file, class_index)` rows of a labels CSV."""
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    missing = {"file", "class_index"} - set(reader.fieldnames or ())
    if missing:
      raise ValueError(f"--labels {str(path)!r} lacks columns {sorted(missing)}.")
    return [(row["file"], int(row["class_index"])) for row in reader]


@jax.jit
def _logits(classifier, images01):
  return classifier.logits(images01)


def accuracy(classifier, images_dir: Path, labels: list[tuple[str, int]], size: int,
             batch_size: int) -> tuple[float, float]:
  """Top-1 and top-5 accuracy (fractions) of `classifier` on the labelled images."""
  top1 = top5 = 0
  for start in range(0, len(labels), batch_size):
    batch = labels[start:start + batch_size]
    images = np.stack([data.load_image(images_dir / file, size) for file, _ in batch])
    top = np.argsort(-np.asarray(_logits(classifier, images)), axis=-1)[:, :5]
    targets = np.array([index for _, index in batch])
    top1 += int(np.sum(top[:, 0] == targets))
    top5 += int(np.sum(np.any(top == targets[:, None], axis=-1)))
  return top1 / len(labels), top5 / len(labels)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="squeezenet1_1", choices=("vgg16", "squeezenet1_1"))
  parser.add_argument("--weights", default=None,
                      help="weights file or directory (default: the cached download)")
  parser.add_argument("--images", type=Path, required=True, help="folder of the photos")
  parser.add_argument("--labels", type=Path, required=True, help="CSV: file, class_index")
  parser.add_argument("--size", type=int, default=224, help="input side in pixels")
  parser.add_argument("--batch-size", type=int, default=25)
  args = parser.parse_args(argv)

  start = time.perf_counter()
  classifier = models.classifier(args.model, weights.load(args.model, args.weights))
  labels = read_labels(args.labels)
  top1, top5 = accuracy(classifier, args.images, labels, args.size, args.batch_size)
  print(f"{args.model}: {len(labels)} images, top-1 {100 * top1:.1f}%, top-5 {100 * top5:.1f}% "
        f"({time.perf_counter() - start:.0f} s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
