"""Runs `parallel.sharded_explain` on a test's fixture and saves the result.

Run as a script in a fresh process, so that XLA_FLAGS (set before JAX starts) can give it
several fake CPU devices:

  python tests/sharded_explain_main.py OUT.npz parallel      # test_parallel.py's fixture
  python tests/sharded_explain_main.py OUT.npz determinism   # test_determinism.py's, its layouts
"""

import sys

import jax
import numpy as np

from pfc_jax import parallel

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import test_determinism  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import test_parallel  # pylint: disable=g-import-not-at-top,wrong-import-position


def main(out_path: str, fixture: str) -> None:
  if fixture == "parallel":
    classifier, images, indices, config = test_parallel.fixture()
    explanation = parallel.sharded_explain(
        classifier, images, parallel.image_keys(test_parallel.SEED, indices), config)
    arrays = explanation._asdict()
  else:
    classifier, images, indices = test_determinism.fixture()
    keys = parallel.image_keys(test_determinism.SEED, indices)
    arrays = {}
    for batching, driver in test_determinism.LAYOUTS.items():
      config = test_determinism.with_layout(test_determinism.CONFIG, batching, driver)
      explanation = parallel.sharded_explain(classifier, images, keys, config)
      arrays.update({f"{batching}/{name}": value for name, value in explanation._asdict().items()})
  np.savez(out_path, device_count=jax.device_count(), **arrays)


if __name__ == "__main__":
  main(*sys.argv[1:])
