"""How strongly saliency maps carry a periodic grid (stride aliasing), from an evaluation's maps.

  python scripts/stride_grid.py /path/to/maps --period 4

`pfc-jax evaluate --maps DIR` keeps every method's maps as `DIR/<method>/maps-*.npz`. For each
map (min-max normalised), the rows are grouped by `row mod period` and the columns by
`col mod period`; the grid strength is the spread (max - min) of the group means, over the
map's mean, the larger of rows and columns. A map without a grid scores near 0; SqueezeNet 1.1's
stride-2 layers leave a period of 4 in per-pixel maps.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def grid_strength(saliency: np.ndarray, period: int) -> float:
  """Relative spread of the `period` phase means of one map `[H, W]`, rows or columns."""
  span = saliency.max() - saliency.min()
  normalised = (saliency - saliency.min()) / (span + np.finfo(np.float32).tiny)
  mean = normalised.mean() + np.finfo(np.float32).tiny
  spreads = []
  for axis in (0, 1):
    profile = normalised.mean(axis=1 - axis)
    phases = [profile[phase::period].mean() for phase in range(period)]
    spreads.append((max(phases) - min(phases)) / mean)
  return float(max(spreads))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("maps", help="A --maps folder of `pfc-jax evaluate`.")
  parser.add_argument("--period", type=int, default=4, help="Grid period in pixels.")
  args = parser.parse_args()
  print(f"| method | images | grid strength, period {args.period} (mean) |\n|---|---:|---:|")
  for folder in sorted(p for p in Path(args.maps).iterdir() if p.is_dir()):
    strengths = {}
    for file in sorted(folder.glob("maps-*.npz")):
      with np.load(file) as stored:
        for index, saliency in zip(stored["indices"], stored["maps"]):
          strengths[int(index)] = grid_strength(np.asarray(saliency, np.float64), args.period)
    if strengths:
      print(f"| {folder.name} | {len(strengths)} | {np.mean(list(strengths.values())):.3f} |")


if __name__ == "__main__":
  main()
