"""The accelerator layout ("map") trains each image's coalition network with dense convolutions.

Under `vmap`, each image's own kernels make every convolution a grouped one
(`feature_group_count` = images in the forward pass, `batch_group_count` in the kernel
gradient), whose backward pass XLA:GPU runs slowly. The "map" layout, what `batching="auto"`
picks on GPU and TPU, must hold none: its step is compiled here for 4 images on the CPU and
the optimised HLO is searched.
"""

import re

import jax
import numpy as np

from pfc_jax import _loop, coalitions, perturbation
from pfc_jax.coalitions import CoalitionConfig

CONFIG = CoalitionConfig.tiny(max_steps=2)  # The whole network trained, as in "paper".
_GROUPED = re.compile(r"(feature|batch)_group_count=([0-9]+)")


def _grouped_convolutions(hlo: str) -> list[str]:
  return [match.group(0) for match in _GROUPED.finditer(hlo) if int(match.group(2)) > 1]


def _inputs(batch: int = 4):
  images = np.random.default_rng(0).random((batch, 16, 16, 3), np.float32)
  return images, jax.random.split(jax.random.key(0), batch)


def test_map_layout_has_no_grouped_convolutions():
  program = _loop.map_program(coalitions._STAGE, CONFIG.max_steps)
  hlo = program.lower(CONFIG, None, _inputs()).compile().as_text()
  assert "convolution(" in hlo
  assert not _grouped_convolutions(hlo)


def test_vmap_layout_has_grouped_convolutions():
  """The check above can fail: the vmapped step's convolutions are grouped."""
  images, keys = _inputs()
  states = jax.vmap(lambda image, key: coalitions._prepare(CONFIG, image, key, None))(images, keys)
  step = _loop.jit_step(_loop._paired_step(coalitions._stage_step, batched=True))
  hlo = step.lower(CONFIG, (None, states)).compile().as_text()
  assert _grouped_convolutions(hlo)


def test_perturbation_map_layout_has_no_grouped_convolutions():
  classifier = perturbation.Classifier(
      lambda params, x: jax.lax.conv_general_dilated(
          x, params, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")).mean((1, 2)),
      np.ones((3, 3, 3, 4), np.float32))
  config = perturbation.PerturbConfig(steps=2, noise_samples=2)
  images, keys = _inputs()
  labels = np.zeros((4, 16, 16), np.int32)
  hyper = jax.tree.map(lambda v: np.full(4, v, np.float32),
                       perturbation.Hyperparameters.from_config(config))
  program = _loop.map_program(perturbation._STAGE, config.steps)
  hlo = program.lower(config, classifier, (images, labels, keys, hyper)).compile().as_text()
  assert "convolution(" in hlo and not _grouped_convolutions(hlo)
