"""Data parallelism: sharded results equal single-device ones; keys depend only on the index."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from pfc_jax import models, parallel
from pfc_jax.explain import ExplainConfig, explain

SEED = 3
_FAKE_DEVICES = 8


def fixture():
  """Classifier, images `[5, 16, 16, 3]`, their indices and the "tiny" preset."""
  variables = models.module("shapes_cnn").init(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3), np.float32))
  images = np.random.default_rng(0).random((5, 16, 16, 3), np.float32)
  return models.classifier("shapes_cnn", variables), images, np.arange(10, 15), ExplainConfig.preset("tiny")


def _per_image_sum(static, replicated, images, keys):
  """A toy per-image pipeline: scaled pixel sum plus one normal draw from the image's key."""
  noise = jax.vmap(lambda key: jax.random.normal(key, ()))(keys)
  return images.sum(axis=(1, 2, 3)) * replicated + static + noise


def test_image_keys_depend_only_on_seed_and_index():
  keys = parallel.image_keys(7, np.array([4, 0, 9]))
  expected = jax.random.fold_in(jax.random.PRNGKey(7), 9)
  np.testing.assert_array_equal(keys[2], expected)
  np.testing.assert_array_equal(parallel.image_keys(7, [9])[0], expected)
  assert not np.array_equal(keys[0], parallel.image_keys(8, [4])[0])


def test_pad_batch_repeats_last_row_and_padded_size_rounds_up():
  mesh = parallel.data_mesh()
  assert parallel.padded_size(5, mesh) % mesh.size == 0 and parallel.padded_size(5, mesh) >= 5
  padded = parallel.pad_batch(np.arange(3), 5)
  np.testing.assert_array_equal(padded, [0, 1, 2, 2, 2])


def test_run_sharded_matches_unsharded_and_drops_padding():
  mesh = parallel.data_mesh()
  images = np.random.default_rng(1).random((3, 4, 4, 3), np.float32)
  keys = parallel.image_keys(0, np.arange(3))
  out = parallel.run_sharded(_per_image_sum, mesh, 1.5, np.float32(2.0), images, keys)
  np.testing.assert_allclose(out, _per_image_sum(1.5, np.float32(2.0), images, keys), rtol=1e-6)
  compiled = parallel.shard_batch(_per_image_sum, mesh, 1.5)
  parallel.run_sharded(_per_image_sum, mesh, 1.5, np.float32(3.0), images, keys)
  assert compiled._cache_size() == 1  # pylint: disable=protected-access


def test_process_slice_is_everything_on_one_process():
  mesh = parallel.data_mesh()
  assert parallel.process_slice(mesh.size * 2, mesh) == slice(0, mesh.size * 2)


def test_eight_device_results_equal_single_device(tmp_path):
  classifier, images, indices, config = fixture()
  single = explain(classifier, images, parallel.image_keys(SEED, indices), config)
  out_path = tmp_path / "sharded.npz"
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={_FAKE_DEVICES}",
         "JAX_PLATFORMS": "cpu"}
  subprocess.run([sys.executable, str(Path(__file__).parent / "sharded_explain_main.py"), str(out_path),
                  "parallel"],
                 env=env, check=True, timeout=300)
  sharded = np.load(out_path)
  assert int(sharded["device_count"]) == _FAKE_DEVICES
  for name, value in single._asdict().items():
    np.testing.assert_allclose(sharded[name], np.asarray(value), atol=1e-5, err_msg=name)


def test_importing_and_configuring_leaves_jax_uninitialised():
  """`jax.distributed.initialize` must come first, so nothing before it may start a backend."""
  code = ("import pfc_jax, pfc_jax.cli; from jax._src import xla_bridge; "
          "[pfc_jax.ExplainConfig.preset(p) for p in ('paper', 'fast', 'tiny')]; "
          "assert not xla_bridge.backends_are_initialized(), 'a JAX backend was started'")
  subprocess.run([sys.executable, "-c", code], check=True, timeout=120,
                 env={**os.environ, "JAX_PLATFORMS": "cpu"})
