"""Pretrained weights: read every common layout, convert to Flax variables, cache, download.

`load(name, source)` returns the variables `{"params": ...}` of `pfc_jax.models.module(name)`,
whatever layout `source` is in:

- a PyTorch state dict `.pth` / `.pt` in torchvision's key layout (needs torch);
- a `.safetensors` file in torchvision's layout, in timm's (`vgg16.tv_in1k`), or in pfc-jax's
  own (flat keys `"params/conv1_1/kernel"`, written by `save`);
- Keras' `vgg16_weights_tf_dim_ordering_tf_kernels.h5` (needs h5py): Caffe-converted weights
  trained on BGR input minus the Caffe means, so the variables carry that convention in a
  `"preprocessing"` collection (`mean [3]`, `std [3]`, `bgr []`, all float32) that
  `pfc_jax.models.classifier` applies; users feed RGB in [0, 1] whatever the source;
- a directory written by `save` (orbax-checkpoint).

Layout conversions (torch is NCHW, Flax NHWC): convolution OIHW -> HWIO; linear `[out, in]` ->
`[in, out]`; torchvision's fc6 `[4096, 25088]` flattens a CHW map, so it becomes
`W.reshape(4096, 512, 7, 7).transpose(2, 3, 1, 0).reshape(25088, 4096)` for an HWC flatten.

`source=None` reads the converted weights from the cache directory (`$PFC_JAX_CACHE`, default
`~/.cache/pfc_jax`), downloading and converting them once when they are not there.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
import os
import pickle
import socket
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from pfc_jax import models
from pfc_jax.io import atomic_path
from pfc_jax.models import squeezenet, vgg

CACHE_ENV = "PFC_JAX_CACHE"
DEFAULT_CACHE = "~/.cache/pfc_jax"

# sha256 of `model.safetensors` in the Hugging Face hub repository timm/vgg16.tv_in1k (528 MB,
# torchvision's IMAGENET1K_V1 VGG16 weights); it must equal the digest the hub lists for that file.
VGG16_TIMM_SHA256 = "57b026918159a6bf9faf8405c3a551903768e7138989d9c6224a14227203fad8"

# Keras' VGG16 (converted from Caffe): BGR in [0, 255] minus these per-channel means.
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)

_CAFFE_PREPROCESSING = {
    "mean": np.array(CAFFE_BGR_MEAN, np.float32) / 255.0,
    "std": np.full(3, 1.0 / 255.0, np.float32),
    "bgr": np.array(1.0, np.float32),
}
_PREPROCESSING_SHAPES = {"mean": (3,), "std": (3,), "bgr": ()}

LAYOUTS = {
    "vgg16": ("torchvision", "timm", "keras", "pfc-jax"),
    "squeezenet1_1": ("torchvision", "pfc-jax"),
    "shapes_cnn": ("pfc-jax",),
    "shapes_vit": ("pfc-jax",),
}
# Models whose weights ship with pfc-jax, as package data under `pfc_jax/assets/`.
PACKAGED = {"shapes_cnn": "assets/shapes_cnn.safetensors",
            "shapes_vit": "assets/shapes_vit.safetensors"}

__all__ = ["CACHE_ENV", "LAYOUTS", "PACKAGED", "VGG16_TIMM_SHA256", "cache_dir", "load", "save"]


# --- Layout conversions ------------------------------------------------------------------------


class _Transform(NamedTuple):
  """How one source array becomes one Flax array."""

  to_flax: Callable[[np.ndarray], np.ndarray]
  source_shape: Callable[[tuple[int, ...]], tuple[int, ...]]  # From the Flax array's shape.


_IDENTITY = _Transform(lambda a: a, lambda s: s)
_CONV_OIHW = _Transform(lambda a: a.transpose(2, 3, 1, 0), lambda s: (s[3], s[2], s[0], s[1]))
_LINEAR = _Transform(lambda a: a.T, lambda s: (s[1], s[0]))


def _fc6_from_torchvision(weight: np.ndarray) -> np.ndarray:
  """`[4096, 25088]` over a CHW flatten -> `[25088, 4096]` over an HWC flatten.

  Equal to `weight.reshape(4096, 512, 7, 7).transpose(2, 3, 1, 0).reshape(25088, 4096)`; a
  column gather then a 2D transpose is twice as fast on CPU.
  """
  cells = vgg.POOLED_SIZE**2
  chw_index = np.arange(weight.shape[1]).reshape(-1, cells).T.ravel()  # At each HWC position.
  return weight[:, chw_index].T


_FC6_TORCHVISION = _Transform(_fc6_from_torchvision, lambda s: (s[1], s[0]))
_FC6_TIMM = _Transform(  # A 7x7 convolution over the pooled map.
    lambda a: _fc6_from_torchvision(a.reshape(a.shape[0], -1)),
    lambda s: (s[1], s[0] // vgg.POOLED_SIZE**2, vgg.POOLED_SIZE, vgg.POOLED_SIZE))
_LINEAR_1X1 = _Transform(lambda a: a[:, :, 0, 0].T, lambda s: (s[1], s[0], 1, 1))


class _Entry(NamedTuple):
  source_key: str
  target: tuple[str, ...]  # Path in the Flax variables.
  transform: _Transform


def _layer(source: str, target: str, kernel: _Transform) -> list[_Entry]:
  """Kernel and bias entries of one layer: torch-style `{source}.weight` / `{source}.bias` to
  Flax `params/{target}/kernel` / `bias` (`target` may hold "/", e.g. "fire2/squeeze")."""
  path = ("params", *target.split("/"))
  return [_Entry(f"{source}.weight", (*path, "kernel"), kernel),
          _Entry(f"{source}.bias", (*path, "bias"), _IDENTITY)]


_SQUEEZENET_FIRE_INDICES = (3, 4, 6, 7, 9, 10, 11, 12)  # torchvision's `features.{i}` Fires.


def _vgg16_torch_convs() -> list[_Entry]:
  """torchvision's `features.{i}` convolutions: each conv and ReLU take 2 indices, a pool 1."""
  entries, index = [], 0
  for block in vgg.BLOCKS:
    for name in block:
      entries += _layer(f"features.{index}", name, _CONV_OIHW)
      index += 2
    index += 1
  return entries


