"""How much a shapes classifier's decision rests on the class object: remove it and reclassify.

  python scripts/object_removal.py --model shapes_vit --num-images 32

On held-out shapes (`--benchmark-seed 1`), each image's class object (its known mask) is
filled in from its surroundings by ROAD's linear imputation (`metrics.linear_imputation`, Rong
et al. 2022), so that neither a hole nor a blurred copy of the shape is left. Per true class it
prints the mean probability of the clean prediction before and after the removal, and the
share of the object-free images still given that prediction: where that share is high the
classifier does not need the object to name the class, and a faithful map need not point at
it, whatever the pointing game says.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from pfc_jax import metrics, models, weights
from pfc_jax.benchmarks import shapes


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--model", required=True, choices=tuple(weights.PACKAGED))
  parser.add_argument("--num-images", type=int, default=32)
  parser.add_argument("--benchmark-seed", type=int, default=1)
  args = parser.parse_args()
  bench = shapes.generate(args.num_images, models.input_size(args.model), args.benchmark_seed)
  classifier = models.classifier(args.model, weights.load(args.model))
  removed = np.stack([np.asarray(metrics.linear_imputation(image, mask))
                      for image, mask in zip(bench.images, bench.masks)])
  probabilities = jax.jit(lambda x: jax.nn.softmax(classifier.logits(x), axis=-1))
  clean, without = (np.asarray(probabilities(jnp.asarray(x))) for x in (bench.images, removed))
  predicted = clean.argmax(axis=-1)
  rows = np.arange(len(predicted))
  print(f"{args.model}, {args.num_images} held-out shapes (seed {args.benchmark_seed}), class "
        "object removed by linear imputation\n")
  print("| class | images | p(prediction), clean | p(prediction), object removed | "
        "same prediction without the object |\n|---|---:|---:|---:|---:|")
  for label, name in [*enumerate(shapes.CLASS_NAMES), (None, "all")]:
    chosen = rows if label is None else rows[bench.labels == label]
    kept = without[chosen].argmax(axis=-1) == predicted[chosen]
    print(f"| {name} | {len(chosen)} | {clean[chosen, predicted[chosen]].mean():.3f} | "
          f"{without[chosen, predicted[chosen]].mean():.3f} | {kept.mean():.2f} |")


if __name__ == "__main__":
  main()
