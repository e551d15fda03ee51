"""`pfc-jax convert-weights` without DST: weights/ of the checkout, else the weights cache."""

import importlib.resources

import numpy as np

from pfc_jax import cli, weights
from pfc_jax.commands import convert_weights


def _checkout(root):
  """A folder laid out as a pfc-jax checkout."""
  (root / "pfc_jax").mkdir(parents=True)
  (root / "pfc_jax" / "__init__.py").write_text("")
  (root / "pyproject.toml").write_text("[project]\nname = 'pfc-jax'\n")
  (root / "weights").mkdir()
  return root


def _same(a, b):
  leaves = lambda v: dict(weights._flatten(v))  # pylint: disable=protected-access
  assert leaves(a).keys() == leaves(b).keys()
  for key, value in leaves(a).items():
    np.testing.assert_array_equal(value, leaves(b)[key], err_msg=key)


def test_default_output_is_the_checkouts_weights_folder(tmp_path, monkeypatch):
  root = _checkout(tmp_path / "clone")
  (root / "docs" / "deep").mkdir(parents=True)
  assert convert_weights.default_output("vgg16", root / "docs" / "deep") == (
      root.resolve() / "weights" / "vgg16.safetensors")
  monkeypatch.setenv(weights.CACHE_ENV, str(tmp_path / "cache"))
  cached = tmp_path / "cache" / "vgg16.safetensors"
  assert convert_weights.default_output("vgg16", tmp_path) == cached
  (root / "weights").rmdir()  # A folder without weights/ is no checkout.
  assert convert_weights.default_output("vgg16", root) == cached


def test_command_without_dst_writes_into_the_checkout(tmp_path, monkeypatch, capsys):
  root = _checkout(tmp_path / "clone")
  monkeypatch.chdir(root / "pfc_jax")
  asset = importlib.resources.files("pfc_jax").joinpath("assets/shapes_cnn.safetensors")
  with importlib.resources.as_file(asset) as src:
    assert cli.main(["convert-weights", str(src), "--model", "shapes_cnn"]) == 0
  written = root / "weights" / "shapes_cnn.safetensors"
  assert str(written.resolve()) in capsys.readouterr().out
  _same(weights.load("shapes_cnn", written), weights.load("shapes_cnn"))
