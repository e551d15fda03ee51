"""The classifier contract: one pytree that the whole pipeline takes."""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Classifier:
  """An image classifier with its input normalisation.

  A pytree: `params` are its leaves; `apply_fn`, `mean`, `std` and `bgr` are static, so a
  Classifier passes through `jax.jit` and `jax.vmap` as an argument and equal static parts
  share one compilation. Keep `apply_fn` the same object across calls (a module-level function
  or `models.classifier`'s cached one) to avoid recompiling.

  Attributes:
    apply_fn: `apply_fn(params, x) -> logits [B, C]` for normalised NHWC images `x [B, H, W, 3]`.
    params: The classifier's variables (any pytree of arrays).
    mean: Per-channel mean subtracted after scaling, in the model's channel order.
    std: Per-channel standard deviation divided by, in the model's channel order.
    bgr: Whether the model expects BGR channel order (Caffe-converted weights such as Keras').
    features_fn: Optional `features_fn(params, x) -> activations [B, h, w, K]` of the layer that
      class-activation methods (Grad-CAM, Score-CAM) read, usually the last convolution.
    head_fn: Optional `head_fn(params, activations) -> logits [B, C]`, the rest of the network,
      so that `head_fn(params, features_fn(params, x)) == apply_fn(params, x)`.

  Users always feed RGB in [0, 1]; `normalize` applies the model's own convention.
  """

  apply_fn: Callable[[Any, jax.Array], jax.Array]
  params: Any
  mean: tuple[float, ...] = IMAGENET_MEAN
  std: tuple[float, ...] = IMAGENET_STD
  bgr: bool = False
  features_fn: Callable[[Any, jax.Array], jax.Array] | None = None
  head_fn: Callable[[Any, jax.Array], jax.Array] | None = None

  def __post_init__(self):
    object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
    object.__setattr__(self, "std", tuple(float(v) for v in self.std))
    object.__setattr__(self, "bgr", bool(self.bgr))

  def normalize(self, images01: jax.Array) -> jax.Array:
    """RGB `[..., H, W, 3]` in [0, 1] -> the model's normalised input, same shape."""
    x = images01[..., ::-1] if self.bgr else images01
    return (x - jnp.asarray(self.mean, x.dtype)) / jnp.asarray(self.std, x.dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Logits `[B, C]` for already normalised images `x [B, H, W, 3]`."""
    return self.apply_fn(self.params, x)

  def logits(self, images01: jax.Array) -> jax.Array:
    """Logits `[B, C]` for RGB images `[B, H, W, 3]` in [0, 1]."""
    return self.apply_fn(self.params, self.normalize(images01))


jax.tree_util.register_dataclass(
    Classifier, data_fields=["params"], meta_fields=["apply_fn", "mean", "std", "bgr", "features_fn", "head_fn"])


# Rows of logits within this of summing to 1, all >= 0, look like probabilities.
_PROBABILITY_TOLERANCE = 1e-2
# Classifier structures (static parts and parameter shapes) whose clean outputs were checked.
_VALUES_CHECKED: set[Any] = set()


def _describe(output: Any) -> str:
  """What `apply_fn` returned, in a few words: `tuple of 2 (float32[2, 10], dict)`."""
  if isinstance(output, jax.ShapeDtypeStruct):
    return f"{output.dtype}{list(output.shape)}"
  if isinstance(output, dict):
    return f"a dict with keys {sorted(map(str, output))}"
  if isinstance(output, (tuple, list)):
    parts = ", ".join(_describe(part) if isinstance(part, jax.ShapeDtypeStruct)
                      else type(part).__name__ for part in output)
    return f"a {type(output).__name__} of {len(output)} ({parts})"
  return f"a {type(output).__name__}"


@functools.lru_cache(maxsize=64)
def _output_spec(structure: Any, leaf_specs: tuple[jax.ShapeDtypeStruct, ...],
                 images: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
  """`apply_fn`'s output on images of spec `images`, found by `jax.eval_shape` (no computation),
  checked against the contract; cached per classifier structure, parameter shapes and images."""
  abstract = jax.tree.unflatten(structure, leaf_specs)
  output = jax.eval_shape(lambda c, x: c.logits(x), abstract, images)
  batch = images.shape[0]
  if not isinstance(output, jax.ShapeDtypeStruct):
    hint = (" A Flax `apply` with `mutable=` returns `(logits, state)`: pass a function that "
            "returns the logits alone." if isinstance(output, (tuple, list)) else "")
    raise ValueError(f"`apply_fn` must return logits, one array [B, C]; it returned "
                     f"{_describe(output)}.{hint}")
  if len(output.shape) != 2 or output.shape[0] != batch:
    raise ValueError(f"`apply_fn` must return logits [B, C] = [{batch}, C] for {batch} images "
                     f"{list(images.shape)}; it returned shape {list(output.shape)}.")
  if not jnp.issubdtype(output.dtype, jnp.floating):
    raise ValueError(f"`apply_fn` must return floating-point logits [B, C]; it returned "
                     f"{_describe(output)}.")
  return output


@jax.jit
def _clean_logits(classifier: Classifier, images01: jax.Array) -> jax.Array:
  return classifier.logits(images01)


def check_classifier(classifier: Any, images01: Any) -> int:
  """Checks the classifier contract on the clean forward pass of `images01`; returns C.

  Every public entry point that runs a classifier (`explain`, `perturb`, the baselines, the
  metrics, `evaluate`, batch jobs) calls it once at its boundary:

  - `classifier` must be a `Classifier`, and `apply_fn(params, x)` must return one floating
    array `[B, C]` for `B` images (checked with `jax.eval_shape`, no computation, cached per
    classifier structure and image shape; also under `jax.jit`).
  - Where `images01` is concrete, the logits of the clean images are computed once per
    classifier structure (static parts and parameter shapes): rows that are all non-negative
    and sum to 1 look like probabilities (an `apply_fn` ending in a softmax), which would make
    the reported probabilities and every metric silently wrong, so they give a warning.

  Args:
    classifier: The classifier to check.
    images01: `[B, H, W, 3]` RGB images in [0, 1] (already validated), or a tracer.

  Returns:
    The number of classes C.

  Raises:
    ValueError: `classifier` is not a `Classifier`, or `apply_fn` returns anything but a
      floating array `[B, C]` (a tuple or dict, e.g. a Flax `apply` with `mutable=`); the
      message names `apply_fn` and what it returned.

  Warns:
    UserWarning: naming `apply_fn`, when its clean outputs look like probabilities.
  """
  if not isinstance(classifier, Classifier):
    raise ValueError(f"`classifier` must be a pfc_jax.Classifier, got {type(classifier).__name__}.")
  leaves, structure = jax.tree.flatten(classifier)
  leaf_specs = tuple(jax.ShapeDtypeStruct(np.shape(leaf), jnp.result_type(leaf)) for leaf in leaves)
  images = jax.ShapeDtypeStruct(tuple(images01.shape), images01.dtype)
  count = int(_output_spec(structure, leaf_specs, images).shape[1])
  checked = (structure, leaf_specs)
  if isinstance(images01, jax.core.Tracer) or checked in _VALUES_CHECKED:
    return count
  logits = np.asarray(_clean_logits(classifier, images01), np.float64)
  _VALUES_CHECKED.add(checked)
  if (count > 1 and logits.size and (logits >= 0).all()
      and (np.abs(logits.sum(axis=1) - 1) <= _PROBABILITY_TOLERANCE).all()):
    warnings.warn(
        f"`apply_fn` returned rows that are all non-negative and sum to 1 on the {len(logits)} "
        "clean images: they look like probabilities (a final softmax), but pfc-jax expects "
        "logits [B, C] and applies the softmax itself, so reported probabilities and every "
        "metric would be wrong. Return the logits (or the log-probabilities).",
        UserWarning, stacklevel=3)
  return count
