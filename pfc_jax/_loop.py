"""Loop drivers and image layouts for the per-image iterative optimisation of both PFC stages.

Driver: how one loop of steps runs. On GPU and TPU the steps belong in one compiled loop
(`lax.scan` / `lax.while_loop`): no host round trip per step. On XLA:CPU, convolutions inside a
compiled loop were measured 16-28x slower than the same step jitted alone (jax 0.10.2, 2 cores),
so there the step is jitted once and driven from Python. Both drivers run the same step function
and give the same results up to float rounding.

Layout (`Batching`): how the images of a batch share the hardware.
- `"sequential"`: one image after another from Python, each with the one-image program
  (prepare, steps by the driver, finish). The CPU default.
- `"map"`: one compiled program, a `lax.map` over the images whose body is one image's whole
  compiled loop. The GPU/TPU default of stages whose network is per image and trained whole.
  Each image's convolutions stay dense (no grouped convolutions, which is what per-image
  kernels become under `vmap`).
- `"vmap"`: all images in one vmapped step: the largest dense batch for a shared classifier,
  grouped convolutions for per-image networks.
- `"dense"`: the images in compute batches of a fixed `compute_batch` (the last one padded by
  repeating its last image, the padding dropped), each batch's steps as ONE step program over
  the stacked carries (`Stage.dense_step`, by default the vmapped one-image step): a shared
  network (the classifier) sees one batch of every image's inputs, so its kernels are as large
  as the batch. Each image is prepared and finished by the one-image functions. One shape is
  compiled whatever the number of images. The GPU/TPU default of the perturbation and of the
  frozen-backbone coalitions (`run_images`'s `accelerator`); not yet measured on either.
The one-image program of `"sequential"` and `"map"` does not depend on the batch size, so image
i's result is the same, to float32 equality, whatever else is in its batch, the batch size and
the device count (`tests/test_determinism.py`). `"dense"` keeps that guarantee for a fixed
`compute_batch` (the compiled shape is the same, and an image's arithmetic is row-wise: a
network's batch rows do not mix), whatever the batch size, the chunking, the device count and
the image's row in its compute batch (`tests/test_dense.py`), as far as the backend rounds
every row of a batch alike: for the perturbation's two games in one program XLA:CPU on an AMD
EPYC rounds some rows differently by their position (6e-8 on w after 20 steps), so there the
guarantee is float rounding. Other values of `compute_batch` compile another shape, whose
float rounding may differ. Under `"vmap"` the compiled batch
changes with the batch size, and so may the float rounding of each image's result.

A step is a module-level function `step(static, carry) -> (carry, out)`; `static` is hashable
(a frozen config) and bound at compile time. An optional `stop(static, carry) -> bool[]` ends the
loop early; once it is true the step must leave `carry` unchanged and emit zeros, so that how
often the Python driver checks it does not change the result.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Driver = Literal["auto", "compiled", "python"]
Batching = Literal["auto", "sequential", "map", "vmap", "dense"]
BATCHINGS = ("auto", "sequential", "map", "vmap", "dense")
Layout = Literal["sequential", "map", "vmap", "dense"]
_CHECK_EVERY = 10
# The largest `compute_batch` chosen by `default_compute_batch`, and its value where the backend
# reports no memory limit (XLA:CPU, whose memory is the host's).
MAX_COMPUTE_BATCH = 64
CPU_COMPUTE_BATCH = 4
# Share of the device's allocator limit that a compute batch's step may be estimated to take:
# the estimate leaves out allocator fragmentation and what else the device holds.
_MEMORY_MARGIN = 0.8
# The most memory a default compute batch's step may be estimated to take on any device: what
# a 16 GB GPU (Colab's T4) holds with room to spare, so that the default is the same there and
# on larger devices. Beyond a few dozen noisy images per classifier call a larger batch adds
# little speed (VGG16 at 224 px: 3 x 8 images per `fast` step) but as much memory again.
STEP_MEMORY_BUDGET = 8e9


def check_driver(driver: str) -> None:
  """Raises ValueError unless `driver` is a `Driver`. Does not start a JAX backend, so configs
  can be built before `jax.distributed.initialize`."""
  if driver not in ("auto", "compiled", "python"):
    raise ValueError(f"`driver` must be 'auto', 'compiled' or 'python', got {driver!r}.")


def check_batching(batching: str, driver: str, compute_batch: int | None = None) -> None:
  """Raises ValueError unless `batching` is a `Batching` that `driver` can drive (`"map"` is one
  compiled program, so it cannot take the Python driver) and `compute_batch` is None or a
  positive int under a layout that reads it ("dense", or "auto", dense on accelerators).
  Starts no JAX backend."""
  if batching not in BATCHINGS:
    raise ValueError(f"`batching` must be one of {BATCHINGS}, got {batching!r}.")
  check_driver(driver)
  if batching == "map" and driver == "python":
    raise ValueError(
        "`batching='map'` runs one compiled program and cannot take `driver='python'`; use "
        "driver 'auto' or 'compiled', or batching 'sequential'.")
  if compute_batch is None:
    return
  if not isinstance(compute_batch, int) or isinstance(compute_batch, bool) or compute_batch < 1:
    raise ValueError(f"`compute_batch` must be None or a positive int, got {compute_batch!r}.")
  if batching not in ("dense", "auto"):
    raise ValueError(f"`compute_batch` = {compute_batch!r} has no effect under batching "
                     f"{batching!r} (only \"dense\" reads it); leave it at its default None.")


def resolve_driver(driver: Driver) -> Literal["compiled", "python"]:
  """`"auto"` -> `"python"` on XLA:CPU, `"compiled"` elsewhere."""
  check_driver(driver)
  if driver == "auto":
    return "python" if jax.default_backend() == "cpu" else "compiled"
  return driver


def resolve_batching(batching: Batching, accelerator: Layout = "map") -> Layout:
  """`"auto"` -> `"sequential"` on XLA:CPU, `accelerator` (a stage's accelerator layout)
  elsewhere."""
  if batching not in BATCHINGS:
    raise ValueError(f"`batching` must be one of {BATCHINGS}, got {batching!r}.")
  if batching == "auto":
    return "sequential" if jax.default_backend() == "cpu" else accelerator
  return batching


@functools.cache
def jit_step(step: Callable) -> Callable:
  """`jax.jit(step, static_argnums=0)`, one per step function, shared by every caller."""
  return jax.jit(step, static_argnums=0)


@functools.cache
def _jit_stop(stop: Callable) -> Callable:
  return jax.jit(stop, static_argnums=0)


def _compiled_loop(step: Callable, stop: Callable | None, num_steps: int) -> Callable:
  """The traceable `loop(static, carry) -> (carry, outs)` of the compiled driver."""
  def loop(static, carry):
    if stop is None:
      return lax.scan(lambda c, _: step(static, c), carry, None, length=num_steps)
    out_shape = jax.eval_shape(lambda c: step(static, c)[1], carry)
    outs = jax.tree.map(lambda s: jnp.zeros((num_steps, *s.shape), s.dtype), out_shape)

    def cond(state):
      i, c, _ = state
      return (i < num_steps) & ~stop(static, c)

    def body(state):
      i, c, o = state
      c, out = step(static, c)
      o = jax.tree.map(lambda buf, v: buf.at[i].set(v), o, out)
      return i + 1, c, o

    _, carry, outs = lax.while_loop(cond, body, (jnp.int32(0), carry, outs))
    return carry, outs

  return loop


@functools.cache
def _jit_loop(step: Callable, stop: Callable | None, num_steps: int) -> Callable:
  return jax.jit(_compiled_loop(step, stop, num_steps), static_argnums=0)


def run_loop(step: Callable, static: Any, carry: Any, num_steps: int, *, driver: Driver = "auto",
             stop: Callable | None = None) -> tuple[Any, Any]:
  """Runs `num_steps` of `step`, stopping early once `stop` holds.

  Returns:
    `(carry, outs)`: the final carry and the per-step outputs stacked on a leading
    `[num_steps]` axis (zeros for steps not taken).
  """
  if resolve_driver(driver) == "compiled":
    return _jit_loop(step, stop, num_steps)(static, carry)
  jstep = jit_step(step)
  outs = []
  for i in range(num_steps):
    carry, out = jstep(static, carry)
    outs.append(out)
    if stop is not None and (i + 1) % _CHECK_EVERY == 0 and bool(_jit_stop(stop)(static, carry)):
      break
  if not outs:
    out_shape = jax.eval_shape(lambda c: step(static, c)[1], carry)
    return carry, jax.tree.map(lambda s: jnp.zeros((num_steps, *s.shape), s.dtype), out_shape)
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
  pad = num_steps - len(outs)
  return carry, jax.tree.map(
      lambda x: jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else x,
      stacked)


class Stage(NamedTuple):
  """One image's iterative optimisation as module-level pure functions (unbatched shapes).

  `shared` holds what every image of a batch uses whole (a classifier's parameters); `inputs`
  and the carry are one image's.

  Attributes:
    prepare: `(static, shared, inputs) -> carry`, the state before the first step.
    step: `(static, shared, carry) -> (carry, out)`, one step.
    finish: `(static, shared, carry) -> outputs`, the image's results.
    stop: Optional `(static, carry) -> [] bool`, see the module docstring.
    dense_step: Optional `(static, shared, carries) -> (carries, outs)`, one step of a stack of
      images (carries and outs with a leading `[B]` axis), the same arithmetic per image as
      `step`, for the `"dense"` layout; None: `step` vmapped over the images.
  """

  prepare: Callable[[Any, Any, Any], Any]
  step: Callable[[Any, Any, Any], tuple[Any, Any]]
  finish: Callable[[Any, Any, Any], Any]
  stop: Callable[[Any, Any], jax.Array] | None = None
  dense_step: Callable[[Any, Any, Any], tuple[Any, Any]] | None = None


@functools.cache
def _paired_step(step: Callable, batched: bool = False) -> Callable:
  """`step(static, shared, carry)` as a `run_loop` step over the pair `(shared, carry)`;
  `batched`: the carry has a leading image axis and `step` is vmapped over it."""
  def paired(static, pair):
    shared, carry = pair
    image_step = lambda c: step(static, shared, c)
    carry, out = (jax.vmap(image_step) if batched else image_step)(carry)
    return (shared, carry), out
  return paired


@functools.cache
def _dense_paired_step(stage: Stage) -> Callable:
  """The `"dense"` layout's step over the pair `(shared, carries [B, ...])`."""
  if stage.dense_step is None:
    return _paired_step(stage.step, batched=True)

  def paired(static, pair):
    shared, carries = pair
    carries, outs = stage.dense_step(static, shared, carries)
    return (shared, carries), outs
  return paired


@functools.cache
def _paired_stop(stop: Callable | None, batched: bool = False) -> Callable | None:
  """`stop(static, carry)` over the pair; `batched`: stop when every image has stopped."""
  if stop is None:
    return None
  if batched:
    return lambda static, pair: jax.vmap(lambda c: stop(static, c))(pair[1]).all()
  return lambda static, pair: stop(static, pair[1])


@functools.cache
def _jit_image_fn(fn: Callable) -> Callable:
  """`prepare` or `finish` of one image, jitted."""
  return jax.jit(fn, static_argnums=0)


@functools.cache
def _jit_batch_fn(fn: Callable) -> Callable:
  """`prepare` or `finish` vmapped over the images, jitted."""
  return jax.jit(lambda static, shared, batched: jax.vmap(
      lambda b: fn(static, shared, b))(batched), static_argnums=0)


class ImageFunctions(NamedTuple):
  """The jitted one-image functions that the `"sequential"` layout runs (see `image_functions`)."""

  prepare: Callable[[Any, Any, Any], Any]
  step: Callable[[Any, Any, Any], tuple[Any, Any]]
  finish: Callable[[Any, Any, Any], Any]


def image_functions(stage: Stage) -> ImageFunctions:
  """The exact jitted functions the `"sequential"` layout with the Python driver runs per image:
  `prepare(static, shared, inputs)`, `step(static, shared, carry) -> (carry, out)` and
  `finish(static, shared, carry)`, for research code and cost models."""
  paired = jit_step(_paired_step(stage.step))

  def step(static, shared, carry):
    (_, carry), out = paired(static, (shared, carry))
    return carry, out

  return ImageFunctions(_jit_image_fn(stage.prepare), step, _jit_image_fn(stage.finish))


def _one_image(stage: Stage, num_steps: int, static, shared, inputs):
  """One image's whole program: prepare, the compiled loop, finish. Traceable."""
  loop = _compiled_loop(_paired_step(stage.step), _paired_stop(stage.stop), num_steps)
  carry = stage.prepare(static, shared, inputs)
  (_, carry), outs = loop(static, (shared, carry))
  return stage.finish(static, shared, carry), outs


@functools.cache
def map_program(stage: Stage, num_steps: int) -> Callable:
  """The `"map"` layout, jitted: `(static, shared, inputs [B, ...]) -> (outputs [B, ...],
  outs [B, num_steps, ...])`, a `lax.map` over the images of one image's whole program."""
  def program(static, shared, inputs):
    # Inside a larger traced program (`shard_map`) some inputs may be constants; the barrier
    # keeps XLA from folding them into the image's program, which must not depend on its caller.
    shared, inputs = lax.optimization_barrier((shared, inputs))
    return lax.map(functools.partial(_one_image, stage, num_steps, static, shared), inputs)
  return jax.jit(program, static_argnums=0)


def _num_images(inputs: Any) -> int:
  return jax.tree.leaves(inputs)[0].shape[0]


def _rows(tree: Any, rows) -> Any:
  """The rows `rows` (an index array or a slice) of every array of `tree`."""
  return jax.tree.map(lambda x: x[rows], tree)


def _stack(trees: list) -> Any:
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _steps_last(outs: Any) -> Any:
  """Per-step outputs `[num_steps, B, ...]` -> `[B, num_steps, ...]`."""
  return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), outs)


