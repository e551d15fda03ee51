"""The two loop drivers give the same results, stop early, and do not recompile."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pfc_jax import _loop


def _decay_step(rate, carry):
  """Halves-by-`rate` each value until it falls below 1; a no-op with zero output after that."""
  done = carry < 1.0
  new = jnp.where(done, carry, carry * rate)
  return new, jnp.where(done, 0.0, new)


def _all_below_one(rate, carry):
  del rate
  return jnp.all(carry < 1.0)


@pytest.mark.parametrize("with_stop", [False, True])
def test_drivers_agree(with_stop):
  carry = jnp.array([3.0, 40.0, 0.5])
  stop = _all_below_one if with_stop else None
  results = [
      _loop.run_loop(_decay_step, 0.5, carry, 25, driver=d, stop=stop)
      for d in ("compiled", "python")
  ]
  (c1, o1), (c2, o2) = results
  np.testing.assert_allclose(c1, c2)
  np.testing.assert_allclose(o1, o2)
  assert o1.shape == (25, 3)
  # 40 needs 6 halvings to drop below 1; after that its outputs are zeros.
  np.testing.assert_allclose(c1, [0.75, 0.625, 0.5])
  assert float(o1[5, 1]) == 0.625 and float(o1[6, 1]) == 0.0


def test_python_driver_stops_early_and_does_not_recompile():
  calls = []

  def counting_step(rate, carry):
    calls.append(1)  # runs only while tracing
    return _decay_step(rate, carry)

  carry = jnp.array([2.0, 4.0])
  _loop.run_loop(counting_step, 0.5, carry, 500, driver="python", stop=_all_below_one)
  _loop.run_loop(counting_step, 0.5, carry, 500, driver="python", stop=_all_below_one)
  assert len(calls) == 1


def test_resolve_driver():
  assert _loop.resolve_driver("auto") == ("python" if jax.default_backend() == "cpu" else "compiled")
  with pytest.raises(ValueError, match="driver"):
    _loop.resolve_driver("scan")


def _halving_prepare(rate, shared, start):
  return start * shared


def _halving_step(rate, shared, carry):
  del shared
  return _decay_step(rate, carry)


def _halving_finish(rate, shared, carry):
  return carry + shared


def _below_one(rate, carry):
  del rate
  return carry < 1.0


HALVING = _loop.Stage(_halving_prepare, _halving_step, _halving_finish, _below_one)


@pytest.mark.parametrize("batching, driver, compute_batch", [
    ("sequential", "python", None), ("sequential", "compiled", None), ("map", "compiled", None),
    ("vmap", "python", None), ("vmap", "compiled", None), ("dense", "python", 2),
    ("dense", "compiled", 2), ("dense", "python", None)])
def test_run_images_layouts_agree_and_stop_per_image(batching, driver, compute_batch):
  starts = jnp.array([1.5, 20.0, 0.25])
  outputs, outs = _loop.run_images(HALVING, 0.5, jnp.float32(2.0), starts, 12,
                                   batching=batching, driver=driver, compute_batch=compute_batch)
  # Prepared 3, 40, 0.5; halved until below 1 (2, 6 and 0 halvings); finished + 2.
  np.testing.assert_allclose(outputs, [0.75 + 2, 0.625 + 2, 0.5 + 2])
  assert outs.shape == (3, 12)
  np.testing.assert_allclose(outs[1, :6], 40.0 * 0.5 ** np.arange(1, 7))
  assert not np.any(outs[:, 6:]) and not np.any(outs[2])


def test_dense_layout_runs_traced_in_compute_batches():
  """Inside a traced program (as under `shard_map`) the compute batches are a `lax.map`."""
  starts = jnp.array([1.5, 20.0, 0.25])
  run = jax.jit(lambda s: _loop.run_images(HALVING, 0.5, jnp.float32(2.0), s, 12,
                                           batching="dense", compute_batch=2))
  outputs, outs = run(starts)
  np.testing.assert_allclose(outputs, [0.75 + 2, 0.625 + 2, 0.5 + 2])
  assert outs.shape == (3, 12)


def test_batching_is_checked():
  assert _loop.resolve_batching("auto") == (
      "sequential" if jax.default_backend() == "cpu" else "map")
  assert _loop.resolve_batching("auto", accelerator="dense") == (
      "sequential" if jax.default_backend() == "cpu" else "dense")
  with pytest.raises(ValueError, match="batching"):
    _loop.check_batching("pmap", "auto")
  with pytest.raises(ValueError, match="driver='python'"):
    _loop.check_batching("map", "python")
