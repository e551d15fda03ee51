"""JAX's persistent compilation cache for the command line and batch jobs.

Compiling the `paper` preset's programs takes tens of seconds on an accelerator, and the
Python-driven CPU loops compile dozens of small programs; with the cache, a second run of the
same command (same shapes, settings, JAX version and device) loads them from disk instead.

The cache is opt-in: set `PFC_JAX_CACHE` to a folder (created if missing), or call `enable`
from Python before the first computation. JAX keys each entry on the program, the compiler
options, the device and the JAX version, so one folder may serve several machines and versions.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

ENV_VAR = "PFC_JAX_CACHE"


def enable(path: str | os.PathLike | None = None) -> Path | None:
  """Turns on JAX's persistent compilation cache in `path`, or in `$PFC_JAX_CACHE`.

  Every compiled program is cached, however quick its compilation (JAX's default keeps only
  those taking over a second, which leaves out most of the CPU loop's step programs). Starts no
  JAX backend, so it may precede `jax.distributed.initialize`.

  Args:
    path: Cache folder; default: the `PFC_JAX_CACHE` environment variable.

  Returns:
    The cache folder, or None when neither `path` nor `PFC_JAX_CACHE` names one (nothing is
    changed then).

  Raises:
    ValueError: if the folder exists as a file, or cannot be created.
  """
  path = path if path is not None else os.environ.get(ENV_VAR) or None
  if path is None:
    return None
  folder = Path(path).expanduser()
  try:
    folder.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise ValueError(f"Cannot use compilation cache folder {str(folder)!r} "
                     f"(from {ENV_VAR} or `path`): {e.strerror or e}.") from e
  jax.config.update("jax_compilation_cache_dir", str(folder))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return folder
