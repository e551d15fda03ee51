"""Data parallelism over every device and every host: a 1-D mesh and `jax.shard_map`.

`jax.pmap` is in maintenance mode in current JAX and is now implemented on top of
`jax.shard_map`; this module uses `shard_map` directly. The batch axis of the images (and of
their PRNG keys) is split over a 1-D mesh axis `"data"`; the classifier's parameters (and the
VGG16 parameters of the coalition network) are replicated on every device.

Each image is explained by the same one-image program whatever the device count (the image
layouts "sequential" and "map" of `pfc_jax._loop`, and "dense" with its fixed compute batch), so
a sharded run gives the same result, to float32 equality, as a single-device one. With "map"
and "dense" (the GPU/TPU defaults) each device runs a `lax.map` over its images (or compute
batches) inside `shard_map`. With "sequential" (the CPU default: host-driven
per-image loops, which cannot be traced into `shard_map`) each process explains its own rows on
its default device: XLA:CPU's devices share the host's cores, so several of them on one host
add no speed.

Results never depend on how a data set is split: image `i` of a data set always gets the key
`fold_in(PRNGKey(seed), i)` (`image_keys`), whatever the batch size, device count, process
count or resumption point.

Multi-host (TPU pods, multi-node GPU): call `initialize_distributed()` once per process before
any other JAX call; every process then reads only its own rows of each global batch
(`process_slice`), and `global_batch` assembles the global array with
`jax.make_array_from_process_local_data`. `gather_to_host` brings sharded outputs back to
every process.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Callable, Hashable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pfc_jax.explain import Explanation, explain, resolve_config

DATA_AXIS = "data"


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Opt-in multi-host setup: `jax.distributed.initialize` with the same arguments.

  Call once per process, before any other JAX call. On Cloud TPU, Slurm and other clusters that
  JAX detects, all arguments may be left out.

  Args:
    coordinator_address: `host:port` of process 0, reachable from every process.
    num_processes: Total number of processes.
    process_id: This process's index in `[0, num_processes)`.
  """
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id)


def data_mesh(devices=None) -> Mesh:
  """A 1-D mesh with axis `"data"` over `devices` (default: every device of every process)."""
  devices = jax.devices() if devices is None else list(devices)
  if not devices:
    raise ValueError("`devices` must name at least one device.")
  return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


def image_keys(seed: int, indices) -> jax.Array:
  """Per-image PRNG keys that depend only on the seed and each image's stable index.

  Args:
    seed: The job's seed.
    indices: `[B]` int, each image's position in its data set.

  Returns:
    `[B, 2] uint32` raw keys, `fold_in(PRNGKey(seed), index)` row by row.
  """
  indices = jnp.asarray(indices, jnp.uint32)
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.PRNGKey(seed), indices)


def padded_size(batch_size: int, mesh: Mesh) -> int:
  """`batch_size` rounded up to a multiple of the mesh's device count."""
  return -(-batch_size // mesh.size) * mesh.size


def pad_batch(tree: Any, size: int) -> Any:
  """Pads every array's leading axis to `size` by repeating its last row (a valid input)."""
  def pad(x):
    x = np.asarray(x)
    if x.shape[0] == 0:
      raise ValueError("Cannot pad an empty batch.")
    return np.concatenate([x, np.repeat(x[-1:], size - x.shape[0], axis=0)]) if size > x.shape[0] else x
  return jax.tree.map(pad, tree)


def process_slice(global_size: int, mesh: Mesh) -> slice:
  """The rows of a `[global_size, ...]` batch sharded over `mesh` that this process holds.

  `global_size` must be a multiple of the mesh size (see `padded_size`). With one process this
  is every row.
  """
  if global_size % mesh.size:
    raise ValueError(f"`global_size` ({global_size}) must be a multiple of the device count ({mesh.size}).")
  index_map = NamedSharding(mesh, P(DATA_AXIS)).addressable_devices_indices_map((global_size,))
  starts = [index[0].start or 0 for index in index_map.values()]
  stops = [global_size if index[0].stop is None else index[0].stop for index in index_map.values()]
  return slice(min(starts), max(stops))


def global_batch(local_tree: Any, mesh: Mesh, global_size: int) -> Any:
  """Assembles arrays sharded along `"data"` from this process's rows (`process_slice`).

  Args:
    local_tree: Arrays `[n_local, ...]`, this process's rows of the global batch.
    mesh: The data mesh.
    global_size: Rows of the global batch, a multiple of the device count.

  Returns:
    The same tree of global `jax.Array`s `[global_size, ...]`.
  """
  sharding = NamedSharding(mesh, P(DATA_AXIS))
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x), (global_size, *np.shape(x)[1:])),
      local_tree)


