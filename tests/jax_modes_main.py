"""Runs the core cases of the suite under JAX's global modes and saves every result.

Run in a fresh process, since the modes are set from the environment before JAX starts:

  JAX_ENABLE_X64=1 python tests/jax_modes_main.py OUT.npz
  JAX_DEBUG_NANS=1 python tests/jax_modes_main.py OUT.npz

Covers a "tiny" `explain`, every baseline (the "tiny" evaluation configs) and every metric,
ROAD and its imputation included, on two 16 px shapes images; the metrics score Grad-CAM's
maps. Fails unless every floating
result is float32 and finite (`jax_debug_nans` raises on a NaN computed anywhere inside).
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np

from pfc_jax import ExplainConfig, baselines, evaluation, explain, metrics, models, weights
from pfc_jax.benchmarks import shapes


def results() -> dict[str, jax.Array]:
  classifier = models.classifier("shapes_cnn", weights.load("shapes_cnn"))
  bench = shapes.generate(2, size=16, seed=1)
  images, masks, key = bench.images, bench.masks, jax.random.key(0)
  explanation = explain(classifier, images, key, ExplainConfig.preset("tiny"))
  target = jnp.argmax(classifier.logits(images), axis=-1).astype(jnp.int32)
  out = {f"explain/{name}": value for name, value in explanation._asdict().items()}
  for name, method in baselines.METHODS.items():
    if not baselines.applicable(name, classifier):  # Attention rollout: transformers only.
      continue
    out[name] = method(classifier, images, target, key, evaluation.TINY_BASELINES.get(name))
  saliency = out["gradcam"]  # Deterministic: the metrics' inputs are the same in every mode.
  for masked_value in metrics.MASKED_VALUES:
    out[f"average_drop/{masked_value}"] = metrics.average_drop(
        classifier, images, saliency, target, masked_value=masked_value)
  out["increase_in_confidence"] = metrics.increase_in_confidence(classifier, images, saliency, target)
  out["deletion_auc"] = metrics.deletion_auc(classifier, images, saliency, target, num_steps=8)
  out["insertion_auc"] = metrics.insertion_auc(classifier, images, saliency, target, num_steps=8)
  out.update({f"road/{name}": value for name, value in metrics.road(
      classifier, images, saliency, target, key, fractions=(0.2, 0.6))._asdict().items()})
  out["linear_imputation"] = metrics.linear_imputation(images[0], masks[0])
  out["pointing_game"] = metrics.pointing_game(saliency, masks)
  out["relevance_mass"] = metrics.relevance_mass(saliency, masks)
  out["model_randomization"] = metrics.model_randomization(
      baselines.gradcam, classifier, images, target, key)
  return out


def main(out_path: str) -> None:
  out = {name: np.asarray(value) for name, value in results().items()}
  for name, value in out.items():
    if jnp.issubdtype(value.dtype, jnp.floating):
      assert value.dtype == np.float32, f"{name} is {value.dtype}"
      assert np.isfinite(value).all(), f"{name} is not finite"
  np.savez(out_path, **out)


if __name__ == "__main__":
  main(*sys.argv[1:])