def _entries(name: str, layout: str, shapes: Mapping[tuple[str, ...], Any]) -> list[_Entry]:
  """The source keys of `layout` for model `name` and where each goes."""
  if layout == "pfc-jax":
    return [_Entry("/".join(path), path, _IDENTITY) for path in shapes]
  if (name, layout) == ("vgg16", "torchvision"):
    return (_vgg16_torch_convs() + _layer("classifier.0", "fc6", _FC6_TORCHVISION)
            + _layer("classifier.3", "fc7", _LINEAR) + _layer("classifier.6", "fc8", _LINEAR))
  if (name, layout) == ("vgg16", "timm"):
    return (_vgg16_torch_convs() + _layer("pre_logits.fc1", "fc6", _FC6_TIMM)
            + _layer("pre_logits.fc2", "fc7", _LINEAR_1X1) + _layer("head.fc", "fc8", _LINEAR))
  if (name, layout) == ("vgg16", "keras"):
    keras_names = [f"block{b + 1}_conv{n + 1}" for b, block in enumerate(vgg.BLOCKS)
                   for n in range(len(block))] + ["fc1", "fc2", "predictions"]
    flax_names = list(vgg.CONV_NAMES) + ["fc6", "fc7", "fc8"]
    return [_Entry(f"{keras}/{part}", ("params", flax, part), _IDENTITY)
            for keras, flax in zip(keras_names, flax_names) for part in ("kernel", "bias")]
  if (name, layout) == ("squeezenet1_1", "torchvision"):
    entries = _layer("features.0", "conv1", _CONV_OIHW)
    for index, (fire, _, _) in zip(_SQUEEZENET_FIRE_INDICES, squeezenet.FIRES):
      for part in ("squeeze", "expand1x1", "expand3x3"):
        entries += _layer(f"features.{index}.{part}", f"{fire}/{part}", _CONV_OIHW)
    return entries + _layer("classifier.1", "conv10", _CONV_OIHW)
  raise ValueError(f"Model {name!r} has no weights in {layout} layout; supported: "
                   f"{LAYOUTS[name]}.")


