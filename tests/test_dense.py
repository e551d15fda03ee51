"""The "dense" layout (`pfc_jax._loop`): compute batches of a fixed `compute_batch` images, each
step one program over all of them.

- An image's result does not depend on its batch for a given `compute_batch`: alone (padded),
  in a batch, at any row, in a padded last batch, and on either driver, to float32 equality
  with one game, and to `_ATOL` with both games in one program: XLA:CPU may round an image's
  rows differently by where they fall in the step's batch (seen on an AMD EPYC: 45 of 768
  values of w 6e-8 apart after 20 steps; equal on another x86 CPU).
- Against "sequential" (the one-image program) it agrees to `_ATOL`: the classifier's batch of
  B x S x games rows instead of S rows changes how XLA blocks the convolutions and products, so
  the float rounding of each step differs by about one unit in the last place of float32
  (1.2e-7 relative), and 20 Adam steps carry that forward: measured 4.2e-7 at most on `w` and
  the saliency here. 1e-5 keeps a margin of 20 while any arithmetic difference (another key,
  a game missing, images mixed) moves the maps by more than 1e-2.
- The step's HLO holds one dense batch of every image, sample and game, and no grouped
  convolution.
- A compute batch that does not fit the device's memory is refused, naming the option.
"""

import dataclasses
import re

import jax
import numpy as np
import pytest

from pfc_jax import _loop, coalitions, perturbation
from pfc_jax.coalitions import CoalitionConfig, extract_coalitions
from pfc_jax.perturbation import PerturbConfig, perturb
from test_determinism import COALITIONS, PERTURB, _assert_same, fixture

_ATOL = 1e-5
# The "fast" objective in miniature: guided w, blur only (S = 1), both games.
TWO_GAMES = dataclasses.replace(
    PERTURB, noise_samples=2, parameterization="guided", lowres_stride=4, blur_sigma=2.0,
    noise_std=0.0, confidence="log_softmax", deletion_weight=10.0, with_preservation_game=True)
_GROUPED = re.compile(r"(feature|batch)_group_count=([0-9]+)")