def _dense_batch(stage: Stage, num_steps: int, static, shared, inputs):
  """One compute batch `inputs [C, ...]` in the `"dense"` layout on the compiled driver:
  each image prepared and finished by the one-image functions (a `lax.map`), the steps of all
  C images one compiled loop of the dense step. Traceable."""
  carries = lax.map(lambda one: stage.prepare(static, shared, one), inputs)
  loop = _compiled_loop(_dense_paired_step(stage), _paired_stop(stage.stop, batched=True),
                        num_steps)
  (_, carries), outs = loop(static, (shared, carries))
  outputs = lax.map(lambda carry: stage.finish(static, shared, carry), carries)
  return outputs, _steps_last(outs)


@functools.cache
def dense_program(stage: Stage, num_steps: int) -> Callable:
  """The `"dense"` layout of one compute batch, jitted: `(static, shared, inputs [C, ...]) ->
  (outputs [C, ...], outs [C, num_steps, ...])`."""
  def program(static, shared, inputs):
    shared, inputs = lax.optimization_barrier((shared, inputs))  # As in `map_program`.
    return _dense_batch(stage, num_steps, static, shared, inputs)
  return jax.jit(program, static_argnums=0)


def _dense_batch_python(stage: Stage, num_steps: int, static, shared, inputs):
  """`_dense_batch` on the Python driver: the jitted one-image `prepare` and `finish` of the
  `"sequential"` layout, and the jitted dense step driven from Python."""
  prepare, finish = _jit_image_fn(stage.prepare), _jit_image_fn(stage.finish)
  carries = _stack([prepare(static, shared, _rows(inputs, i))
                    for i in range(_num_images(inputs))])
  (_, carries), outs = run_loop(_dense_paired_step(stage), static, (shared, carries), num_steps,
                                driver="python", stop=_paired_stop(stage.stop, batched=True))
  outputs = _stack([finish(static, shared, _rows(carries, i))
                    for i in range(_num_images(carries))])
  return outputs, _steps_last(outs)


