"""Atomic file output, and reading a batch job's results back.

Atomic writes: a reader never sees half a file, an interrupted job never leaves one.

A batch job's output folder (`pfc_jax.batch`) holds `manifest.json` (the job's settings),
`failures.jsonl` (one `{"id", "reason"}` object per line) and one `chunk-NNNNN.npz` per chunk
of `chunk_size` consecutive images, with arrays over the chunk's successful images:

- `ids` `[n]` str: file stem or tfds id.
- `saliency` `[n, H, W]` float16: PFC saliency, 1 - mean of w over channels (not normalised).
- `labels` `[n, H, W]` int16: coalition index per pixel.
- `num_coalitions` `[n]` int32, `target` `[n]` int32, `probs` `[n]` float32.
- `failed_ids` `[m]` str, `failed_reasons` `[m]` str: the chunk's unreadable items.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

_UMASK = os.umask(0)
os.umask(_UMASK)


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
  os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file ordinary permissions.
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


MANIFEST_NAME = "manifest.json"
FAILURES_NAME = "failures.jsonl"
RESULT_FIELDS = ("saliency", "labels", "num_coalitions", "target", "probs")


def chunk_path(out_dir: str | os.PathLike, chunk: int) -> Path:
  """Where chunk number `chunk` of a batch job in `out_dir` is stored."""
  return Path(out_dir) / f"chunk-{chunk:05d}.npz"


def chunk_paths(out_dir: str | os.PathLike) -> list[Path]:
  """The finished chunk files in `out_dir`, in chunk order."""
  return sorted(Path(out_dir).glob("chunk-[0-9][0-9][0-9][0-9][0-9].npz"))


def read_results(out_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
  """Reads every finished chunk of a batch job.

  Args:
    out_dir: A `pfc-jax batch` output folder.

  Returns:
    `{id: record}` in data-set order; each record has `saliency` `[H, W]` float16, `labels`
    `[H, W]` int16, and ints `num_coalitions`, `target` and float `probs`.

  Raises:
    ValueError: `out_dir` has no manifest, or an id occurs twice.
  """
  out_dir = Path(out_dir)
  if not (out_dir / MANIFEST_NAME).is_file():
    raise ValueError(f"`out_dir` {str(out_dir)!r} is not a batch job's output folder (no {MANIFEST_NAME}).")
  results = {}
  for path in chunk_paths(out_dir):
    with np.load(path) as chunk:
      fields = {name: chunk[name] for name in RESULT_FIELDS}
      for row, item_id in enumerate(chunk["ids"].tolist()):
        if item_id in results:
          raise ValueError(f"Id {item_id!r} occurs twice in {str(out_dir)!r} (again in {path.name}).")
        results[item_id] = {name: values[row] if values.ndim > 1 else values[row].item()
                            for name, values in fields.items()}
  return results


def read_failures(out_dir: str | os.PathLike) -> dict[str, str]:
  """`{id: reason}` for every item of a batch job in `out_dir` that could not be read."""
  failures = {}
  for path in chunk_paths(out_dir):
    with np.load(path) as chunk:
      failures.update(zip(chunk["failed_ids"].tolist(), chunk["failed_reasons"].tolist()))
  return failures