def gather_to_host(tree: Any) -> Any:
  """Global arrays -> full NumPy arrays on every process."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def allgather_objects(obj: Any) -> list[Any]:
  """Gathers one JSON-serialisable object from every process, in process order."""
  if jax.process_count() == 1:
    return [obj]
  payload = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  sizes = multihost_utils.process_allgather(np.array([payload.size], np.int32), tiled=True)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:payload.size] = payload
  gathered = multihost_utils.process_allgather(padded[None], tiled=True)
  return [json.loads(row[:size].tobytes()) for row, size in zip(gathered, sizes)]


@functools.cache
def shard_batch(fn: Callable, mesh: Mesh, static: Hashable = None) -> Callable:
  """Compiles `fn` data-parallel over `mesh`; cached, so equal arguments reuse one compilation.

  Args:
    fn: A module-level `fn(static, replicated, *batched) -> outputs` where `batched` arrays and
      every output share a leading batch axis; `fn` must be traceable (no Python control flow
      on values).
    mesh: A 1-D mesh with axis `"data"` (`data_mesh`).
    static: A hashable value bound at compile time, such as a frozen config.

  Returns:
    `sharded(replicated, *batched)`: `replicated` (a pytree, e.g. parameters) goes whole to
    every device, `batched` arrays are split along axis 0, whose size must be a multiple of the
    device count.
  """
  def per_shard(replicated, *batched):
    return fn(static, replicated, *batched)

  def sharded(replicated, *batched):
    in_specs = (P(), *(P(DATA_AXIS) for _ in batched))
    return jax.shard_map(per_shard, mesh=mesh, in_specs=in_specs, out_specs=P(DATA_AXIS),
                         check_vma=False)(replicated, *batched)

  return jax.jit(sharded)


def run_sharded(fn: Callable, mesh: Mesh, static: Hashable, replicated: Any, *batched) -> Any:
  """Runs `shard_batch(fn, mesh, static)` on host arrays of any batch size, on one process.

  Pads the batch to a multiple of the device count by repeating the last row, runs, and drops
  the padding.

  Returns:
    `fn`'s outputs as NumPy arrays with the original batch size.
  """
  batch_size = np.shape(batched[0])[0]
  padded = pad_batch(batched, padded_size(batch_size, mesh))
  placed = jax.device_put(padded, NamedSharding(mesh, P(DATA_AXIS)))
  outputs = shard_batch(fn, mesh, static)(replicated, *placed)
  return jax.tree.map(lambda x: np.asarray(x)[:batch_size], gather_to_host(outputs))


def _traceable(stage_config) -> bool:
  """Whether a stage runs as one traceable program (layout "map", "vmap" or "dense")."""
  return stage_config.layout() != "sequential"


def traceable_config(config):
  """`config` with every stage's loop on the compiled driver, for tracing into `shard_map`.

  Raises:
    ValueError: if a stage's layout resolves to "sequential" (host-driven, not traceable).
  """
  if not all(_traceable(stage) for stage in (config.coalitions, config.perturb)):
    raise ValueError("A stage with batching 'sequential' cannot run inside `shard_map`; use "
                     "batching 'map', 'vmap' or 'dense'.")
  coalitions = dataclasses.replace(config.coalitions, driver="compiled")
  perturb = dataclasses.replace(config.perturb, driver="compiled")
  return dataclasses.replace(config, coalitions=coalitions, perturb=perturb)


def _explain_shard(config, replicated, images, keys):
  classifier, vgg_params = replicated
  return explain(classifier, images, keys, config, vgg_params)


def sharded_explain(classifier, images, keys, config=None, mesh: Mesh | None = None, vgg_params=None):
  """`explain` data-parallel over every device of `mesh`, same results as on one device.

  With one device this is `explain` itself. With several and both stages in a traceable layout
  ("map" or "dense", the GPU/TPU defaults, or "vmap"), `shard_map` of the compiled pipeline
  with the parameters replicated. With a "sequential" stage (the CPU default), each process runs
  `explain` on its own rows and the results are gathered.

  Args:
    classifier: The `Classifier` to explain.
    images: `[B, H, W, 3] float32` RGB in [0, 1]. On one process, any `B`. On several
      processes, this process's rows (`process_slice`) of a global batch whose size is a
      multiple of the device count.
    keys: `[B, 2] uint32` raw keys (`image_keys`) or `[B]` typed keys, one per image.
    config: `ExplainConfig`; default `ExplainConfig.preset("fast")` (`DEFAULT_PRESET`).
    mesh: The data mesh; default `data_mesh()`.
    vgg_params: VGG16 parameters for the coalition network's `init="vgg16"`.

  Returns:
    An `Explanation` with NumPy fields: `B` rows on one process, the whole global batch on
    every process otherwise.
  """
  config = resolve_config(config)
  mesh = data_mesh() if mesh is None else mesh
  if mesh.size == 1:
    return jax.device_get(explain(classifier, images, keys, config, vgg_params))
  if not all(_traceable(stage) for stage in (config.coalitions, config.perturb)):
    local = explain(classifier, images, keys, config, vgg_params)
    if jax.process_count() == 1:
      return jax.device_get(local)
    global_size = np.shape(images)[0] * jax.process_count()
    return Explanation(*gather_to_host(global_batch(local, mesh, global_size)))
  replicated, static = (classifier, vgg_params), traceable_config(config)
  if jax.process_count() == 1:
    return Explanation(*run_sharded(_explain_shard, mesh, static, replicated, images, keys))
  global_size = np.shape(images)[0] * jax.process_count()
  images, keys = global_batch((images, keys), mesh, global_size)
  return Explanation(*gather_to_host(shard_batch(_explain_shard, mesh, static)(replicated, images, keys)))
