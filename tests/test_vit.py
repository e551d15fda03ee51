"""The shapes Vision Transformer: its token split, the shipped weights, the transformer baselines
(Grad-CAM on the patch tokens, attention rollout) and `--model shapes_vit` through the CLI."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pfc_jax import baselines, cli, evaluation, models, weights
from pfc_jax.baselines.attention_rollout import rollout
from pfc_jax.benchmarks import shapes
from pfc_jax.models import vit

# `scripts/train_shapes_vit.py` measured 0.991 on the 1000 held-out images of seed 1; the shipped
# weights classify 198 of their first 200 (0.990). The images are fixed, so the threshold allows
# only for another platform's rounding moving borderline images: 8 more errors than measured.
MIN_ACCURACY = 0.95


@functools.cache
def _shipped():
  return models.classifier("shapes_vit", weights.load("shapes_vit"))


def _random_variables(size: int = 64):
  return vit.ShapesViT().init(jax.random.key(0), jnp.zeros((1, size, size, 3)))


@pytest.mark.parametrize("size", [64, 32])
def test_shapes_and_the_token_split(size):
  """On 32 px images the position embeddings are resampled to the 4x4 grid."""
  classifier = models.classifier("shapes_vit", _random_variables())
  images = shapes.generate(2, size, seed=1).images
  x = classifier.normalize(images)
  grid = size // 8
  tokens = classifier.features_fn(classifier.params, x)
  assert tokens.shape == (2, grid, grid, 64)
  logits = classifier.logits(images)
  assert logits.shape == (2, len(models.class_names("shapes_vit"))) and logits.dtype == jnp.float32
  np.testing.assert_allclose(classifier.head_fn(classifier.params, tokens), logits, rtol=1e-5,
                             atol=1e-5)
  attention = classifier.attention_fn(classifier.params, x)
  assert attention.shape == (2, 4, 4, grid * grid, grid * grid)
  np.testing.assert_allclose(attention.sum(axis=-1), 1.0, rtol=1e-5)


def test_image_sides_must_be_multiples_of_the_patch():
  classifier = models.classifier("shapes_vit", _random_variables())
  with pytest.raises(ValueError, match="multiples of the patch size 8"):
    classifier.logits(jnp.zeros((1, 60, 64, 3)))


def test_registry():
  assert "shapes_vit" in models.MODEL_NAMES and models.input_size("shapes_vit") == 64
  assert models.class_names("shapes_vit") == list(shapes.CLASS_NAMES)
  assert _shipped().attention_fn is not None
  assert models.classifier("shapes_cnn", weights.load("shapes_cnn")).attention_fn is None


def test_shipped_weights_classify_held_out_shapes():
  bench = shapes.generate(200, 64, seed=1)
  logits = jax.jit(lambda c, x: c.logits(x))(_shipped(), bench.images)
  assert np.mean(np.argmax(logits, axis=-1) == bench.labels) >= MIN_ACCURACY


def test_rollout_multiplies_the_blocks_with_the_residual():
  """Abnar and Zuidema's eq. 1: A = (0.5 W + 0.5 I) row-normalised, R = A_2 A_1."""
  rng = np.random.default_rng(0)
  weights_ = rng.uniform(size=(2, 3, 5, 5)).astype(np.float32)
  weights_ /= weights_.sum(axis=-1, keepdims=True)
  mixed = 0.5 * weights_.mean(axis=1) + 0.5 * np.eye(5, dtype=np.float32)
  np.testing.assert_allclose(rollout(jnp.asarray(weights_)), mixed[1] @ mixed[0], rtol=1e-5)
  maxed = 0.5 * weights_.max(axis=1) + 0.5 * np.eye(5, dtype=np.float32)
  maxed /= maxed.sum(axis=-1, keepdims=True)
  np.testing.assert_allclose(rollout(jnp.asarray(weights_), "max"), maxed[1] @ maxed[0],
                             rtol=1e-5)


def test_gradcam_and_attention_rollout_on_the_shipped_model():
  bench = shapes.generate(8, 64, seed=1)
  classifier = _shipped()
  target = jnp.argmax(classifier.logits(bench.images), axis=-1).astype(jnp.int32)
  for method in (baselines.gradcam, baselines.attention_rollout):
    saliency = np.asarray(method(classifier, bench.images, target))
    assert saliency.shape == (8, 64, 64) and np.isfinite(saliency).all() and saliency.min() >= 0
  # Rollout follows the attention, whatever the class.
  other = baselines.attention_rollout(classifier, bench.images, (target + 1) % 4)
  np.testing.assert_allclose(other, saliency)
  with pytest.raises(ValueError, match="63 patch tokens make no grid"):
    baselines.attention_rollout(classifier, bench.images, target, None,
                                baselines.AttentionRolloutConfig(prefix_tokens=1))


def test_attention_rollout_applies_to_transformers_only():
  cnn = models.classifier("shapes_cnn", weights.load("shapes_cnn"))
  assert baselines.applicable("attention_rollout", _shipped())
  assert not baselines.applicable("attention_rollout", cnn)
  assert baselines.applicable("gradcam", cnn) and baselines.applicable("gradcam", _shipped())
  with pytest.raises(ValueError, match="Unknown method `name` 'rollout'"):
    baselines.applicable("rollout", cnn)
  images = shapes.generate(2, 64, seed=1).images
  with pytest.raises(ValueError, match="no attention_fn"):
    baselines.attention_rollout(cnn, images, np.zeros(2, np.int32))
  config = evaluation.EvaluationConfig(methods=("gradcam", "attention_rollout"), preset="tiny")
  with pytest.raises(ValueError, match="lacks what attention_rollout read.*needs attention_fn"):
    evaluation.evaluate(cnn, images, config, progress=False)


def test_evaluate_shapes_vit_from_the_command_line(tmp_path, capsys):
  out = tmp_path / "report.json"
  code = cli.main(["evaluate", "--model", "shapes_vit", "--benchmark", "shapes", "--num-images",
                   "2", "--methods", "pfc,gradcam,attention_rollout", "--preset", "tiny",
                   "--out", str(out), "--no-progress"])
  assert code == 0
  report = json.loads(out.read_text())
  assert report["model"] == "shapes_vit" and report["images"] == 2
  assert set(report["methods"]) == {"pfc", "gradcam", "attention_rollout"}
  for scores in report["methods"].values():
    assert 0.0 <= scores["pointing_game"] <= 100.0 and 0.0 <= scores["relevance_mass"] <= 1.0
    assert np.isfinite(scores["insertion_auc"])
  assert "attention_rollout" in capsys.readouterr().out
