"""Image i's explanation depends only on image i, its key and the config: to float32 equality
whatever its batch, the batch size, the chunking or the device count, for every layout that
promises it ("sequential" and "map", and "dense" for a given compute batch, `pfc_jax._loop`;
more of "dense" in `test_dense.py`).

The settings run long enough for float differences to show: with the perturbation vmapped over
the batch (batching "vmap"), image 1 of 3 ends 2.4e-7 away from image 1 alone after 20 steps
here; at real settings Adam's near-sign updates let such differences grow to 0.135 on a
saliency map ("fast" preset, 64 px photos).
"""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from pfc_jax import parallel
from pfc_jax.coalitions import CoalitionConfig, extract_coalitions
from pfc_jax.explain import ExplainConfig, explain
from pfc_jax.perturbation import PerturbConfig, perturb
from test_perturbation import _tiny_classifier

SEED = 4
_FAKE_DEVICES = 4
# Long enough to diverge under batch-dependent rounding, short enough for seconds on a CPU.
COALITIONS = CoalitionConfig.tiny(train_backbone=False, resolution=8, max_steps=20,
                                  learning_rate=0.5)
PERTURB = PerturbConfig(steps=20, noise_samples=4, learning_rate=0.1, max_w=5.0,
                        max_coalitions=COALITIONS.num_channels)
CONFIG = ExplainConfig(COALITIONS, PERTURB)
# Compared across device counts, each with the driver it has inside `shard_map`: "dense" is
# then compiled (the drivers agree up to float rounding only).
LAYOUTS = {"auto": "auto", "map": "auto", "dense": "compiled"}


def with_layout(config: ExplainConfig, batching: str, driver: str = "auto") -> ExplainConfig:
  """`config` with both stages in layout `batching` driven by `driver`."""
  return ExplainConfig(dataclasses.replace(config.coalitions, batching=batching, driver=driver),
                       dataclasses.replace(config.perturb, batching=batching, driver=driver))


def fixture():
  """A tiny random CNN classifier, images `[3, 16, 16, 3]` and their data-set indices."""
  images = np.random.default_rng(2).random((3, 16, 16, 3), np.float32)
  return _tiny_classifier(), images, np.arange(20, 23)


def _assert_same(batched, single, row):
  for name, value in single._asdict().items():
    np.testing.assert_array_equal(np.asarray(getattr(batched, name))[row], np.asarray(value)[0],
                                  err_msg=name)


@pytest.mark.parametrize("batching, driver", [("sequential", "python"), ("map", "compiled")])
def test_perturbation_does_not_depend_on_the_batch(batching, driver):
  classifier, images, _ = fixture()
  labels = np.broadcast_to((np.arange(16)[:, None] // 4 + np.arange(16)[None] // 8) % 4,
                           (3, 16, 16)).astype(np.int32)
  keys = jax.random.split(jax.random.key(0), 3)
  config = dataclasses.replace(PERTURB, batching=batching, driver=driver)
  together = perturb(classifier, images, labels, keys, config)
  alone = perturb(classifier, images[1:2], labels[1:2], keys[1:2], config)
  _assert_same(together, alone, 1)
  w = np.asarray(together.w)
  assert w.min() < 0.5 * w.max()  # The confidence term held some pixels back.


@pytest.mark.parametrize("batching", ["sequential", "map"])
def test_coalitions_do_not_depend_on_the_batch(batching):
  _, images, _ = fixture()
  keys = jax.random.split(jax.random.key(1), 3)
  config = dataclasses.replace(COALITIONS, batching=batching)
  together = extract_coalitions(images, keys, config)
  for i in range(3):
    _assert_same(together, extract_coalitions(images[i:i + 1], keys[i:i + 1], config), i)


def test_explanations_do_not_depend_on_chunking():
  classifier, images, indices = fixture()
  config = CONFIG  # The backend's default layouts.
  keys = parallel.image_keys(SEED, indices)
  whole = explain(classifier, images, keys, config)
  first, rest = explain(classifier, images[:1], keys[:1], config), explain(
      classifier, images[1:], keys[1:], config)
  _assert_same(whole, first, 0)
  _assert_same(whole, jax.tree.map(lambda x: x[1:], rest), 2)


def test_layouts_give_the_same_coalitions_up_to_float_ties():
  _, images, _ = fixture()
  keys = jax.random.split(jax.random.key(1), 3)
  results = [extract_coalitions(images, keys, dataclasses.replace(COALITIONS, batching=b))
             for b in ("sequential", "map", "vmap")]
  for result in results[1:]:
    assert np.mean(np.asarray(result.labels) == np.asarray(results[0].labels)) > 0.98
    np.testing.assert_array_equal(result.steps, results[0].steps)


def test_results_do_not_depend_on_the_device_count(tmp_path):
  """4 fake CPU devices against this process's one, in the CPU default layout, in "map" (a
  `lax.map` over the images inside `shard_map`) and in "dense", the layout of GPUs and TPUs
  (a `lax.map` over compute batches inside `shard_map`; compute batch 4, the CPU default, so
  each device pads its one image to 4 where the single device runs the 3 images together)."""
  classifier, images, indices = fixture()
  keys = parallel.image_keys(SEED, indices)
  single = {batching: explain(classifier, images, keys, with_layout(CONFIG, batching, driver))
            for batching, driver in LAYOUTS.items()}
  out_path = tmp_path / "sharded.npz"
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={_FAKE_DEVICES}",
         "JAX_PLATFORMS": "cpu"}
  subprocess.run([sys.executable, str(Path(__file__).parent / "sharded_explain_main.py"),
                  str(out_path), "determinism"], env=env, check=True, timeout=600)
  sharded = np.load(out_path)
  assert int(sharded["device_count"]) == _FAKE_DEVICES
  for batching, result in single.items():
    for name, value in result._asdict().items():
      np.testing.assert_array_equal(sharded[f"{batching}/{name}"], np.asarray(value),
                                    err_msg=f"{batching}/{name}")
