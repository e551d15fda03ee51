"""What bfloat16 compute changes: coalitions and saliency against float32, next to the seed floor.

Explains the first `--count` tuning photos (rows 0-124 of the shared set are for tuning) three
times with SqueezeNet 1.1: float32 with seed 0, float32 with seed 1 (the floor: PFC is not
deterministic across seeds) and `precision="bfloat16"` (both stages) with seed 0. Prints, per
pair against float32 seed 0, the mean adjusted Rand index of the coalitions (Hubert and Arabie,
1985), the mean Spearman rank correlation of the saliency maps (Spearman, 1904), and the mean
absolute difference of Average Drop per photo (Grad-CAM++, eq. 20; in percentage points), and
the seconds per photo of each run. bfloat16 is as good as float32 when its agreement with
float32 is at the seed floor.

Example (CPU, a few minutes):
  python scripts/precision_agreement.py --count 4 --size 64 --preset fast
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import time

import jax
import numpy as np
from scipy import stats

from pfc_jax import metrics, models, parallel, weights
from pfc_jax.evaluation import PRESETS, preset_config
from pfc_jax.explain import ExplainConfig, explain
from coalition_agreement import adjusted_rand_index, load_photos


def _with_precision(config: ExplainConfig, precision: str) -> ExplainConfig:
  return ExplainConfig(dataclasses.replace(config.coalitions, precision=precision),
                       dataclasses.replace(config.perturb, precision=precision))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--photos", type=pathlib.Path,
                      default=pathlib.Path("../shared/evaldata/imagenet-sample"))
  parser.add_argument("--weights", default="../shared/evaldata/squeezenet1_1.safetensors",
                      help="SqueezeNet 1.1 weights file.")
  parser.add_argument("--size", type=int, default=64, help="photo side in pixels")
  parser.add_argument("--count", type=int, default=4, help="number of photos")
  parser.add_argument("--preset", default="fast", choices=PRESETS)
  args = parser.parse_args()

  classifier = models.classifier("squeezenet1_1", weights.load("squeezenet1_1", source=args.weights))
  photos = load_photos(args.photos, args.count, args.size)
  config = preset_config(args.preset)
  print(f"{jax.default_backend()} ({jax.devices()[0].device_kind}): {len(photos)} photos at "
        f"{args.size} px, preset {args.preset}")

  def run(precision, seed):
    start = time.perf_counter()
    result = jax.device_get(explain(classifier, photos, parallel.image_keys(seed, range(len(photos))),
                                    _with_precision(config, precision)))
    drop = 100 * np.asarray(metrics.average_drop(classifier, photos, result.saliency,
                                                 result.target))
    return result, drop, (time.perf_counter() - start) / len(photos)

  reference, reference_drop, seconds = run("float32", 0)
  print(f"{'run':24s} {'ARI':>6s} {'Spearman':>8s} {'|dAD| pp':>8s} {'same target':>11s} "
        f"{'s/photo':>8s}")
  print(f"{'float32, seed 0 (ref.)':24s} {1.0:6.3f} {1.0:8.3f} {0.0:8.2f} {1.0:11.2f} "
        f"{seconds:8.1f}  (AD {reference_drop.mean():.1f}%)")
  for name, precision, seed in (("float32, seed 1 (floor)", "float32", 1),
                                ("bfloat16, seed 0", "bfloat16", 0)):
    result, drop, seconds = run(precision, seed)
    ari = np.mean([adjusted_rand_index(a, b) for a, b in zip(result.labels, reference.labels)])
    rho = np.mean([stats.spearmanr(a.ravel(), b.ravel())[0]
                   for a, b in zip(result.saliency, reference.saliency)])
    print(f"{name:24s} {ari:6.3f} {rho:8.3f} {np.abs(drop - reference_drop).mean():8.2f} "
          f"{np.mean(result.target == reference.target):11.2f} {seconds:8.1f}  "
          f"(AD {drop.mean():.1f}%)", flush=True)


if __name__ == "__main__":
  main()
