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
  compiled loop. The GPU/TPU default. Each image's convolutions stay dense (no grouped
  convolutions, which is what per-image kernels become under `vmap`).
- `"vmap"`: all images in one vmapped step: the largest dense batch for a shared classifier,
  grouped convolutions for per-image networks.
The one-image program of `"sequential"` and `"map"` does not depend on the batch size, so image
i's result is the same, to float32 equality, whatever else is in its batch, the batch size and
the device count (`tests/test_determinism.py`). Under `"vmap"` the compiled batch changes with
the batch size, and so may the float rounding of each image's result.

A step is a module-level function `step(static, carry) -> (carry, out)`; `static` is hashable
(a frozen config) and bound at compile time. An optional `stop(static, carry) -> bool[]` ends the
loop early; once it is true the step must leave `carry` unchanged and emit zeros, so that how
often the Python driver checks it does not change the result.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

Driver = Literal["auto", "compiled", "python"]
Batching = Literal["auto", "sequential", "map", "vmap"]
BATCHINGS = ("auto", "sequential", "map", "vmap")
_CHECK_EVERY = 10


def check_driver(driver: str) -> None:
  """Raises ValueError unless `driver` is a `Driver`. Does not start a JAX backend, so configs
  can be built before `jax.distributed.initialize`."""
  if driver not in ("auto", "compiled", "python"):
    raise ValueError(f"`driver` must be 'auto', 'compiled' or 'python', got {driver!r}.")


def check_batching(batching: str, driver: str) -> None:
  """Raises ValueError unless `batching` is a `Batching` that `driver` can drive (`"map"` is one
  compiled program, so it cannot take the Python driver). Starts no JAX backend."""
  if batching not in BATCHINGS:
    raise ValueError(f"`batching` must be one of {BATCHINGS}, got {batching!r}.")
  check_driver(driver)
  if batching == "map" and driver == "python":
    raise ValueError(
        "`batching='map'` runs one compiled program and cannot take `driver='python'`; use "
        "driver 'auto' or 'compiled', or batching 'sequential'.")


def resolve_driver(driver: Driver) -> Literal["compiled", "python"]:
  """`"auto"` -> `"python"` on XLA:CPU, `"compiled"` elsewhere."""
  check_driver(driver)
  if driver == "auto":
    return "python" if jax.default_backend() == "cpu" else "compiled"
  return driver


def resolve_batching(batching: Batching) -> Literal["sequential", "map", "vmap"]:
  """`"auto"` -> `"sequential"` on XLA:CPU, `"map"` elsewhere."""
  if batching not in BATCHINGS:
    raise ValueError(f"`batching` must be one of {BATCHINGS}, got {batching!r}.")
  if batching == "auto":
    return "sequential" if jax.default_backend() == "cpu" else "map"
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
  """

  prepare: Callable[[Any, Any, Any], Any]
  step: Callable[[Any, Any, Any], tuple[Any, Any]]
  finish: Callable[[Any, Any, Any], Any]
  stop: Callable[[Any, Any], jax.Array] | None = None


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


def run_images(stage: Stage, static: Any, shared: Any, inputs: Any, num_steps: int, *,
               batching: Batching = "auto", driver: Driver = "auto") -> tuple[Any, Any]:
  """Runs `stage` for every image of `inputs` (arrays with a leading `[B]` axis), each for
  at most `num_steps` steps, in the layout `batching` (see the module docstring).

  Returns:
    `(outputs, outs)`: `finish`'s outputs with a leading `[B]` axis, and the per-step outputs
    `[B, num_steps, ...]` (zeros for steps not taken).
  """
  check_batching(batching, driver)
  layout = resolve_batching(batching)
  if layout == "map":
    return map_program(stage, num_steps)(static, shared, inputs)
  if layout == "vmap":
    carries = _jit_batch_fn(stage.prepare)(static, shared, inputs)
    (_, carries), outs = run_loop(
        _paired_step(stage.step, batched=True), static, (shared, carries), num_steps,
        driver=driver, stop=_paired_stop(stage.stop, batched=True))
    outputs = _jit_batch_fn(stage.finish)(static, shared, carries)
    return outputs, jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), outs)
  prepare, finish = _jit_image_fn(stage.prepare), _jit_image_fn(stage.finish)
  results = []
  for i in range(jax.tree.leaves(inputs)[0].shape[0]):
    carry = prepare(static, shared, jax.tree.map(lambda x: x[i], inputs))
    (_, carry), outs = run_loop(_paired_step(stage.step), static, (shared, carry), num_steps,
                                driver=driver, stop=_paired_stop(stage.stop))
    results.append((finish(static, shared, carry), outs))
  return jax.tree.map(lambda *xs: jnp.stack(xs), *results)
