"""Runs `parallel.sharded_explain` on the fixture of `test_parallel.py` and saves the result.

Run as a script in a fresh process, so that XLA_FLAGS (set before JAX starts) can give it
several fake CPU devices: `python tests/sharded_explain_main.py OUT.npz`.
"""

import sys

import jax
import numpy as np

from pfc_jax import parallel

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import test_parallel  # pylint: disable=g-import-not-at-top,wrong-import-position


def main(out_path: str) -> None:
  classifier, images, indices, config = test_parallel.fixture()
  explanation = parallel.sharded_explain(
      classifier, images, parallel.image_keys(test_parallel.SEED, indices), config)
  np.savez(out_path, device_count=jax.device_count(), **explanation._asdict())


if __name__ == "__main__":
  main(sys.argv[1])
