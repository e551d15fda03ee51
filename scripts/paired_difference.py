"""Paired difference of two methods' per-image scores in an evaluation records file.

  python scripts/paired_difference.py docs/results/photos_fast_heldout.records.jsonl pfc pfc-coalition

For each metric, over the images both methods scored: the mean of A - B and its 95% percentile
bootstrap interval (images resampled with replacement, fixed seed). An interval that excludes 0
is a difference the images support; one that straddles 0 is not.

The records of `scripts/sweep.py` work too, with settings in place of methods, e.g. two tuning
objectives on the same photos:

  python scripts/paired_difference.py docs/results/tuning/photos_guided_logsoftmax3.records.jsonl \
      confidence_weight=3 max_w=5 --second-records docs/results/tuning/photos_lowres_hinge.records.jsonl

`--second-records` takes B from another records file of the same model, weights and images, e.g.
the "paper" preset against the "fast" one:

  python scripts/paired_difference.py docs/results/photos_paper_heldout.records.jsonl pfc pfc \
      --second-records docs/results/photos_fast_heldout.records.jsonl
"""

from __future__ import annotations

import argparse

import numpy as np

from pfc_jax import evaluation

METRICS = tuple(key for key, *_ in evaluation.COLUMNS if key != "seconds_per_image")
# Settings that choose the methods (`perturb`: a sweep's edits); every other setting (model, weights, data, seed, curve
# settings) must agree for two records files' scores to be paired.
METHOD_SETTINGS = ("preset", "vgg_weights", "perturb")


def paired_scores(path: str, first: str, second: str, second_path: str | None = None
                  ) -> tuple[list[int], dict[str, np.ndarray]]:
  """Indices both methods scored, and `{metric: [n, 2]}` of their scores on those of them where
  both have that metric (protocols computed on some images only, or not applicable, drop out).

  `first` comes from `path`, `second` from `second_path` (default `path`).
  """
  settings, records, _ = evaluation.read_records(path)
  second_records = records
  if second_path is not None:
    second_settings, second_records, _ = evaluation.read_records(second_path)
    differing = sorted(k for k in set(settings) | set(second_settings)
                       if k not in METHOD_SETTINGS and settings.get(k) != second_settings.get(k))
    if differing:
      raise SystemExit(f"{path} and {second_path} score different data: {differing} differ.")
  indices = sorted({i for m, i in records if m == first}
                   & {i for m, i in second_records if m == second})
  if not indices:
    raise SystemExit(f"{path}: no image has scores of both {first!r} and {second!r}.")
  pairs = {}
  for metric in METRICS:  # Over the images where both have a score (None: does not apply).
    values = [(records[(first, i)].get(metric), second_records[(second, i)].get(metric))
              for i in indices]
    values = [pair for pair in values if None not in pair]
    if values:
      pairs[metric] = np.array(values)
  return indices, pairs


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("records", help="A `pfc-jax evaluate` records file (.records.jsonl).")
  parser.add_argument("first", help="Method A.")
  parser.add_argument("second", help="Method B.")
  parser.add_argument("--second-records", help="Take method B from this records file instead.")
  parser.add_argument("--resamples", type=int, default=10000, help="Bootstrap resamples.")
  args = parser.parse_args()
  indices, scores = paired_scores(args.records, args.first, args.second, args.second_records)
  resample = lambda n: np.random.default_rng(0).integers(0, n, (args.resamples, n))
  draws = resample(len(indices))
  print(f"{len(indices)} images, {args.first} - {args.second} (95% bootstrap interval)")
  for metric, pair in scores.items():
    difference = pair[:, 0] - pair[:, 1]
    chosen = draws if len(difference) == len(indices) else resample(len(difference))
    low, high = np.percentile(difference[chosen].mean(axis=1), [2.5, 97.5])
    images = "" if len(difference) == len(indices) else f"  ({len(difference)} images)"
    print(f"  {metric:24s} {difference.mean():+.4f}  [{low:+.4f}, {high:+.4f}]{images}")


if __name__ == "__main__":
  main()