class DenseMemory(NamedTuple):
  """XLA's estimate of the device memory of the `"dense"` step (`dense_memory`).

  Attributes:
    shared_bytes: The shared arguments (the classifier's parameters), held once.
    per_image_bytes: One image's share: the step's temporary buffers (activations kept for the
      backward pass, gradients) and its carry in and out, compiled for one image. The
      temporaries of a larger batch grow about linearly, less than this times the images.
  """

  shared_bytes: int
  per_image_bytes: int

  def estimate(self, compute_batch: int) -> int:
    """Bytes of one step over `compute_batch` images (an overestimate, see above)."""
    return self.shared_bytes + compute_batch * self.per_image_bytes


def _nbytes(tree: Any) -> int:
  """Bytes of the arrays of `tree` (PRNG keys left out: a few bytes each)."""
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)
             if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key))


def _abstract(tree: Any) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def dense_memory(stage: Stage, static: Any, shared: Any, inputs: Any) -> DenseMemory | None:
  """XLA's memory analysis of `stage`'s dense step compiled for one image of `inputs` on the
  default backend (compiled, not run; None where the backend gives no analysis)."""
  abstract = _abstract((shared, _rows(inputs, 0)))
  leaves, treedef = jax.tree.flatten(abstract)
  return _dense_memory(stage, static, treedef, tuple(leaves))


