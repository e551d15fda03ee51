"""Seconds to score one photo's map under every evaluation protocol (metrics only, no method).

  python scripts/protocol_cost.py --weights ../shared/evaldata/squeezenet1_1.safetensors \
      --image ../shared/evaldata/imagenet-sample/n01440764_tench.JPEG

Scores a Grad-CAM map of the photo with each protocol of `pfc_jax.evaluation.PROTOCOLS` twice
and prints the second (compiled) time of each, and their sum.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from pfc_jax import baselines, data, evaluation, models, weights


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--weights", required=True, help="SqueezeNet 1.1 weights file.")
  parser.add_argument("--image", required=True, help="A photo.")
  args = parser.parse_args()
  classifier = models.classifier("squeezenet1_1", weights.load("squeezenet1_1", args.weights))
  images = data.load_image(args.image, models.input_size("squeezenet1_1"))[None]
  target = np.asarray(jax.numpy.argmax(classifier.logits(images), axis=-1), np.int32)
  saliency = baselines.gradcam(classifier, images, target)
  keys = jax.random.key(0)[None]
  config = evaluation.EvaluationConfig(methods=("gradcam",), protocols=tuple(evaluation.PROTOCOLS))
  total = 0.0
  for protocol in config.protocols:
    seconds = []
    for _ in range(2):
      start = time.perf_counter()
      jax.block_until_ready(evaluation.protocol_scores(
          protocol, classifier, images, saliency, target, keys, config))
      seconds.append(time.perf_counter() - start)
    total += seconds[1]
    print(f"{protocol:12s} {seconds[1]:6.2f} s  (first call, compiling: {seconds[0]:.1f} s)")
  print(f"{'all':12s} {total:6.2f} s")


if __name__ == "__main__":
  main()