def _labels(batch: int = 3) -> np.ndarray:
  return np.broadcast_to((np.arange(16)[:, None] // 4 + np.arange(16)[None] // 8) % 4,
                         (batch, 16, 16)).astype(np.int32)


def _dense(config, driver: str, compute_batch: int = 2):
  return dataclasses.replace(config, batching="dense", driver=driver, compute_batch=compute_batch)


def _assert_close(batched, single, row):
  for name, value in single._asdict().items():
    np.testing.assert_allclose(np.asarray(getattr(batched, name))[row], np.asarray(value)[0],
                               atol=_ATOL, rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("config, driver", [(PERTURB, "python"), (TWO_GAMES, "compiled")],
                         ids=["noise-python", "two_games-compiled"])
def test_perturbation_does_not_depend_on_the_batch(config, driver):
  classifier, images, _ = fixture()
  keys = jax.random.split(jax.random.key(0), 3)
  config = _dense(config, driver)
  same = _assert_same if not config.with_preservation_game else _assert_close
  together = perturb(classifier, images, _labels(), keys, config)  # Batches [0, 1], [2, 2].
  for row in (1, 2):  # Row 1 of a full batch, row 0 of the padded one; alone: row 0, padded.
    alone = perturb(classifier, images[row:row + 1], _labels(1), keys[row:row + 1], config)
    same(together, alone, row)
  pair = perturb(classifier, images[1:], _labels(2), keys[1:], config)  # Image 1 at row 0.
  same(together, jax.tree.map(lambda x: x[:1], pair), 1)
  w = np.asarray(together.w)
  assert w.min() < 0.5 * w.max()  # The objective held some pixels back.


@pytest.mark.parametrize("config", [PERTURB, TWO_GAMES], ids=["noise", "two_games"])
def test_perturbation_agrees_with_the_one_image_program(config):
  classifier, images, _ = fixture()
  keys = jax.random.split(jax.random.key(0), 3)
  dense = perturb(classifier, images, _labels(), keys, _dense(config, "python"))
  sequential = perturb(classifier, images, _labels(), keys,
                       dataclasses.replace(config, batching="sequential"))
  np.testing.assert_array_equal(dense.target, sequential.target)
  np.testing.assert_array_equal(dense.probs, sequential.probs)  # One-image `prepare`.
  for name in ("w", "saliency", "losses"):
    np.testing.assert_allclose(getattr(dense, name), getattr(sequential, name), atol=_ATOL,
                               rtol=1e-5, err_msg=name)
  assert np.abs(np.asarray(dense.saliency[0]) - np.asarray(dense.saliency[1])).max() > 1e-2


def test_two_games_in_one_program_equal_two_runs():
  """The dual and the preservation game share each step's classifier batch, and give what the
  two games run one after another give (to `_ATOL`: other batch shapes)."""
  classifier, images, _ = fixture()
  keys = jax.random.split(jax.random.key(0), 3)
  config = _dense(TWO_GAMES, "compiled")
  both = perturb(classifier, images, _labels(), keys, config)
  dual = perturb(classifier, images, _labels(), keys,
                 dataclasses.replace(config, with_preservation_game=False))
  preservation = perturb(classifier, images, _labels(), keys, dataclasses.replace(
      config, with_preservation_game=False, deletion_weight=0.0))
  normalized = lambda s: (s - s.min((1, 2), keepdims=True)) / (
      s.max((1, 2), keepdims=True) - s.min((1, 2), keepdims=True))
  np.testing.assert_allclose(both.w, (dual.w + preservation.w) / 2, atol=_ATOL)
  np.testing.assert_allclose(
      both.saliency, (normalized(np.asarray(dual.saliency))
                      + normalized(np.asarray(preservation.saliency))) / 2, atol=_ATOL)
  np.testing.assert_allclose(both.losses, (dual.losses + preservation.losses) / 2, atol=_ATOL,
                             rtol=1e-5)
  assert np.abs(np.asarray(dual.w) - np.asarray(preservation.w)).max() > 1e-2  # Two games.


def test_perturbation_sweep_runs_dense():
  classifier, images, _ = fixture()
  keys = jax.random.split(jax.random.key(0), 3)
  config = _dense(PERTURB, "python")
  swept = perturbation.perturb_sweep(classifier, images, _labels(), keys, config,
                                     {"learning_rate": [0.1, 0.05]})
  second = perturb(classifier, images, _labels(), keys,
                   dataclasses.replace(config, learning_rate=0.05))
  for name, value in second._asdict().items():
    np.testing.assert_array_equal(getattr(swept, name)[1], value, err_msg=name)


def test_coalitions_do_not_depend_on_the_batch():
  """On the Python driver; the compiled one inside `shard_map`: `test_determinism.py`."""
  _, images, _ = fixture()
  keys = jax.random.split(jax.random.key(1), 3)
  config = _dense(COALITIONS, "python")
  together = extract_coalitions(images, keys, config)
  for row in (1, 2):
    _assert_same(together, extract_coalitions(images[row:row + 1], keys[row:row + 1], config),
                 row)
  sequential = extract_coalitions(images, keys, dataclasses.replace(COALITIONS,
                                                                    batching="sequential"))
  assert np.mean(np.asarray(together.labels) == np.asarray(sequential.labels)) > 0.98
  np.testing.assert_array_equal(together.steps, sequential.steps)
  assert len(set(np.asarray(together.steps).tolist())) > 1  # Each image stopped on its own.


def test_auto_layouts():
  accelerator = jax.default_backend() != "cpu"
  assert PerturbConfig().layout() == ("dense" if accelerator else "sequential")
  assert CoalitionConfig.fast().layout() == ("dense" if accelerator else "sequential")
  assert CoalitionConfig().layout() == ("map" if accelerator else "sequential")
  assert PerturbConfig(batching="dense", driver="python").layout() == "dense"
  for bad in (0, 1.5, True):
    with pytest.raises(ValueError, match="compute_batch"):
      PerturbConfig(compute_batch=bad)
    with pytest.raises(ValueError, match="compute_batch"):
      CoalitionConfig(compute_batch=bad)


def _conv_classifier():
  return perturbation.Classifier(
      lambda params, x: jax.lax.conv_general_dilated(
          x, params, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")).mean((1, 2)),
      np.ones((3, 3, 3, 4), np.float32))


def _games_step_hlo(config: PerturbConfig, batch: int) -> str:
  """The optimised HLO of the dense perturbation step over `batch` 16 px images."""
  classifier, games = _conv_classifier(), perturbation._games(config)
  inputs = (np.zeros((batch, 16, 16, 3), np.float32), _labels(batch),
            jax.random.split(jax.random.key(0), batch),
            jax.tree.map(lambda v: np.full(batch, v, np.float32),
                         perturbation.Hyperparameters.from_config(config)))
  states = jax.jit(jax.vmap(lambda i: perturbation._games_prepare(games, classifier, i)))(inputs)
  step = _loop.jit_step(_loop._dense_paired_step(perturbation._GAMES_STAGE))
  return step.lower(games, (classifier, states)).compile().as_text()


@pytest.mark.parametrize("config, rows", [
    (PerturbConfig(steps=2, noise_samples=2), 3 * 2),  # B x S.
    (PerturbConfig(steps=2, noise_samples=2, deletion_weight=1.0, with_preservation_game=True),
     3 * 2 * 2 + 3 * 2)])  # B x S x (preserved + deleted) of the dual game + B x S.
def test_dense_step_has_one_dense_classifier_batch(config, rows):
  hlo = _games_step_hlo(config, 3)
  convolutions = [line for line in hlo.splitlines() if " convolution(" in line]
  assert len(convolutions) == 2  # The forward pass and its input gradient.
  for line in convolutions:
    assert re.search(r"= f32\[(\d+),", line).group(1) == str(rows), line
    assert not any(int(m.group(2)) > 1 for m in _GROUPED.finditer(line)), line


def test_dense_coalition_heads_are_one_batched_product():
  """A frozen backbone's head step: no convolution at all (vmap gives grouped ones)."""
  config = coalitions._static_config(COALITIONS)
  images = np.random.default_rng(0).random((4, 16, 16, 3), np.float32)
  states = jax.jit(jax.vmap(lambda image, key: coalitions._prepare(config, image, key, None)))(
      images, jax.random.split(jax.random.key(0), 4))
  dense = _loop.jit_step(_loop._dense_paired_step(coalitions._STAGE))
  hlo = dense.lower(config, (None, states)).compile().as_text()
  assert " dot(" in hlo and " convolution(" not in hlo
  vmapped = _loop.jit_step(_loop._paired_step(coalitions._stage_step, batched=True))
  assert _GROUPED.search(vmapped.lower(config, (None, states)).compile().as_text())


def test_compute_batch_follows_the_device_memory(monkeypatch):
  classifier, images, _ = fixture()
  keys = jax.random.split(jax.random.key(0), 3)
  config = _dense(PERTURB, "python", compute_batch=None)
  games = perturbation._games(config)
  inputs = (images, _labels(), keys, jax.tree.map(
      lambda v: np.full(3, v, np.float32), perturbation.Hyperparameters.from_config(config)))
  memory = _loop.dense_memory(perturbation._GAMES_STAGE, games, classifier, inputs)
  assert memory.per_image_bytes > 0 and memory.shared_bytes == 3 * 3 * 3 * 6 * 4 + 6 * 4 * 4
  for compute_batch in (1, 4, _loop.MAX_COMPUTE_BATCH):
    monkeypatch.setattr(_loop, "device_memory_limit",
                        lambda n=compute_batch: int(memory.estimate(n) / 0.8) + 1)
    assert _loop.default_compute_batch(
        perturbation._GAMES_STAGE, games, classifier, inputs) == compute_batch
  monkeypatch.setattr(_loop, "device_memory_limit", lambda: 10**15)  # Capped by the budget:
  monkeypatch.setattr(_loop, "STEP_MEMORY_BUDGET", memory.estimate(8))
  assert _loop.default_compute_batch(perturbation._GAMES_STAGE, games, classifier, inputs) == 8
  monkeypatch.setattr(_loop, "device_memory_limit", lambda: memory.estimate(2) - 1)
  with pytest.raises(ValueError,
                     match=r"2 images needs about .* lower `PerturbConfig.compute_batch`"):
    perturb(classifier, images, _labels(), keys, _dense(PERTURB, "python", compute_batch=2))
  with pytest.raises(ValueError, match="lower `CoalitionConfig.compute_batch`"):
    monkeypatch.setattr(_loop, "device_memory_limit", lambda: 1)
    extract_coalitions(images, keys, _dense(COALITIONS, "python"))


def test_a_compute_batch_that_cannot_fit_is_refused_while_tracing(monkeypatch):
  """Inside `jit` or `shard_map` (a batch job on several devices) the inputs are tracers; the
  estimate reads their shapes, so the error comes before the program runs out of memory."""
  classifier, images, _ = fixture()
  keys = jax.random.split(jax.random.key(0), 3)
  config = _dense(PERTURB, "compiled", compute_batch=2)
  monkeypatch.setattr(_loop, "device_memory_limit", lambda: 1)
  traced = jax.jit(lambda c, i, l, k: perturb(c, i, l, k, config))
  with pytest.raises(ValueError, match=r"lower `PerturbConfig.compute_batch` \(`--compute-batch`"):
    traced(classifier, images, _labels(), keys)


def test_out_of_memory_names_the_option(monkeypatch):
  classifier, images, _ = fixture()

  def out_of_memory(*args, **kwargs):
    raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 9 GB.")

  monkeypatch.setattr(_loop, "_dense_batch_python", out_of_memory)
  with pytest.raises(ValueError, match=r"lower `PerturbConfig.compute_batch`.*RESOURCE_EXHAUSTED"):
    perturb(classifier, images, _labels(), jax.random.key(0), _dense(PERTURB, "python"))