@functools.cache
def _dense_memory(stage: Stage, static: Any, treedef, leaves: tuple) -> DenseMemory | None:
  shared, one = jax.tree.unflatten(treedef, leaves)
  carry = jax.eval_shape(
      lambda s, i: jax.tree.map(lambda x: x[None], stage.prepare(static, s, i)), shared, one)
  compiled = jit_step(_dense_paired_step(stage)).lower(static, (shared, carry)).compile()
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  return DenseMemory(_nbytes(shared), int(analysis.temp_size_in_bytes) + 2 * _nbytes(carry))


def device_memory_limit() -> int | None:
  """Bytes the default device's allocator may hold (`memory_stats()["bytes_limit"]`), or None
  where the backend reports none (XLA:CPU)."""
  stats = jax.local_devices()[0].memory_stats()
  return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def default_compute_batch(stage: Stage, static: Any, shared: Any, inputs: Any) -> int:
  """The `"dense"` layout's compute batch when none is given: the largest power of two up to
  `MAX_COMPUTE_BATCH` whose estimated step memory (`dense_memory`) fits in 80% of the device's
  `device_memory_limit` and in `STEP_MEMORY_BUDGET` (8 GB); `CPU_COMPUTE_BATCH` where the
  backend reports no limit.

  It depends only on the stage's settings, the shapes and the device kind, not on what else
  the device holds, so every call in a job compiles the same shape; on every device whose
  allocator may hold 10 GB or more it is the same.
  """
  limit = device_memory_limit()
  if limit is None:
    return CPU_COMPUTE_BATCH
  memory = dense_memory(stage, static, shared, inputs)
  if memory is None:
    return CPU_COMPUTE_BATCH
  budget = min(_MEMORY_MARGIN * limit, STEP_MEMORY_BUDGET)
  compute_batch = MAX_COMPUTE_BATCH
  while compute_batch > 1 and memory.estimate(compute_batch) > budget:
    compute_batch //= 2
  return compute_batch


