"""Atomic file output: a reader never sees half a file, an interrupted job never leaves one."""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
  """Yields a temporary path beside `path`; renames it onto `path` when the block succeeds.

  The temporary file starts with `.` and ends with `.tmp`, so listings can ignore it; on error
  it is removed.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  os.close(fd)
  try:
    yield Path(tmp)
    with open(tmp, "rb+") as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Writes `data` to `path` atomically."""
  with atomic_path(path) as tmp:
    tmp.write_bytes(data)


def write_json(path: str | os.PathLike, obj: Any) -> None:
  """Writes `obj` as indented JSON to `path` atomically."""
  write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def write_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
  """Writes arrays as a compressed `.npz` to `path` atomically."""
  buffer = io.BytesIO()
  np.savez_compressed(buffer, **{k: np.asarray(v) for k, v in arrays.items()})
  write_bytes(path, buffer.getvalue())
