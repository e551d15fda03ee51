"""Feature coalitions: per-image unsupervised clustering with the FEN (METHOD.md section 1).

For each image a fresh `CoalitionNet` is trained from its own PRNG key with its own SGD state and
its own early stop, minimising (Kim, Kanezaki and Tanaka, IEEE TIP 2020; PFC, arXiv 2408.13397)::

  loss = similarity_weight * mean_n CE(softmax(r_n), argmax r_n)
       + continuity_weight * (mean |r[i+1, j] - r[i, j]| + mean |r[i, j+1] - r[i, j]|)

with r the FEN's scores `[H, W, l]`. An image stops once at most `min_coalitions` labels remain;
its coalitions are the argmax labels of the forward pass of that last step (as in the authors'
code), relabelled to 0..num-1.

Batching (`pfc_jax._loop`): `"sequential"` trains one image after another with the one-image
step driven from Python (the CPU default); `"map"` runs one compiled program, a `lax.map` over
the images of one image's compiled training loop (the GPU/TPU default of the full network);
`"vmap"` trains all images in one vmapped step, where each image's own kernels become grouped
convolutions (~4.5x slower per image on XLA:CPU; XLA:GPU's backward pass of grouped
convolutions is slow too); `"dense"` trains compute batches of `compute_batch` images in one
step program, each image's backbone computed by the one-image function: with a frozen backbone
(`train_backbone=False`, the GPU/TPU default there) the heads' 1x1 convolutions are one batched
matrix product (`coalition_net.batched_head`), with the full network the vmapped step.
Every choice of batching and loop driver runs the same per-image step and gives the same labels
up to float ties; under `"sequential"` and `"map"`, and `"dense"` for a given `compute_batch`,
an image's labels do not depend on its batch.
`precision="bfloat16"` runs the network in bfloat16 with float32 parameters, SGD state and
loss (`pfc_jax._precision`).

Example:
  >>> config = CoalitionConfig.fast()
  >>> coalitions = extract_coalitions(images, jax.random.key(0), config)
  >>> coalitions.labels.shape, coalitions.num  # [B, H, W] int32, [B] int32
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from pfc_jax import _inputs
from pfc_jax import _loop
from pfc_jax import _precision
from pfc_jax.classifier import IMAGENET_MEAN, IMAGENET_STD
from pfc_jax.models import coalition_net
from pfc_jax.models.coalition_net import CONV_LAYERS, CoalitionNet

_HEAD_LAYERS = ("conv6", "bn6")
_MIN_SIZE = 8


@dataclasses.dataclass(frozen=True)
class CoalitionConfig:
  """How the FEN is built and trained; defaults are the authors' code (the full variant).

  Attributes:
    num_channels: l, output channels of the FEN: the most coalitions an image can get. 20.
    min_coalitions: k, an image stops training once at most k labels remain. 4.
    max_steps: Most SGD steps per image. 500.
    learning_rate: SGD learning rate. 1e-3.
    momentum: SGD momentum (PyTorch/optax heavy ball, no Nesterov). 0.9.
    similarity_weight: Weight of the similarity (cross-entropy to own argmax) loss. 1.0.
    continuity_weight: Weight of the continuity (L1 of spatial differences) loss. 1.0.
    init: `"random"`: PyTorch's default init, input BGR / 255 (the authors' code).
      `"vgg16"`: the seven 3x3 convolutions copied from VGG16 (`vgg_params`), input the
      ImageNet-normalised RGB image (the paper's figure); the 1x1 conv and norms stay random.
      Default `"random"`.
    train_backbone: True: train every layer (the authors' code). False: the 3x3 convolutions stay
      at their initial values, their features are computed once per image and only the 1x1 conv
      and its norm are trained, so a step costs one 1x1 convolution. Default True.
    resolution: Run the FEN with this short side (only ever downsizing, antialiased bilinear) and
      upsample the labels to the input size with nearest neighbour. None: input size. Default None.
    width: Channel multiplier of the 3x3 convolutions, `init="random"` only. 1.0.
    batching: Image layout of `pfc_jax._loop.run_images`: `"sequential"`, `"map"`, `"vmap"`,
      `"dense"` or `"auto"` (sequential on CPU; elsewhere dense with a frozen backbone, map
      when the whole network trains). "auto".
    compute_batch: `"dense"` only: images per compiled step; None: the largest power of two
      up to 64 estimated to fit in 80% of the device's memory and in 8 GB, 4 on the CPU
      (`pfc_jax._loop.default_compute_batch`). None.
    driver: Step loop driver of `pfc_jax._loop.run_loop`: `"compiled"`, `"python"` or `"auto"`
      (python on CPU, compiled elsewhere); `"map"` is always compiled. "auto".
    precision: `"float32"`, `"bfloat16"` (the network computes in bfloat16, its parameters,
      SGD state and loss stay float32) or `"auto"` (bfloat16 on GPU/TPU, float32 on CPU;
      `pfc_jax._precision`). "auto".
  """

  num_channels: int = 20
  min_coalitions: int = 4
  max_steps: int = 500
  learning_rate: float = 1e-3
  momentum: float = 0.9
  similarity_weight: float = 1.0
  continuity_weight: float = 1.0
  init: Literal["random", "vgg16"] = "random"
  train_backbone: bool = True
  resolution: int | None = None
  width: float = 1.0
  batching: _loop.Batching = "auto"
  compute_batch: int | None = None
  driver: _loop.Driver = "auto"
  precision: _precision.Precision = "auto"

  def __post_init__(self):
    if self.num_channels < 2:
      raise ValueError(f"`num_channels` must be at least 2, got {self.num_channels}.")
    if not 1 <= self.min_coalitions < self.num_channels:
      raise ValueError(
          f"`min_coalitions` must be in [1, num_channels={self.num_channels}), got "
          f"{self.min_coalitions}.")
    if self.max_steps < 1:
      raise ValueError(f"`max_steps` must be at least 1, got {self.max_steps}.")
    if self.init not in ("random", "vgg16"):
      raise ValueError(f"`init` must be 'random' or 'vgg16', got {self.init!r}.")
    if self.width <= 0 or (self.init == "vgg16" and self.width != 1.0):
      raise ValueError(
          f"`width` must be positive, and 1.0 with init='vgg16', got {self.width} with "
          f"init={self.init!r}.")
    if self.resolution is not None and self.resolution < _MIN_SIZE:
      raise ValueError(
          f"`resolution` must be None or at least {_MIN_SIZE}, got {self.resolution}.")
    _loop.check_batching(self.batching, self.driver, self.compute_batch)
    _precision.check_precision(self.precision)

  def layout(self) -> _loop.Layout:
    """The image layout `batching` resolves to on the default backend ("auto": "sequential"
    on CPU; on GPU and TPU "dense" with a frozen backbone, "map" otherwise). Not yet measured
    on an accelerator."""
    return _loop.resolve_batching(self.batching, _accelerator_layout(self))

  @classmethod
  def fast(cls, **overrides) -> CoalitionConfig:
    """The cheap variant of the "fast" explain preset: frozen random backbone at short side 64.

    Only the 1x1 conv and its norm are trained (learning rate 0.1: the head alone learns slowly
    at 1e-3), on features computed once at short side 64; labels are upsampled nearest-neighbour
    to the input size; at most 300 steps. 5.2 s per 224 px image on an idle 2-core CPU (0.18
    GFLOP per step), against hours for the full variant (1.2 TFLOP per step). Cost and agreement
    (adjusted Rand index) with the full variant: `python scripts/benchmark_coalitions.py --size 224 --variants fast`,
    `python scripts/coalition_agreement.py`.
    """
    return cls(**{"train_backbone": False, "resolution": 64, "learning_rate": 0.1,
                  "max_steps": 300, **overrides})

  @classmethod
  def tiny(cls, **overrides) -> CoalitionConfig:
    """A few steps of a narrow FEN, for tests and smoke runs (no meaningful coalitions)."""
    return cls(**{"num_channels": 8, "max_steps": 5, "width": 0.125, **overrides})


def _accelerator_layout(config: CoalitionConfig) -> _loop.Layout:
  """What batching "auto" picks on GPU and TPU: "dense" where the heads' 1x1 convolutions make
  one batched matrix product, "map" (dense per-image convolutions) when the backbone trains."""
  return "map" if config.train_backbone else "dense"


class Coalitions(NamedTuple):
  """Feature coalitions of a batch.

  Attributes:
    labels: `[B, H, W] int32`, coalition index per pixel; exactly 0..num-1 are in use.
    num: `[B] int32`, number of coalitions per image.
    steps: `[B] int32`, training steps each image took.
  """

  labels: jax.Array
  num: jax.Array
  steps: jax.Array


class _ImageState(NamedTuple):
  """Training state of one image (unbatched; `[B, ...]` leading axis under vmap)."""

  inputs: jax.Array  # [1, h, w, 3] FEN input, or [1, h, w, C5] frozen backbone features.
  params: Any  # Trainable FEN parameters.
  opt_state: Any
  labels: jax.Array  # [h, w] int32, argmax of the last forward pass.
  steps: jax.Array  # [] int32
  done: jax.Array  # [] bool


def relabel(labels: jax.Array, num_labels: int) -> tuple[jax.Array, jax.Array]:
  """Renumbers the labels in use as 0..num-1, in increasing order of their value. Jittable.

  Args:
    labels: `[...] int32` with values in [0, num_labels).
    num_labels: Static upper bound on the label values.

  Returns:
    `(relabelled [...] int32, num [] int32)`, num the count of distinct labels.
  """
  in_use = jnp.bincount(labels.ravel(), length=num_labels) > 0
  new_index = jnp.cumsum(in_use, dtype=jnp.int32) - 1
  return new_index[labels], in_use.sum(dtype=jnp.int32)


def _fen_size(config: CoalitionConfig, height: int, width: int) -> tuple[int, int]:
  """The FEN's `(h, w)` for an input of `(height, width)`: short side `resolution` at most."""
  short = min(height, width)
  if config.resolution is None or config.resolution >= short:
    return height, width
  scale = config.resolution / short
  return max(_MIN_SIZE, round(height * scale)), max(_MIN_SIZE, round(width * scale))


def _network(config: CoalitionConfig) -> CoalitionNet:
  return CoalitionNet(num_channels=config.num_channels, width=config.width)


def _optimizer(config: CoalitionConfig) -> optax.GradientTransformation:
  return optax.sgd(config.learning_rate, momentum=config.momentum)


def _apply_network(params: Any, x: jax.Array, config: CoalitionConfig, method) -> jax.Array:
  return _network(config).apply({"params": params}, x, method=method)


def _apply(config: CoalitionConfig, params: Any, x: jax.Array, method) -> jax.Array:
  """`method` of the FEN on `x`, computed in `config.precision`, output float32."""
  return _precision.computed_in(_apply_network, config.precision)(params, x, config, method)


def _scores(config: CoalitionConfig, params: Any, inputs: jax.Array) -> jax.Array:
  """FEN scores `[h, w, l] float32` from the state's inputs and trainable parameters."""
  method = CoalitionNet.__call__ if config.train_backbone else CoalitionNet.head
  return _apply(config, params, inputs, method)[0]


def _prepare(config: CoalitionConfig, image: jax.Array, key: jax.Array,
             vgg_convs: dict | None) -> _ImageState:
  """Initial state of one image `[H, W, 3] float32` in [0, 1] from its key."""
  height, width = _fen_size(config, *image.shape[:2])
  if (height, width) != image.shape[:2]:
    image = jax.image.resize(image, (height, width, 3), "linear")
  if config.init == "vgg16":
    x = (image - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
  else:
    x = image[..., ::-1]  # BGR / 255, as the authors' code feeds it.
  x = x[None]
  params = coalition_net.init_params(key, config.num_channels, config.width)
  if vgg_convs is not None:
    params = {**params, **vgg_convs}
  if config.train_backbone:
    inputs = x
  else:
    inputs = _apply(config, params, x, CoalitionNet.backbone)
    params = {name: params[name] for name in _HEAD_LAYERS}
  return _ImageState(
      inputs=inputs, params=params, opt_state=_optimizer(config).init(params),
      labels=jnp.zeros((height, width), jnp.int32), steps=jnp.int32(0), done=jnp.bool_(False))


def _loss(config: CoalitionConfig, params: Any, inputs: jax.Array):
  """Similarity + continuity loss of one image, and the one-hot argmax labels `[h, w, l]`."""
  return _loss_of_scores(config, _scores(config, params, inputs))


def _loss_of_scores(config: CoalitionConfig, scores: jax.Array):
  """`_loss` from the FEN scores `[h, w, l]`."""
  one_hot = jax.nn.one_hot(jnp.argmax(scores, axis=-1), config.num_channels)
  similarity = optax.softmax_cross_entropy(scores, one_hot).mean()
  continuity = (jnp.abs(scores[1:] - scores[:-1]).mean()
                + jnp.abs(scores[:, 1:] - scores[:, :-1]).mean())
  loss = config.similarity_weight * similarity + config.continuity_weight * continuity
  return loss, one_hot


def _image_step(config: CoalitionConfig, state: _ImageState) -> tuple[_ImageState, tuple]:
  """One SGD step of one image; a no-op once the image is done."""
  grads, one_hot = jax.grad(_loss, argnums=1, has_aux=True)(config, state.params, state.inputs)
  return _apply_grads(config, state, grads, one_hot), ()


def _apply_grads(config: CoalitionConfig, state: _ImageState, grads: Any,
                 one_hot: jax.Array) -> _ImageState:
  """One image's SGD update and stopping test from its gradients and one-hot labels; a no-op
  once the image is done."""
  updates, opt_state = _optimizer(config).update(grads, state.opt_state, state.params)
  num_labels = one_hot.max(axis=(0, 1)).sum()
  stepped = _ImageState(
      inputs=None, params=optax.apply_updates(state.params, updates),
      opt_state=opt_state, labels=jnp.argmax(one_hot, axis=-1).astype(jnp.int32),
      steps=state.steps + 1, done=num_labels <= config.min_coalitions)
  kept = jax.tree.map(lambda old, new: jnp.where(state.done, old, new),
                      state._replace(inputs=None), stepped)
  return kept._replace(inputs=state.inputs)  # The constant inputs pass through uncopied.


def _dense_step(config: CoalitionConfig, states: _ImageState) -> tuple[_ImageState, tuple]:
  """`_image_step` of a compute batch (states `[B, ...]`): with a frozen backbone the heads of
  all images as one batched matrix product (`coalition_net.batched_head`), the loss the sum of
  the per-image losses (so each image's gradient is its own); else the vmapped step."""
  if config.train_backbone:
    return jax.vmap(lambda state: _image_step(config, state))(states)

  def loss(params):
    scores = _precision.computed_in(coalition_net.batched_head, config.precision)(
        params, states.inputs)[:, 0]
    losses, one_hot = jax.vmap(lambda s: _loss_of_scores(config, s))(scores)
    return losses.sum(), one_hot

  grads, one_hot = jax.grad(loss, has_aux=True)(states.params)
  return jax.vmap(lambda *a: _apply_grads(config, *a))(states, grads, one_hot), ()


def _finish(config: CoalitionConfig, labels: jax.Array, size: tuple[int, int]):
  """Labels `low [h, w] int32` at the input `size` (nearest neighbour), relabelled, and their
  count. Integer arithmetic only: exact whatever the batch."""
  rows = (jnp.arange(size[0]) * labels.shape[0]) // size[0]
  cols = (jnp.arange(size[1]) * labels.shape[1]) // size[1]
  return relabel(labels[rows[:, None], cols[None, :]], config.num_channels)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _finish_one(config, labels, size):
  return _finish(config, labels, size)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _finish_batch(config, labels, size):
  return jax.vmap(lambda image_labels: _finish(config, image_labels, size))(labels)


def _stage_prepare(config, vgg_convs, inputs):
  image, key = inputs
  return _prepare(config, image, key, vgg_convs)


def _stage_step(config, vgg_convs, state):
  del vgg_convs  # Used by `_prepare` only.
  return _image_step(config, state)


def _stage_dense_step(config, vgg_convs, states):
  del vgg_convs  # Used by `_prepare` only.
  return _dense_step(config, states)


def _stage_finish(config, vgg_convs, state):
  del config, vgg_convs
  return state.labels, state.steps


def _stage_stop(config, state):
  del config
  return state.done


# One image's training for `pfc_jax._loop.run_images`: inputs `(image, key)`, shared the VGG16
# convolutions (or None), outputs the FEN-resolution labels and the steps taken.
_STAGE = _loop.Stage(_stage_prepare, _stage_step, _stage_finish, _stage_stop,
                     _stage_dense_step)


def _vgg_convs(vgg_params: Any) -> dict:
  """The seven 3x3 convolutions the FEN copies, checked against VGG16's shapes."""
  if not isinstance(vgg_params, dict):
    raise ValueError(
        f"`vgg_params` must be a VGG16 params dict, got {type(vgg_params).__name__}.")
  layers = vgg_params.get("params", vgg_params)
  convs = {}
  in_channels = 3
  for name, out_channels in CONV_LAYERS:
    expected = {"kernel": (3, 3, in_channels, out_channels), "bias": (out_channels,)}
    layer = layers.get(name) if isinstance(layers, dict) else None
    shapes = {leaf: tuple(getattr(layer.get(leaf), "shape", ())) for leaf in expected
              } if isinstance(layer, dict) else None
    if shapes != expected:
      raise ValueError(
          f"`vgg_params` must hold VGG16's `{name}` with kernel {expected['kernel']} (HWIO) and "
          f"bias {expected['bias']}, got {shapes}.")
    convs[name] = {leaf: jnp.asarray(layer[leaf], jnp.float32) for leaf in expected}
    in_channels = out_channels
  return convs


class ImageTraining(NamedTuple):
  """One image's coalition training as jitted pure functions, for research code and cost models.

  Attributes:
    init: `(image [H, W, 3] float32, key) -> state`, the FEN's fresh parameters and SGD state.
    step: `state -> state`, one SGD step; a no-op once the image has stopped.
    done: `state -> [] bool`, whether at most `min_coalitions` labels remain.
    finish: `(state, (H, W)) -> (labels [H, W] int32, num [] int32)`, the relabelled coalitions.

  The state is a pytree whose `steps` field counts the steps taken. `extract_coalitions` runs
  exactly these functions with `batching="sequential"` and the Python driver (the CPU default).
  """

  init: Callable[[jax.Array, jax.Array], Any]
  step: Callable[[Any], Any]
  done: Callable[[Any], jax.Array]
  finish: Callable[[Any, tuple[int, int]], tuple[jax.Array, jax.Array]]


def image_training(config: CoalitionConfig = CoalitionConfig(),
                   vgg_params: Any = None) -> ImageTraining:
  """The per-image training functions of `config` (see `ImageTraining`).

  Args:
    config: Network, training and precision settings (batching and driver are ignored).
    vgg_params: VGG16 variables, required with `config.init == "vgg16"`.

  Raises:
    ValueError: for missing or malformed `vgg_params`.
  """
  static, vgg_convs = _static_config(config), _checked_vgg_convs(config, vgg_params)
  functions = _loop.image_functions(_STAGE)
  return ImageTraining(
      init=lambda image, key: functions.prepare(static, vgg_convs, (image, key)),
      step=lambda state: functions.step(static, vgg_convs, state)[0],
      done=lambda state: state.done,
      finish=lambda state, size: _finish_one(
          static, functions.finish(static, vgg_convs, state)[0], tuple(size)))


def _static_config(config: CoalitionConfig) -> CoalitionConfig:
  """`config` with batching, driver and compute batch neutralised: they do not change the
  step, so one compilation serves every choice of them."""
  return dataclasses.replace(config, batching="auto", driver="auto", compute_batch=None)


def _checked_vgg_convs(config: CoalitionConfig, vgg_params: Any) -> dict | None:
  if config.init != "vgg16":
    return None
  if vgg_params is None:
    raise ValueError("`vgg_params` is required with init='vgg16'.")
  return _vgg_convs(vgg_params)


def extract_coalitions(images, key, config: CoalitionConfig = CoalitionConfig(),
                       vgg_params: Any = None) -> Coalitions:
  """Feature coalitions of each image (METHOD.md section 1).

  Image i's result depends only on image i, its key and `config`: not on the rest of the batch
  (to float32 equality with batching "sequential" and "map", and "dense" for a given
  `compute_batch`; up to float ties with "vmap").

  Args:
    images: `[B, H, W, 3]` float RGB in [0, 1], H and W at least 8.
    key: One PRNG key, split with `jax.random.split(key, B)` into per-image keys, or `[B]` keys;
      both give identical results.
    config: Network, training, batching and loop driver settings.
    vgg_params: VGG16 variables `{"params": {"conv1_1": {"kernel", "bias"}, ...}}` (HWIO
      kernels), required with `config.init == "vgg16"`, ignored otherwise.

  Returns:
    `Coalitions(labels [B, H, W] int32, num [B] int32, steps [B] int32)`.

  Raises:
    ValueError: for bad `images`, `key` or `vgg_params`.
  """
  images = _inputs.check_images(images, "images", min_size=_MIN_SIZE)
  keys = _inputs.per_image_keys(key, images.shape[0])
  vgg_convs = _checked_vgg_convs(config, vgg_params)
  static = _static_config(config)
  (labels, steps), _ = _loop.run_images(
      _STAGE, static, vgg_convs, (images, keys), config.max_steps, batching=config.batching,
      driver=config.driver, accelerator=_accelerator_layout(config),
      compute_batch=config.compute_batch, compute_batch_option="CoalitionConfig.compute_batch")
  labels, num = _finish_batch(static, labels, images.shape[1:3])
  return Coalitions(labels, num, steps)