def _gb(num_bytes: float) -> str:
  return f"{num_bytes / 1e9:.2f} GB"


def _memory_error(compute_batch: int, option: str, memory: DenseMemory | None,
                  limit: int | None, cause: str = "") -> ValueError:
  need = (f"about {_gb(memory.estimate(compute_batch))} ({_gb(memory.per_image_bytes)} per "
          f"image)" if memory else "more than there is")
  have = f" of the {_gb(limit)} the device may hold" if limit else ""
  return ValueError(
      f"A compute batch of {compute_batch} images needs {need}{have}; lower `{option}` "
      f"(`--compute-batch` on the command line; left unset, the largest that fits is "
      f"picked){cause}.")


def check_compute_batch(stage: Stage, static: Any, shared: Any, inputs: Any, compute_batch: int,
                        option: str = "compute_batch") -> None:
  """Raises ValueError, naming `option`, when the dense step over `compute_batch` images is
  estimated (`dense_memory`) not to fit in `device_memory_limit`; no check where the backend
  reports no limit. Only shapes are read, so it also runs while `shard_map` or `jit` traces
  the stage, before the compiled program could run out of memory."""
  limit = device_memory_limit()
  if limit is None:
    return
  memory = dense_memory(stage, static, shared, inputs)
  if memory is not None and memory.estimate(compute_batch) > limit:
    raise _memory_error(compute_batch, option, memory, limit)


