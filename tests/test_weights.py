"""Weights: every layout converts to the same Flax variables, whose logits match numpy's NCHW."""

from __future__ import annotations

import argparse
import hashlib
import shutil
import socket
import sys
import urllib.request

import huggingface_hub
import jax
import numpy as np
import pytest
import safetensors.numpy

import reference_numpy as ref
from pfc_jax import cli, models, weights
from pfc_jax.commands import convert_weights

TOLERANCE = 1e-4  # Relative max logit difference.
CAFFE_BGR_MEAN = np.array([103.939, 116.779, 123.68], np.float32)


@jax.jit
def _apply_vgg16(variables, x):
  return models.VGG16().apply(variables, x)


@jax.jit
def _apply_squeezenet(variables, x):
  return models.SqueezeNet1_1().apply(variables, x)


def _images(seed: int, height: int, width: int, batch: int = 2) -> np.ndarray:
  """Normalised-looking NHWC inputs."""
  return np.random.default_rng(seed).standard_normal((batch, height, width, 3), np.float32)


def _nchw(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _assert_same_params(actual: dict, expected: dict) -> None:
  flat_actual = dict(jax.tree_util.tree_leaves_with_path(actual["params"]))
  flat_expected = dict(jax.tree_util.tree_leaves_with_path(expected["params"]))
  assert flat_actual.keys() == flat_expected.keys()
  for path, value in flat_expected.items():
    assert np.array_equal(flat_actual[path], value), jax.tree_util.keystr(path)


def _save_pth(state: dict[str, np.ndarray], path) -> None:
  torch = pytest.importorskip("torch")
  torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)


# --- VGG16 layouts -------------------------------------------------------------------------------