def _variable_shapes(name: str) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Path -> shape of every variable of model `name`."""
  size = models.input_size(name)
  variables = jax.eval_shape(
      models.module(name).init, jax.random.key(0), jnp.zeros((1, size, size, 3), jnp.float32))
  return {tuple(k.key for k in path): leaf.shape
          for path, leaf in jax.tree_util.tree_leaves_with_path(variables)}


def _unflatten(flat: Mapping[tuple[str, ...], np.ndarray]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = value
  return tree


def _flatten(variables: Any) -> dict[str, np.ndarray]:
  """`{"params/conv1_1/kernel": array, ...}` of a variables pytree of nested dicts."""
  return {"/".join(str(k.key) for k in path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(variables)}


def _preview(keys: list[str]) -> str:
  return ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")


def _convert(name: str, layout: str, arrays: Mapping[str, np.ndarray], source: str) -> dict:
  """Flax variables of model `name` from `arrays` in `layout`, checking every key and shape.

  Raises:
    ValueError: naming `source` and the missing or unexpected keys, or the key whose shape is
      wrong with the expected and the actual shape.
  """
  shapes = _variable_shapes(name)
  has_convention = any(k.startswith(models.PREPROCESSING + "/") for k in arrays)
  if layout == "pfc-jax" and has_convention:
    shapes.update({(models.PREPROCESSING, k): s for k, s in _PREPROCESSING_SHAPES.items()})
  entries = _entries(name, layout, shapes)
  expected = {entry.source_key for entry in entries}
  missing, unexpected = sorted(expected - arrays.keys()), sorted(arrays.keys() - expected)
  if missing or unexpected:
    raise ValueError(
        f"Weights {source!r} ({layout} layout) do not match {name}: "
        f"missing keys [{_preview(missing)}]; unexpected keys [{_preview(unexpected)}].")
  flat = {}
  for entry in entries:
    array = np.asarray(arrays[entry.source_key])
    want = tuple(entry.transform.source_shape(shapes[entry.target]))
    if array.shape != want:
      raise ValueError(
          f"Weights {source!r} ({layout} layout): key {entry.source_key!r} has shape "
          f"{array.shape}, expected {want} for {name}.")
    flat[entry.target] = np.require(entry.transform.to_flax(array), np.float32, "C")
  variables = _unflatten(flat)
  if layout == "keras":
    variables[models.PREPROCESSING] = {k: v.copy() for k, v in _CAFFE_PREPROCESSING.items()}
  return variables


# --- Readers -----------------------------------------------------------------------------------


def _read_torch(path: Path) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
        f"Reading {str(path)!r}, a PyTorch state dict, needs torch: `pip install torch` (the "
        "CPU build is enough), or use the weights as .safetensors (`pfc-jax convert-weights` "
        "writes them where torch is installed).") from e
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
    raise ValueError(f"Cannot read {str(path)!r} as a PyTorch state dict: {e}") from e
  if not isinstance(state, Mapping):
    raise ValueError(f"{str(path)!r} holds a {type(state).__name__}, not a state dict.")
  return {k: v.detach().cpu().float().numpy() for k, v in state.items()}


def _read_keras(path: Path) -> dict[str, np.ndarray]:
  """`{"{layer}/kernel": ..., "{layer}/bias": ...}` of a Keras HDF5 weights file."""
  try:
    import h5py  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
        f"Reading {str(path)!r}, a Keras HDF5 file, needs h5py: `pip install h5py`.") from e
  try:
    file = h5py.File(path, "r")
  except OSError as e:
    raise ValueError(f"Cannot read {str(path)!r} as an HDF5 file: {e}") from e
  arrays = {}
  with file:
    root = file["model_weights"] if "model_weights" in file else file  # Whole-model files.
    for layer, group in root.items():
      names = [n.decode() if isinstance(n, bytes) else str(n)
               for n in group.attrs.get("weight_names", ())]
      parts = ("kernel", "bias") if len(names) == 2 else names  # Keras stores kernel, bias.
      for part, weight_name in zip(parts, names):
        arrays[f"{layer}/{part}"] = np.asarray(group[weight_name])
  return arrays


def _read_orbax(path: Path) -> dict[str, np.ndarray]:
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  with ocp.StandardCheckpointer() as checkpointer:
    return _flatten(checkpointer.restore(path.resolve()))


def _read(path: Path) -> tuple[str, dict[str, np.ndarray]]:
  """The layout and the arrays (by source key) of weights file or directory `path`."""
  if path.is_dir():
    if not (path / "_CHECKPOINT_METADATA").exists():
      raise ValueError(f"Directory {str(path)!r} is not an orbax checkpoint written by "
                       "pfc_jax.weights.save.")
    return "pfc-jax", _read_orbax(path)
  if not path.is_file():
    raise FileNotFoundError(f"Weights file {str(path)!r} does not exist.")
  suffix = path.suffix.lower()
  if suffix == ".safetensors":
    try:
      arrays = safetensors.numpy.load_file(path)
    except safetensors.SafetensorError as e:
      raise ValueError(f"Cannot read {str(path)!r} as safetensors: {e}") from e
    if any(key.startswith("params/") for key in arrays):
      return "pfc-jax", arrays
    return ("timm" if "head.fc.weight" in arrays else "torchvision"), arrays
  if suffix in (".pth", ".pt"):
    return "torchvision", _read_torch(path)
  if suffix in (".h5", ".hdf5"):
    return "keras", _read_keras(path)
  raise ValueError(
      f"Weights {str(path)!r}: unknown format {suffix or '(no suffix)'!r}; expected a .pth, "
      ".safetensors or .h5 file or an orbax checkpoint directory.")


# --- Cache and downloads -----------------------------------------------------------------------


class _Download(NamedTuple):
  """A published weights file."""

  url: str
  filename: str  # Its name under `cache_dir() / "downloads"`.
  sha256: str  # Its full sha256, or the prefix torchvision embeds in its file names.
  needs_torch: bool  # Whether reading it needs torch.
  hub_repo: str | None = None  # Hugging Face hub repository, fetched with huggingface_hub.


def _downloads(name: str) -> tuple[_Download, ...]:
  """Where model `name`'s published weights come from, in order of preference."""
  if name == "vgg16":
    return (
        _Download("https://huggingface.co/timm/vgg16.tv_in1k/resolve/main/model.safetensors",
                  "vgg16.tv_in1k.safetensors", VGG16_TIMM_SHA256, False, "timm/vgg16.tv_in1k"),
        _Download("https://download.pytorch.org/models/vgg16-397923af.pth",
                  "vgg16-397923af.pth", "397923af", True))
  return (_Download("https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth",
                    "squeezenet1_1-b8a52dc0.pth", "b8a52dc0", True),)