def _is_out_of_memory(error: Exception) -> bool:
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def _run_dense(stage: Stage, static, shared, inputs, num_steps: int, driver: Driver,
               compute_batch: int | None, option: str):
  """The `"dense"` layout (see the module docstring and `run_images`)."""
  num_images = _num_images(inputs)
  traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((shared, inputs)))
  if compute_batch is None:
    compute_batch = default_compute_batch(stage, static, shared, inputs)
  else:
    check_compute_batch(stage, static, shared, inputs, compute_batch, option)
  num_batches = -(-num_images // compute_batch)
  padded = _rows(inputs, np.minimum(np.arange(num_batches * compute_batch), num_images - 1))
  if traced:  # Inside a traced program (`shard_map`): the compiled driver over the batches.
    batches = jax.tree.map(lambda x: x.reshape(num_batches, compute_batch, *x.shape[1:]), padded)
    shared, batches = lax.optimization_barrier((shared, batches))
    results = lax.map(lambda b: _dense_batch(stage, num_steps, static, shared, b), batches)
    results = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), results)
  else:
    run = (dense_program(stage, num_steps) if resolve_driver(driver) == "compiled"
           else functools.partial(_dense_batch_python, stage, num_steps))
    try:
      results = jax.tree.map(lambda *xs: jnp.concatenate(xs), *[
          run(static, shared, _rows(padded, slice(start, start + compute_batch)))
          for start in range(0, num_batches * compute_batch, compute_batch)])
    except jax.errors.JaxRuntimeError as error:
      if not _is_out_of_memory(error):
        raise
      memory = dense_memory(stage, static, shared, inputs)
      raise _memory_error(compute_batch, option, memory, device_memory_limit(),
                          f" (the device reported: {str(error).splitlines()[0]})") from error
  return _rows(results, slice(0, num_images))


def run_images(stage: Stage, static: Any, shared: Any, inputs: Any, num_steps: int, *,
               batching: Batching = "auto", driver: Driver = "auto",
               accelerator: Layout = "map", compute_batch: int | None = None,
               compute_batch_option: str = "compute_batch") -> tuple[Any, Any]:
  """Runs `stage` for every image of `inputs` (arrays with a leading `[B]` axis), each for
  at most `num_steps` steps, in the layout `batching` (see the module docstring).

  Args:
    stage, static, shared, inputs, num_steps: The stage, its static settings, what every image
      shares, the images' inputs and the most steps.
    batching, driver: Layout and loop driver.
    accelerator: The layout `"auto"` picks on GPU and TPU (`resolve_batching`).
    compute_batch: `"dense"` only: images per compiled step; None: `default_compute_batch`.
    compute_batch_option: The setting named when a compute batch does not fit in memory.

  Returns:
    `(outputs, outs)`: `finish`'s outputs with a leading `[B]` axis, and the per-step outputs
    `[B, num_steps, ...]` (zeros for steps not taken).

  Raises:
    ValueError: `"dense"` on a device that reports its memory, when `compute_batch` images are
      estimated not to fit or the device runs out of memory; the message names
      `compute_batch_option`.
  """
  check_batching(batching, driver)
  layout = resolve_batching(batching, accelerator)
  if layout == "dense":
    return _run_dense(stage, static, shared, inputs, num_steps, driver, compute_batch,
                      compute_batch_option)
  if layout == "map":
    return map_program(stage, num_steps)(static, shared, inputs)
  if layout == "vmap":
    carries = _jit_batch_fn(stage.prepare)(static, shared, inputs)
    (_, carries), outs = run_loop(
        _paired_step(stage.step, batched=True), static, (shared, carries), num_steps,
        driver=driver, stop=_paired_stop(stage.stop, batched=True))
    outputs = _jit_batch_fn(stage.finish)(static, shared, carries)
    return outputs, _steps_last(outs)
  prepare, finish = _jit_image_fn(stage.prepare), _jit_image_fn(stage.finish)
  results = []
  for i in range(jax.tree.leaves(inputs)[0].shape[0]):
    carry = prepare(static, shared, jax.tree.map(lambda x: x[i], inputs))
    (_, carry), outs = run_loop(_paired_step(stage.step), static, (shared, carry), num_steps,
                                driver=driver, stop=_paired_stop(stage.stop))
    results.append((finish(static, shared, carry), outs))
  return jax.tree.map(lambda *xs: jnp.stack(xs), *results)
