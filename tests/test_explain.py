"""The composed pipeline: presets, shapes and contracts of `explain`."""

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from compilations import count_compilations
from pfc_jax import Classifier
from pfc_jax.coalitions import CoalitionConfig
from pfc_jax.explain import ExplainConfig, explain, explain_sweep
from pfc_jax.perturbation import SWEEPABLE, PerturbConfig

SIZE = 32


def _tiny_cnn(params, x):
  h = jax.lax.conv_general_dilated(x, params["conv"], (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jax.nn.relu(h).max(axis=(1, 2)) @ params["dense"]


def _classifier():
  rng = np.random.default_rng(0)
  return Classifier(_tiny_cnn, {"conv": jnp.asarray(rng.normal(size=(3, 3, 3, 5)), jnp.float32),
                                "dense": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)})


def _images(batch=2):
  return jnp.asarray(np.random.default_rng(1).uniform(size=(batch, SIZE, SIZE, 3)), jnp.float32)


def test_paper_preset_is_the_authors_demo():
  paper = ExplainConfig.preset("paper")
  assert paper.perturb == PerturbConfig()
  assert (paper.perturb.mask_weight, paper.perturb.confidence_weight,
          paper.perturb.noise_samples, paper.perturb.steps) == (0.1, 100.0, 16, 500)
  assert paper.perturb.consistency == "published"
  assert paper.coalitions.init == "random" and paper.coalitions.max_steps == 500
  fast, tiny = ExplainConfig.preset("fast"), ExplainConfig.preset("tiny")
  cost = lambda config: config.perturb.steps * config.perturb.noise_samples
  assert cost(fast) < cost(paper)
  assert tiny.perturb.steps < fast.perturb.steps
  with pytest.raises(ValueError, match="preset"):
    ExplainConfig.preset("best")


def test_fast_and_full_use_the_chosen_objective():
  fast, full = ExplainConfig.preset("fast"), ExplainConfig.preset("full")
  for chosen in (fast, full):
    assert chosen.perturb.parameterization == "guided" and chosen.perturb.max_w == 1.0
    assert chosen.perturb.confidence == "log_softmax"
    # Adam moves about one learning rate per step: w can reach max_w with steps to spare.
    assert chosen.perturb.learning_rate * chosen.perturb.steps >= 2 * chosen.perturb.max_w
    # Blur alone, deterministic: one sample per step computes the objective exactly.
    assert (chosen.perturb.blur_sigma, chosen.perturb.noise_std) == (10.0, 0.0)
    assert chosen.perturb.noise_samples == 1
    # The map is the mean of the preservation game's and the dual game's.
    assert chosen.perturb.with_preservation_game and chosen.perturb.deletion_weight == 10.0
  assert full.perturb == fast.perturb  # 500 steps were no better on the tuning data.
  assert full.coalitions == ExplainConfig.preset("paper").coalitions
  assert fast.coalitions == CoalitionConfig.fast()


@pytest.mark.parametrize("former", ["fast_noise", "fast_published", "fast_lowres"])
def test_objectives_tried_before_are_not_presets(former):
  with pytest.raises(ValueError, match="fast_noise|choose from"):
    ExplainConfig.preset(former)


def test_config_rejects_too_few_coalition_slots():
  with pytest.raises(ValueError, match="max_coalitions"):
    ExplainConfig(CoalitionConfig(num_channels=20), PerturbConfig(max_coalitions=8))


def test_explain_tiny_end_to_end():
  classifier, images = _classifier(), _images()
  config = ExplainConfig.preset("tiny")
  result = explain(classifier, images, jax.random.key(0), config)
  assert result.saliency.shape == result.labels.shape == (2, SIZE, SIZE)
  assert result.w.shape == (2, SIZE, SIZE, 3)
  assert result.labels.dtype == result.num_coalitions.dtype == result.target.dtype == jnp.int32
  assert result.saliency.dtype == result.probs.dtype == jnp.float32
  for labels, num in zip(np.asarray(result.labels), np.asarray(result.num_coalitions)):
    assert set(np.unique(labels)) == set(range(num))
  np.testing.assert_allclose(result.saliency, 1.0 - result.w.mean(-1), rtol=1e-6)
  probs = jax.nn.softmax(classifier.logits(images), axis=-1)
  np.testing.assert_array_equal(result.target, probs.argmax(-1))
  np.testing.assert_allclose(result.probs, probs.max(-1), rtol=1e-5)
  assert float(result.w.max()) > 0
  # One key or the B keys it splits into: the same explanation.
  split = explain(classifier, images, jax.random.split(jax.random.key(0), 2), config)
  for a, b in zip(result, split):
    np.testing.assert_array_equal(a, b)
  other = explain(classifier, images, jax.random.key(1), config)
  assert not np.array_equal(other.labels, result.labels)


def test_explain_without_a_config_uses_the_default_preset(monkeypatch):
  """`explain(classifier, images, key)` runs `DEFAULT_PRESET` ("fast", the recommended one),
  not the dataclass defaults (the "paper" preset, hours per photo on a CPU)."""
  explain_module = importlib.import_module("pfc_jax.explain")  # `pfc_jax.explain` is the function.
  assert explain_module.DEFAULT_PRESET == "fast"
  monkeypatch.setattr(explain_module, "DEFAULT_PRESET", "tiny")  # The same path, cheaper.
  classifier, images = _classifier(), _images()
  default = explain(classifier, images, jax.random.key(0))
  tiny = explain(classifier, images, jax.random.key(0), ExplainConfig.preset("tiny"))
  for a, b in zip(default, tiny):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("entry", ["explain", "sharded_explain", "run_job"])
def test_every_entry_point_refuses_a_config_that_is_not_an_explain_config(entry, tmp_path):
  """`explain`, `parallel.sharded_explain` and `batch.run_job` resolve their config alike: a
  `PerturbConfig` passed as the whole config is refused by name, before any work."""
  from pfc_jax import batch, parallel, sources
  classifier, images = _classifier(), _images()
  calls = {
      "explain": lambda: explain(classifier, images, jax.random.key(0), PerturbConfig()),
      "sharded_explain": lambda: parallel.sharded_explain(
          classifier, images, jax.random.split(jax.random.key(0), 2), PerturbConfig()),
      "run_job": lambda: batch.run_job(sources.ImageFolderSource(tmp_path / "in", SIZE),
                                       classifier, tmp_path / "out", config=PerturbConfig(),
                                       progress=False),
  }
  (tmp_path / "in").mkdir()
  for i, image in enumerate(np.asarray(images)):
    Image.fromarray((image * 255).astype(np.uint8)).save(tmp_path / "in" / f"{i}.png")
  with pytest.raises(ValueError, match="must be an ExplainConfig, got PerturbConfig"):
    calls[entry]()
  assert not (tmp_path / "out").exists()


def test_explain_with_new_sweepable_values_compiles_nothing():
  classifier, images = _classifier(), _images()
  config = ExplainConfig.preset("tiny")
  first = explain(classifier, images, jax.random.key(0), config)
  for name in SWEEPABLE:
    changed = dataclasses.replace(config, perturb=dataclasses.replace(
        config.perturb, **{name: 0.2 * getattr(config.perturb, name)}))
    with count_compilations() as compiled:
      result = jax.block_until_ready(explain(classifier, images, jax.random.key(0), changed))
    assert not compiled, name
    np.testing.assert_array_equal(result.labels, first.labels)
    if name in ("learning_rate", "max_w"):  # The others' terms hardly act in 3 "tiny" steps.
      assert not np.array_equal(result.w, first.w), name


def test_explain_rejects_bad_arguments():
  with pytest.raises(ValueError, match="config"):
    explain(_classifier(), _images(), jax.random.key(0), PerturbConfig())
  with pytest.raises(ValueError, match="images"):
    explain(_classifier(), _images()[..., :2], jax.random.key(0), ExplainConfig.preset("tiny"))
  with pytest.raises(ValueError, match="key"):
    explain(_classifier(), _images(), jax.random.split(jax.random.key(0), 3),
            ExplainConfig.preset("tiny"))


def test_explain_sweep_members_equal_explain():
  classifier, images = _classifier(), _images()
  config = ExplainConfig.preset("tiny")
  settings = {"max_w": [1.0, 3.0], "mask_weight": [0.1, 1.0]}
  swept = explain_sweep(classifier, images, jax.random.key(0), config, settings)
  assert swept.saliency.shape == (2, 2, SIZE, SIZE) and swept.labels.shape == (2, SIZE, SIZE)
  for k in range(2):
    single = explain(classifier, images, jax.random.key(0), dataclasses.replace(
        config, perturb=dataclasses.replace(
            config.perturb, max_w=settings["max_w"][k], mask_weight=settings["mask_weight"][k])))
    np.testing.assert_array_equal(single.labels, swept.labels)
    np.testing.assert_allclose(single.saliency, swept.saliency[k], rtol=1e-5, atol=1e-5)