def cache_dir() -> Path:
  """`$PFC_JAX_CACHE`, or `~/.cache/pfc_jax` when the variable is unset or empty."""
  return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def _sha256(path: Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _verify(path: Path, download: _Download) -> None:
  actual = _sha256(path)
  if not actual.startswith(download.sha256):
    raise ValueError(
        f"Checksum mismatch for {download.filename} ({download.url}): sha256 {actual}, "
        f"expected {download.sha256}{'' if len(download.sha256) == 64 else '...'}.")


def _fetch(download: _Download, dest: Path) -> None:
  """Downloads `download` to `dest`, unverified.

  Raises:
    OSError: the host's name does not resolve (no network: checked first, because the hub
      client would retry a failed lookup for about 20 s; not checked behind a proxy, which
      resolves it), or the download fails.
  """
  parts = urllib.parse.urlsplit(download.url)
  if parts.scheme not in urllib.request.getproxies():
    try:
      socket.getaddrinfo(parts.hostname, 443)
    except OSError as e:  # socket.gaierror
      raise OSError(f"cannot resolve {parts.hostname} ({e})") from e
  if download.hub_repo:
    from huggingface_hub import hf_hub_download  # pylint: disable=import-outside-toplevel
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
      os.replace(hf_hub_download(download.hub_repo, download.url.rsplit("/", 1)[-1],
                                 local_dir=tmp), dest)
  else:
    urllib.request.urlretrieve(download.url, dest)


def _has_torch() -> bool:
  return importlib.util.find_spec("torch") is not None


def _downloaded_file(name: str) -> Path:
  """A verified published weights file of model `name`: already in the cache, or downloaded.

  Raises:
    FileNotFoundError: offline, saying which file to fetch from where and where to put it.
    ValueError: a cached file's checksum is wrong, or every download had a wrong one (each is
      deleted and the next source tried first).
  """
  folder = cache_dir() / "downloads"
  for download in _downloads(name):
    if (folder / download.filename).is_file():
      _verify(folder / download.filename, download)
      return folder / download.filename
  errors, checksum_failed = [], False
  for download in _downloads(name):
    if download.needs_torch and not _has_torch():
      errors.append(f"{download.url}: skipped, reading it needs torch")
      continue
    dest = folder / download.filename
    try:
      with atomic_path(dest) as tmp:
        _fetch(download, tmp)
        _verify(tmp, download)
      return dest
    except (OSError, ValueError) as e:  # No network, HTTP errors (huggingface_hub's are
      errors.append(f"{download.url}: {e}")  # OSErrors too), a checksum mismatch: try the next.
      checksum_failed |= isinstance(e, ValueError)
  readable = [d for d in _downloads(name) if not d.needs_torch or _has_torch()]
  if readable:
    options = " or ".join(f"{d.url} saved as {folder / d.filename}" for d in readable)
    advice = f"Fetch {options} and try again, or pass a weights file."
  else:
    pth = _downloads(name)[0]
    advice = (
        f"Its published weights, {pth.url}, are a PyTorch .pth, which needs torch (`pip install "
        f"torch`); without torch, pass a {name} weights file in torchvision layout as "
        f".safetensors, e.g. written where torch is installed by `pfc-jax convert-weights "
        f"{pth.filename} {name}.safetensors --model {name}`.")
  raise (ValueError if checksum_failed else FileNotFoundError)(
      f"No {name} weights in the cache ({cache_dir()}) and none could be downloaded "
      f"({'; '.join(errors)}). {advice}")


def _load_cached(name: str) -> dict:
  converted = cache_dir() / f"{name}.safetensors"
  if converted.is_file():
    return load(name, converted)
  variables = load(name, _downloaded_file(name))
  save(variables, converted)
  return variables


# --- Public API --------------------------------------------------------------------------------


def load(name: str, source: str | os.PathLike | None = None) -> dict:
  """Flax variables of built-in model `name` from weights in any supported layout.

  Args:
    name: One of `pfc_jax.models.MODEL_NAMES`.
    source: A weights file or orbax directory (layout detected from its suffix and keys), or
      None: vgg16 and squeezenet1_1 from the cache, downloaded and converted on first use
      (vgg16 from the Hugging Face hub, or torchvision's .pth with torch; squeezenet1_1 from
      torchvision, needs torch); shapes_cnn and shapes_vit from the weights packaged with
      pfc-jax (`PACKAGED`).

  Returns:
    `{"params": ...}` numpy float32 arrays such that `models.module(name).apply(variables, x)`
    gives the logits, plus a `"preprocessing"` collection for Caffe-convention weights.

  Raises:
    ValueError: unknown `name`, unsupported layout, or missing, unexpected or misshapen keys
      (naming the key and both shapes).
    ImportError: a .pth without torch, or an .h5 without h5py.
    FileNotFoundError: `source` does not exist, or no weights are cached and the download fails.
  """
  if name not in models.MODEL_NAMES:
    raise ValueError(f"Unknown model `name` {name!r}; choose from {models.MODEL_NAMES}.")
  if source is None:
    if name in PACKAGED:
      asset = importlib.resources.files("pfc_jax").joinpath(PACKAGED[name])
      with importlib.resources.as_file(asset) as path:
        return load(name, path)
    return _load_cached(name)
  path = Path(source).expanduser()
  layout, arrays = _read(path)
  if layout not in LAYOUTS[name]:
    raise ValueError(f"Weights {str(path)!r} are in {layout} layout, which {name} does not "
                     f"have; supported: {LAYOUTS[name]}.")
  return _convert(name, layout, arrays, str(path))


def save(variables: Any, path: str | os.PathLike) -> None:
  """Writes variables (nested dicts of arrays) for `load`.

  Args:
    variables: e.g. `{"params": ..., "preprocessing": ...}` as `load` returns.
    path: Ending in `.safetensors`: one flat file, keys joined by "/" (`"params/conv1_1/kernel"`),
      written atomically. Otherwise an orbax-checkpoint directory, replaced if it exists.
  """
  path = Path(path).expanduser()
  if path.suffix == ".safetensors":
    flat = {k: np.require(v, requirements="C") for k, v in _flatten(variables).items()}
    with atomic_path(path) as tmp:
      safetensors.numpy.save_file(flat, str(tmp))
    return
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path.resolve(), jax.tree_util.tree_map(np.asarray, variables), force=True)
