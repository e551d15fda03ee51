"""Shared fixtures: random full-size VGG16 weights are costly, so they are drawn once."""

from __future__ import annotations

import pytest
import safetensors.numpy

import reference_numpy as ref
from pfc_jax import weights


@pytest.fixture(scope="session")
def vgg16(tmp_path_factory):
  """`(state, path, variables)`: random torchvision VGG16 weights, their .safetensors file and
  their Flax variables from `weights.load`."""
  state = ref.vgg16_state_dict(seed=0)
  path = tmp_path_factory.mktemp("vgg16") / "vgg16_torchvision.safetensors"
  safetensors.numpy.save_file(state, path)
  return state, path, weights.load("vgg16", path)