def _vgg16_timm(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """timm's vgg16.tv_in1k layout: fc6 as a 7x7 convolution, fc7 as a 1x1 one."""
  timm = {k: v for k, v in state.items() if k.startswith("features.")}
  timm["pre_logits.fc1.weight"] = state["classifier.0.weight"].reshape(4096, 512, 7, 7)
  timm["pre_logits.fc2.weight"] = state["classifier.3.weight"][:, :, None, None]
  timm["head.fc.weight"] = state["classifier.6.weight"]
  for torch_name, timm_name in (("0", "pre_logits.fc1"), ("3", "pre_logits.fc2"),
                                ("6", "head.fc")):
    timm[f"{timm_name}.bias"] = state[f"classifier.{torch_name}.bias"]
  return timm


def _write_keras_h5(state: dict[str, np.ndarray], path) -> None:
  """Keras' vgg16_weights_tf_dim_ordering_tf_kernels.h5 structure for torchvision weights."""
  h5py = pytest.importorskip("h5py")
  layers = {}
  block, conv = 1, 0
  for index, _, _ in ref.VGG16_CONVS:
    conv += 1
    weight = state[f"features.{index}.weight"]
    layers[f"block{block}_conv{conv}"] = (np.einsum("oihw->hwio", weight),
                                          state[f"features.{index}.bias"])
    if index in ref.VGG16_POOLS_AFTER:
      block, conv = block + 1, 0
  # Keras flattens the 7x7x512 map as (row, column, channel), torch as (channel, row, column).
  chw_index_of_hwc = np.arange(512 * 49).reshape(512, 7, 7).transpose(1, 2, 0).ravel()
  layers["fc1"] = (state["classifier.0.weight"][:, chw_index_of_hwc].T,
                   state["classifier.0.bias"])
  layers["fc2"] = (state["classifier.3.weight"].T, state["classifier.3.bias"])
  layers["predictions"] = (state["classifier.6.weight"].T, state["classifier.6.bias"])
  with h5py.File(path, "w") as f:
    f.attrs["layer_names"] = [name.encode() for name in ["input_1", *layers, "flatten"]]
    f.create_group("input_1").attrs["weight_names"] = []
    f.create_group("flatten").attrs["weight_names"] = []
    for name, (kernel, bias) in layers.items():
      group = f.create_group(name)
      names = [f"{name}_W_1:0", f"{name}_b_1:0"]
      group.attrs["weight_names"] = [n.encode() for n in names]
      group.create_dataset(names[0], data=kernel)
      group.create_dataset(names[1], data=bias)


@pytest.fixture(scope="module")
def vgg16_small_logits(vgg16):
  """Reference logits at a size whose 1x3 last map makes the adaptive pooling repeat rows and
  overlap columns."""
  x = _images(1, 32, 96)
  return x, ref.vgg16(vgg16[0], _nchw(x))


def test_vgg16_parity_224(vgg16):
  state, _, variables = vgg16
  x = _images(0, 224, 224, batch=1)
  expected = ref.vgg16(state, _nchw(x))
  assert ref.relative_difference(np.asarray(_apply_vgg16(variables, x)), expected) <= TOLERANCE


@pytest.fixture(scope="module")
def vgg16_keras(vgg16, tmp_path_factory):
  """The random VGG16 weights written as Keras' .h5 and loaded back."""
  path = tmp_path_factory.mktemp("vgg16_keras") / "vgg16_weights_tf_dim_ordering_tf_kernels.h5"
  _write_keras_h5(vgg16[0], path)
  variables = weights.load("vgg16", path)
  path.unlink()
  return variables


@pytest.fixture(scope="module")
def vgg16_timm(vgg16, tmp_path_factory):
  """The random VGG16 weights written in timm's layout and loaded back."""
  path = tmp_path_factory.mktemp("vgg16_timm") / "model.safetensors"
  safetensors.numpy.save_file(_vgg16_timm(vgg16[0]), path)
  variables = weights.load("vgg16", path)
  path.unlink()
  return variables


# The .pth reader is checked on SqueezeNet: a VGG16 .pth only combines it with the torchvision
# key mapping checked by `vgg16`, at the cost of another 528 MB file.
@pytest.mark.parametrize("layout", ["timm", "keras"])
def test_vgg16_layouts_convert_identically(layout, vgg16, vgg16_small_logits, request):
  variables = request.getfixturevalue(f"vgg16_{layout}")
  _assert_same_params(variables, vgg16[2])
  x, reference = vgg16_small_logits
  logits = np.asarray(_apply_vgg16({"params": variables["params"]}, x))
  assert ref.relative_difference(logits, reference) <= TOLERANCE


def test_vgg16_adaptive_pooling_parity(vgg16, vgg16_small_logits):
  x, reference = vgg16_small_logits
  assert ref.relative_difference(np.asarray(_apply_vgg16(vgg16[2], x)), reference) <= TOLERANCE


def test_keras_weights_carry_caffe_convention(vgg16_keras):
  """RGB in [0, 1] reaches the network as Keras' `preprocess_input(mode="caffe")` of 0-255 RGB;
  with the parameters checked above, the logits follow."""
  classifier = models.classifier("vgg16", vgg16_keras)
  assert classifier.bgr and set(classifier.params) == {"params"}
  images01 = np.random.default_rng(3).uniform(size=(2, 8, 8, 3)).astype(np.float32)
  caffe_input = images01[..., ::-1] * 255.0 - CAFFE_BGR_MEAN
  np.testing.assert_allclose(classifier.normalize(images01), caffe_input, rtol=1e-5, atol=1e-3)


# --- SqueezeNet 1.1 -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def squeezenet(tmp_path_factory):
  state = ref.squeezenet1_1_state_dict(seed=1)
  path = tmp_path_factory.mktemp("squeezenet") / "squeezenet1_1.safetensors"
  safetensors.numpy.save_file(state, path)
  return state, path


@pytest.mark.parametrize("layout", ["torchvision", "torchvision-pth", "pfc-jax", "orbax"])
def test_squeezenet_parity_every_layout(layout, squeezenet, tmp_path):
  state, path = squeezenet
  if layout == "torchvision-pth":
    path = tmp_path / "squeezenet1_1.pth"
    _save_pth(state, path)
  elif layout in ("pfc-jax", "orbax"):
    path = tmp_path / ("squeezenet.safetensors" if layout == "pfc-jax" else "checkpoint")
    weights.save(weights.load("squeezenet1_1", squeezenet[1]), path)
  variables = weights.load("squeezenet1_1", path)
  # 224 px, and 66 px, where every ceil-mode pool keeps a partial window.
  for x in (_images(4, 224, 224, batch=1), _images(5, 66, 80)):
    expected = ref.squeezenet1_1(state, _nchw(x))
    logits = np.asarray(_apply_squeezenet(variables, x))
    assert ref.relative_difference(logits, expected) <= TOLERANCE


def _without(state, key):
  return {k: v for k, v in state.items() if k != key}


@pytest.mark.parametrize("change, message", [
    (lambda s: _without(s, "features.4.expand3x3.weight"), "features.4.expand3x3.weight"),
    (lambda s: {**s, "features.13.weight": np.zeros(3, np.float32)}, "features.13.weight"),
    (lambda s: {**s, "classifier.1.weight": np.zeros((10, 512, 1, 1), np.float32)},
     "'classifier.1.weight' has shape (10, 512, 1, 1), expected (1000, 512, 1, 1)"),
])
def test_key_errors_name_the_key_and_shapes(change, message, squeezenet, tmp_path):
  path = tmp_path / "bad.safetensors"
  safetensors.numpy.save_file(change(squeezenet[0]), path)
  with pytest.raises(ValueError, match="bad.safetensors") as error:
    weights.load("squeezenet1_1", path)
  assert message in str(error.value)


def test_pfc_layout_shape_error(squeezenet, tmp_path):
  path = tmp_path / "pfc.safetensors"
  weights.save(weights.load("squeezenet1_1", squeezenet[1]), path)
  arrays = safetensors.numpy.load_file(path)
  arrays["params/conv10/bias"] = np.zeros(7, np.float32)
  safetensors.numpy.save_file(arrays, path)
  message = r"'params/conv10/bias' has shape \(7,\), expected \(1000,\)"
  with pytest.raises(ValueError, match=message):
    weights.load("squeezenet1_1", path)


def test_pfc_layout_keeps_preprocessing(squeezenet, tmp_path):
  variables = weights.load("squeezenet1_1", squeezenet[1])
  variables[models.PREPROCESSING] = {"mean": np.array([0.1, 0.2, 0.3], np.float32),
                                     "std": np.full(3, 0.5, np.float32),
                                     "bgr": np.array(1.0, np.float32)}
  weights.save(variables, tmp_path / "with_convention.safetensors")
  loaded = weights.load("squeezenet1_1", tmp_path / "with_convention.safetensors")
  for key, value in variables[models.PREPROCESSING].items():
    np.testing.assert_array_equal(loaded[models.PREPROCESSING][key], value)
  _assert_same_params(loaded, variables)


def test_bad_sources(squeezenet, tmp_path, monkeypatch):
  with pytest.raises(ValueError, match="name"):
    weights.load("resnet50", squeezenet[1])
  with pytest.raises(FileNotFoundError, match="absent.pth"):
    weights.load("squeezenet1_1", tmp_path / "absent.pth")
  (tmp_path / "weights.npz").write_bytes(b"x")
  with pytest.raises(ValueError, match="weights.npz"):
    weights.load("squeezenet1_1", tmp_path / "weights.npz")
  timm = tmp_path / "timm.safetensors"
  safetensors.numpy.save_file({"head.fc.weight": np.zeros((2, 2), np.float32)}, timm)
  with pytest.raises(ValueError, match="timm layout"):
    weights.load("squeezenet1_1", timm)
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="orbax"):
    weights.load("squeezenet1_1", tmp_path / "empty")
  (tmp_path / "w.pth").write_bytes(b"x")
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(ImportError, match="pip install torch"):
    weights.load("squeezenet1_1", tmp_path / "w.pth")
  (tmp_path / "w.h5").write_bytes(b"x")
  monkeypatch.setitem(sys.modules, "h5py", None)
  with pytest.raises(ImportError, match="pip install h5py"):
    weights.load("squeezenet1_1", tmp_path / "w.h5")


