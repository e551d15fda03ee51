"""The classifier contract: one pytree that the whole pipeline takes."""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Callable, Mapping, NamedTuple

import flax.linen as nn
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
    apply_fn: `apply_fn(params, x) -> logits [B, C]` for normalised NHWC images `x [B, H, W, 3]`
      (every entry point checks this once: `check_classifier`).
    params: The classifier's variables (any pytree of arrays).
    mean: Per-channel mean subtracted after scaling, in the model's channel order.
    std: Per-channel standard deviation divided by, in the model's channel order.
    bgr: Whether the model expects BGR channel order (Caffe-converted weights such as Keras').
    features_fn: Optional `features_fn(params, x) -> activations [B, h, w, K]` of the layer that
      class-activation methods (Grad-CAM, Score-CAM) read, usually the last convolution.
    head_fn: Optional `head_fn(params, activations) -> logits [B, C]`, the rest of the network,
      so that `head_fn(params, features_fn(params, x)) == apply_fn(params, x)`.
    attention_fn: Optional `attention_fn(params, x) -> weights [B, L, heads, N, N]`, the
      attention weights of every block of a transformer (rows sum to 1), which attention
      rollout reads (`pfc_jax.baselines.attention_rollout`).

  Users always feed RGB in [0, 1]; `normalize` applies the model's own convention.
  """

  apply_fn: Callable[[Any, jax.Array], jax.Array]
  params: Any
  mean: tuple[float, ...] = IMAGENET_MEAN
  std: tuple[float, ...] = IMAGENET_STD
  bgr: bool = False
  features_fn: Callable[[Any, jax.Array], jax.Array] | None = None
  head_fn: Callable[[Any, jax.Array], jax.Array] | None = None
  attention_fn: Callable[[Any, jax.Array], jax.Array] | None = None

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

  # Adapters: a Classifier of a Flax NNX, Flax Linen or Equinox model. `params` is what the
  # model's own API hands out (no copy), and the functions are cached per model structure and
  # options, so classifiers of equal structure share their jit compilations.

  @classmethod
  def from_nnx(cls, module, *, mean: tuple[float, ...] = IMAGENET_MEAN,
               std: tuple[float, ...] = IMAGENET_STD, bgr: bool = False,
               features: str | Callable | None = None, head: str | Callable | None = None,
               attention: str | Callable | None = None, batched: bool = True,
               channels_first: bool = False, call_kwargs: Mapping[str, Any] | None = None
               ) -> Classifier:
    """The Classifier of a Flax NNX module, in evaluation mode.

    The module is viewed with `nnx.view(module, deterministic=True, use_running_average=True)`
    (Dropout off, BatchNorm on its running statistics; `module` itself is not changed) and
    split with `nnx.split`: `params` is its `nnx.State` (every variable: parameters, batch
    statistics, RNG state), holding the module's own arrays, and `apply_fn` merges it with the
    graph definition and calls the module. The functions are cached per graph definition and
    options, so a Classifier rebuilt from the same module after a training step reuses the
    compilations of the last one. Pass module-level functions or method names as `features`,
    `head` and `attention`: a new lambda on every call is a new static field, hence a new
    compilation. Differentiating in `params` needs `jax.grad(..., allow_int=True)` when the
    state holds RNG keys (a Dropout's), or the `nnx.Param` leaves alone.

    Example:
      >>> classifier = Classifier.from_nnx(model, mean=(0.5,) * 3, std=(0.25,) * 3,
      ...                                  features="features", head="head")
      >>> explanation = pfc_jax.explain(classifier, images01, key)

    Args:
      module: An `nnx.Module` mapping normalised images to logits.
      mean: Per-channel mean of the input normalisation, as for `Classifier`.
      std: Per-channel standard deviation of the input normalisation.
      bgr: Whether the module expects BGR channel order.
      features: The layer that Grad-CAM and Score-CAM read: the name of a method of the module,
        or a function `features(module, x)`, returning that layer's activations
        (`[B, h, w, K]`, or `[B, K, h, w]` with `channels_first`). Needs `head`.
      head: The rest of the network: a method name or a function `head(module, activations)`
        returning the logits, so that `head(features(x))` is the module's output.
      attention: For attention rollout: a method name or a function `attention(module, x)`
        returning every block's attention weights `[B, L, heads, N, N]`.
      batched: Whether the module maps a batch to `[B, C]` logits (default) or one image to
        `[C]` (it is then vmapped over the batch).
      channels_first: Whether the module takes `[B, 3, H, W]` images; default False (NHWC).
      call_kwargs: Keyword arguments of every call, e.g. `{"train": False}` (hashable values).

    Returns:
      A Classifier with `apply_fn`, and `features_fn`/`head_fn`/`attention_fn` where given.

    Raises:
      ValueError: if `module` is not an `nnx.Module`, `features` comes without `head` (or the
        reverse), a method name is not the module's, or `call_kwargs` is not hashable.
    """
    from flax import nnx  # pylint: disable=import-outside-toplevel
    if not isinstance(module, nnx.Module):
      raise ValueError(f"`module` must be a flax.nnx.Module, got {type(module).__name__}; use "
                       "Classifier.from_linen for Linen modules.")
    module = nnx.view(module, deterministic=True, use_running_average=True,
                      raise_if_not_found=False)
    graphdef, state = nnx.split(module)
    return _adapted(_call_nnx, graphdef, state, module, mean, std, bgr, features, head,
                    attention, batched, channels_first, call_kwargs)

  @classmethod
  def from_linen(cls, module, variables: Any, *, mean: tuple[float, ...] = IMAGENET_MEAN,
                 std: tuple[float, ...] = IMAGENET_STD, bgr: bool = False,
                 features: str | Callable | None = None, head: str | Callable | None = None,
                 attention: str | Callable | None = None, batched: bool = True,
                 channels_first: bool = False, call_kwargs: Mapping[str, Any] | None = None
                 ) -> Classifier:
    """The Classifier of a Flax Linen module and its variables.

    `apply_fn` is `module.apply(variables, x, **call_kwargs)`, with no collection mutable:
    BatchNorm reads `variables["batch_stats"]`. Linen modules choose their evaluation mode by
    call arguments, so pass them in `call_kwargs` (e.g. `{"train": False}`); a module left in
    training mode fails loudly (it would update `batch_stats` or ask for a dropout key).

    Args:
      module: A `flax.linen.Module` mapping normalised images to logits.
      variables: Its variables, as `module.init` returns them (`{"params": ...}` and any other
        collections); they become `params` as they are.
      features: A method name or a function `features(module, x)` (Linen's `method=`).
      head: A method name or a function `head(module, activations)`.
      attention: A method name or a function `attention(module, x)`.
      mean, std, bgr, batched, channels_first, call_kwargs: As for `from_nnx`.

    Returns:
      A Classifier; see `from_nnx`.

    Raises:
      ValueError: as for `from_nnx`, for a `module` that is not a Linen module.
    """
    if not isinstance(module, nn.Module):
      raise ValueError(f"`module` must be a flax.linen.Module, got {type(module).__name__}; use "
                       "Classifier.from_nnx for NNX modules.")
    return _adapted(_call_linen, module, variables, module, mean, std, bgr, features, head,
                    attention, batched, channels_first, call_kwargs)

  @classmethod
  def from_equinox(cls, model, *, mean: tuple[float, ...] = IMAGENET_MEAN,
                   std: tuple[float, ...] = IMAGENET_STD, bgr: bool = False,
                   features: str | Callable | None = None, head: str | Callable | None = None,
                   attention: str | Callable | None = None, batched: bool = False,
                   channels_first: bool = True, call_kwargs: Mapping[str, Any] | None = None
                   ) -> Classifier:
    """The Classifier of an Equinox model (needs `pip install "pfc-jax[equinox]"`).

    The model is put in inference mode (`eqx.nn.inference_mode`: Dropout off) and split with
    `eqx.partition(model, eqx.is_array)`: `params` is the array part (the model's own arrays),
    `apply_fn` combines it with the static part and calls the model. Equinox's conventions are
    the defaults: one image per call (`batched=False`: vmapped over the batch) in
    channels-first layout (`[3, H, W]`, as `eqx.nn.Conv2d` takes it; a `features` method then
    returns `[K, h, w]`). Stateful layers that thread an `eqx.nn.State` (BatchNorm) are not
    supported.

    Args:
      model: An `equinox.Module` mapping one normalised image to logits.
      features: A method name or a function `features(model, x)`.
      head: A method name or a function `head(model, activations)`.
      attention: A method name or a function `attention(model, x)`, `[L, heads, N, N]` per image.
      batched: Whether the model takes a batch; default False (one image).
      channels_first: Whether the model takes `[3, H, W]` images; default True.
      mean, std, bgr, call_kwargs: As for `from_nnx`.

    Returns:
      A Classifier; see `from_nnx`.

    Raises:
      ImportError: without equinox.
      ValueError: as for `from_nnx`, for a `model` that is not an Equinox module.
    """
    try:
      import equinox as eqx  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ImportError('Classifier.from_equinox needs equinox: pip install "pfc-jax[equinox]".'
                        ) from e
    if not isinstance(model, eqx.Module):
      raise ValueError(f"`model` must be an equinox.Module, got {type(model).__name__}.")
    model = eqx.nn.inference_mode(model)
    params, static = eqx.partition(model, eqx.is_array)
    return _adapted(_call_equinox, static, params, model, mean, std, bgr, features, head,
                    attention, batched, channels_first, call_kwargs)


jax.tree_util.register_dataclass(
    Classifier, data_fields=["params"], meta_fields=["apply_fn", "mean", "std", "bgr", "features_fn", "head_fn",
                           "attention_fn"])


# --- Adapter internals -------------------------------------------------------------------------


def _bound(model: Any, method: str | Callable | None) -> Callable:
  """`model`'s method `method` (a name), `method` bound to `model` (a function), or `model`."""
  if method is None:
    return model
  if isinstance(method, str):
    return getattr(model, method)
  return functools.partial(method, model)


def _call_nnx(graphdef: Any, params: Any, method, x: jax.Array, kwargs: dict) -> jax.Array:
  from flax import nnx  # pylint: disable=import-outside-toplevel
  return _bound(nnx.merge(graphdef, params), method)(x, **kwargs)


def _call_linen(module: nn.Module, params: Any, method, x: jax.Array, kwargs: dict) -> jax.Array:
  return module.apply(params, x, method=method, **kwargs)


def _call_equinox(static: Any, params: Any, method, x: jax.Array, kwargs: dict) -> jax.Array:
  import equinox as eqx  # pylint: disable=import-outside-toplevel
  return _bound(eqx.combine(params, static), method)(x, **kwargs)


class _Functions(NamedTuple):
  apply: Callable
  features: Callable | None
  head: Callable | None
  attention: Callable | None


@functools.cache
def _functions(call: Callable, static: Any, features, head, attention, batched: bool,
               channels_first: bool, call_kwargs: tuple[tuple[str, Any], ...]) -> _Functions:
  """The Classifier's functions of one model structure: one object each per argument tuple.

  `call(static, params, method, x, kwargs)` runs `method` of the model that `static` and
  `params` make; here it is wrapped for NHWC batches, the Classifier's convention.
  """
  kwargs = dict(call_kwargs)

  def run(params, method, x):
    if batched:
      return call(static, params, method, x, kwargs)
    return jax.vmap(lambda one: call(static, params, method, one, kwargs))(x)

  def to_model(x):  # [B, H, W, C] -> the model's layout
    return jnp.moveaxis(x, -1, 1) if channels_first else x

  def from_model(x):  # the model's layout -> [B, H, W, C]
    return jnp.moveaxis(x, 1, -1) if channels_first else x

  def apply_fn(params, x):
    return run(params, None, to_model(x))

  def features_fn(params, x):
    return from_model(run(params, features, to_model(x)))

  def head_fn(params, activations):
    return run(params, head, to_model(activations))

  def attention_fn(params, x):
    return run(params, attention, to_model(x))

  return _Functions(apply_fn, features_fn if features is not None else None,
                    head_fn if head is not None else None,
                    attention_fn if attention is not None else None)


def _adapted(call: Callable, static: Any, params: Any, model: Any, mean, std, bgr, features,
             head, attention, batched, channels_first, call_kwargs) -> Classifier:
  """Checks the adapter arguments and builds the Classifier (see `Classifier.from_nnx`)."""
  if (features is None) != (head is None):
    raise ValueError("`features` and `head` go together (the layer that class-activation "
                     f"methods read, and the rest of the network); got features={features!r} "
                     f"and head={head!r}.")
  for name, method in (("features", features), ("head", head), ("attention", attention)):
    if method is None or callable(method):
      continue
    if not isinstance(method, str) or not callable(getattr(model, method, None)):
      raise ValueError(f"`{name}` must be a method name of {type(model).__name__} or a function "
                       f"({name}(model, x)), got {method!r}.")
  kwargs = tuple(sorted(dict(call_kwargs or {}).items()))
  try:
    hash(kwargs)
  except TypeError as e:
    raise ValueError(f"`call_kwargs` values must be hashable (static), got {call_kwargs!r}.") from e
  functions = _functions(call, static, features, head, attention, bool(batched),
                         bool(channels_first), kwargs)
  return Classifier(functions.apply, params, mean=mean, std=std, bgr=bgr,
                    features_fn=functions.features, head_fn=functions.head,
                    attention_fn=functions.attention)


# Rows of logits within this of summing to 1, all >= 0, look like probabilities.
_PROBABILITY_TOLERANCE = 1e-2
# Classifier structures (static parts and parameter shapes) whose clean outputs were checked;
# forgotten all at once past `_MAX_CHECKED` (a program that keeps making new `apply_fn`s).
_VALUES_CHECKED: set[Any] = set()
_MAX_CHECKED = 256


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
  if len(_VALUES_CHECKED) >= _MAX_CHECKED:
    _VALUES_CHECKED.clear()
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
