"""Built-in classifiers, looked up by name.

`classifier(name, variables)` wraps a built-in model and its weights (`pfc_jax.weights.load`)
into the `pfc_jax.Classifier` the pipeline takes. Any other Flax/JAX classifier plugs in by
building a `Classifier` directly.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
from typing import Any, NamedTuple

import flax.linen as nn
import numpy as np

from pfc_jax.classifier import IMAGENET_MEAN, IMAGENET_STD, Classifier
from pfc_jax.models.squeezenet import SqueezeNet1_1
from pfc_jax.models.vgg import VGG16

MODEL_NAMES = ("vgg16", "squeezenet1_1", "shapes_cnn", "shapes_vit")
PREPROCESSING = "preprocessing"  # Variables collection holding a non-default input convention.

__all__ = ["MODEL_NAMES", "PREPROCESSING", "SqueezeNet1_1", "VGG16", "class_names", "classifier",
           "input_size", "module"]


class _Spec(NamedTuple):
  module: nn.Module
  mean: tuple[float, ...]
  std: tuple[float, ...]
  input_size: int


def _spec(name: str) -> _Spec:
  """The module and default input normalisation of built-in model `name`."""
  if name == "vgg16":
    return _Spec(VGG16(), IMAGENET_MEAN, IMAGENET_STD, 224)
  if name == "squeezenet1_1":
    return _Spec(SqueezeNet1_1(), IMAGENET_MEAN, IMAGENET_STD, 224)
  if name == "shapes_cnn":
    from pfc_jax.models import shapes_cnn  # pylint: disable=import-outside-toplevel
    return _Spec(shapes_cnn.ShapesCNN(), shapes_cnn.MEAN, shapes_cnn.STD, 64)
  if name == "shapes_vit":
    from pfc_jax.models import vit  # pylint: disable=import-outside-toplevel
    return _Spec(vit.ShapesViT(), vit.MEAN, vit.STD, 64)
  raise ValueError(f"Unknown model {name!r}; choose from {MODEL_NAMES}.")


def module(name: str) -> nn.Module:
  """The Flax module of built-in model `name` (one of `MODEL_NAMES`)."""
  return _spec(name).module


def input_size(name: str) -> int:
  """Side in pixels of the square images built-in model `name` was trained on."""
  return _spec(name).input_size


class _Functions(NamedTuple):
  apply: Any
  features: Any
  head: Any
  attention: Any  # None for models without attention (the CNNs).


@functools.cache
def _functions(name: str) -> _Functions:
  """`apply`, `features`, `head` and, for transformers, `attention` of model `name`, one
  object each per process.

  `Classifier` keeps these as static fields, so two classifiers of the same model share one
  compilation.
  """
  model = module(name)
  attention = getattr(type(model), "attention", None)
  return _Functions(
      model.apply,
      functools.partial(model.apply, method=type(model).features),
      functools.partial(model.apply, method=type(model).head),
      functools.partial(model.apply, method=attention) if attention is not None else None)


def classifier(name: str, params: Any) -> Classifier:
  """The `Classifier` of built-in model `name` with its variables from `pfc_jax.weights.load`.

  When the variables carry a `"preprocessing"` collection (`mean [3]`, `std [3]`, `bgr []`, as
  Keras' Caffe-converted VGG16 weights do), that input convention replaces the model's default
  and the collection is left out of `Classifier.params`; users feed RGB in [0, 1] either way.

  Args:
    name: One of `MODEL_NAMES`.
    params: The model's variables, `{"params": ...}` and optionally `"preprocessing"`.

  Returns:
    A Classifier with `apply_fn`, `features_fn` and `head_fn` filled in, and `attention_fn`
    for shapes_vit; classifiers of the same model share these functions, hence their jit
    compilations.
  """
  spec = _spec(name)
  functions = _functions(name)
  variables = dict(params)
  convention = variables.pop(PREPROCESSING, None)
  mean, std, bgr = spec.mean, spec.std, False
  if convention is not None:
    mean = tuple(np.asarray(convention["mean"]).tolist())
    std = tuple(np.asarray(convention["std"]).tolist())
    bgr = bool(np.asarray(convention["bgr"]))
  return Classifier(functions.apply, variables, mean=mean, std=std, bgr=bgr,
                    features_fn=functions.features, head_fn=functions.head,
                    attention_fn=functions.attention)


@functools.cache
def _imagenet_class_names() -> tuple[str, ...]:
  text = importlib.resources.files("pfc_jax").joinpath("assets/imagenet_class_index.json")
  index = json.loads(text.read_text())
  return tuple(index[str(i)][1] for i in range(len(index)))


def class_names(name: str) -> list[str]:
  """Class names of built-in model `name`, indexed by logit (ImageNet-1k's for vgg16)."""
  if name in ("vgg16", "squeezenet1_1"):
    return list(_imagenet_class_names())
  if name in ("shapes_cnn", "shapes_vit"):
    from pfc_jax.benchmarks import shapes  # pylint: disable=import-outside-toplevel
    return list(shapes.CLASS_NAMES)
  raise ValueError(f"Unknown model {name!r}; choose from {MODEL_NAMES}.")