@pytest.mark.parametrize("name, reader", [
    ("corrupt.safetensors", None), ("corrupt.pth", "torch"), ("corrupt.h5", "h5py")])
def test_corrupt_files_raise_naming_the_file(name, reader, tmp_path):
  if reader:
    pytest.importorskip(reader)
  (tmp_path / name).write_bytes(b"PK\x03\x04" + b"x" * 40)
  with pytest.raises(ValueError, match=name):
    weights.load("vgg16", tmp_path / name)


def test_convert_weights_command(squeezenet, tmp_path, capsys):
  parser = argparse.ArgumentParser()
  convert_weights.add_parser(parser.add_subparsers())
  dst = tmp_path / "converted.safetensors"
  args = parser.parse_args(["convert-weights", str(squeezenet[1]), str(dst),
                            "--model", "squeezenet1_1"])
  assert args.func(args) == 0
  _assert_same_params(weights.load("squeezenet1_1", dst),
                      weights.load("squeezenet1_1", squeezenet[1]))
  assert cli.main(["convert-weights", str(squeezenet[1]), str(dst), "--model", "vgg16"]) == 2
  assert "missing keys" in capsys.readouterr().err


# --- Cache and downloads ------------------------------------------------------------------------


def _sha256(path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def _fake_downloads(monkeypatch, source, sha256):
  """Makes squeezenet1_1 download `source` (a torchvision .safetensors) checked against sha256."""
  fetched = []

  def fetch(download, dest):
    fetched.append(download.url)
    shutil.copyfile(source, dest)

  download = weights._Download(
      "https://example.org/squeezenet.safetensors", "squeezenet.safetensors", sha256, False)
  monkeypatch.setattr(weights, "_downloads", lambda name: (download,))
  monkeypatch.setattr(weights, "_fetch", fetch)
  return fetched


def test_cache_downloads_verifies_converts_once(squeezenet, tmp_path, monkeypatch):
  monkeypatch.setenv(weights.CACHE_ENV, str(tmp_path / "cache"))
  fetched = _fake_downloads(monkeypatch, squeezenet[1], _sha256(squeezenet[1]))
  first = weights.load("squeezenet1_1")
  second = weights.load("squeezenet1_1")
  assert len(fetched) == 1
  assert (tmp_path / "cache" / "squeezenet1_1.safetensors").is_file()
  _assert_same_params(first, weights.load("squeezenet1_1", squeezenet[1]))
  _assert_same_params(second, first)


def test_cache_rejects_bad_checksum(squeezenet, tmp_path, monkeypatch):
  monkeypatch.setenv(weights.CACHE_ENV, str(tmp_path))
  _fake_downloads(monkeypatch, squeezenet[1], "0" * 64)
  with pytest.raises(ValueError, match="Checksum mismatch"):
    weights.load("squeezenet1_1")
  assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_vgg16_hub_checksum_is_verified(tmp_path, monkeypatch):
  monkeypatch.setenv(weights.CACHE_ENV, str(tmp_path))
  monkeypatch.setattr(weights, "_fetch", lambda download, dest: dest.write_bytes(b"fake"))
  monkeypatch.setattr(weights, "VGG16_TIMM_SHA256", hashlib.sha256(b"other").hexdigest())
  with pytest.raises(ValueError, match="vgg16.tv_in1k.safetensors"):
    weights.load("vgg16")
  monkeypatch.setattr(weights, "VGG16_TIMM_SHA256", hashlib.sha256(b"fake").hexdigest())
  with pytest.raises(ValueError, match="Cannot read .*vgg16.tv_in1k.safetensors"):
    weights.load("vgg16")  # Verified, kept, then read: the fake is no safetensors file.
  assert (tmp_path / "downloads" / "vgg16.tv_in1k.safetensors").read_bytes() == b"fake"


def test_offline_error_says_what_to_fetch_and_where(tmp_path, monkeypatch):
  monkeypatch.setenv(weights.CACHE_ENV, str(tmp_path))

  def offline(download, dest):
    raise OSError("network unreachable")

  monkeypatch.setattr(weights, "_fetch", offline)
  with pytest.raises(FileNotFoundError) as error:
    weights.load("vgg16")
  message = str(error.value)
  assert "https://huggingface.co/timm/vgg16.tv_in1k/resolve/main/model.safetensors" in message
  assert str(tmp_path / "downloads" / "vgg16.tv_in1k.safetensors") in message


def test_unresolvable_host_fails_before_any_download(tmp_path, monkeypatch):
  monkeypatch.setenv(weights.CACHE_ENV, str(tmp_path))
  for name in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
    monkeypatch.delenv(name, raising=False)

  def no_dns(host, port, *args, **kwargs):
    raise socket.gaierror(-2, "Name or service not known")

  def download(*args, **kwargs):
    raise AssertionError("no download may start when the host does not resolve")

  monkeypatch.setattr(socket, "getaddrinfo", no_dns)
  monkeypatch.setattr(urllib.request, "urlretrieve", download)
  monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
  with pytest.raises(FileNotFoundError, match="cannot resolve huggingface.co"):
    weights.load("vgg16")
