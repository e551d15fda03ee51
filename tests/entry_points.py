"""Every public entry point that runs a classifier on images, for the boundary checks of
`test_classifier.py` (the classifier's contract) and `test_inputs.py` (the images' range)."""

from typing import Any, Callable

import jax
import numpy as np

from pfc_jax import ExplainConfig, baselines, evaluation, explain, metrics, perturb

SIZE = 16  # Images [2, SIZE, SIZE, 3], as `test_baselines.colour_images` makes them.


def classifier_entry_points() -> dict[str, Callable[[Any, Any], Any]]:
  """`{name: fn(classifier, images)}` for `explain`, `perturb`, `evaluate`, every baseline and
  every metric that runs the classifier."""
  target, key = np.zeros(2, np.int32), jax.random.key(0)
  saliency = np.ones((2, SIZE, SIZE), np.float32)
  calls = {
      "explain": lambda c, x: explain(c, x, key, ExplainConfig.preset("tiny")),
      "perturb": lambda c, x: perturb(c, x, np.zeros((2, SIZE, SIZE), np.int32), key),
      "evaluate": lambda c, x: evaluation.evaluate(c, x, evaluation.EvaluationConfig(
          methods=("gradcam",), preset="tiny", curve_steps=2), progress=False),
  }
  calls.update({f"baselines.{name}": (lambda c, x, method=method: method(c, x, target, key))
                for name, method in baselines.METHODS.items()})
  for name in ("average_drop", "increase_in_confidence", "deletion_auc", "insertion_auc", "road"):
    calls[f"metrics.{name}"] = lambda c, x, fn=getattr(metrics, name): fn(c, x, saliency, target)
  return calls
