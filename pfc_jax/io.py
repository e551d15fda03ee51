"""Atomic file output, and reading a batch job's results back.

Atomic writes: a reader never sees half a file, an interrupted or killed job never leaves one
(at most a temporary `.NAME.*.tmp` beside it, which the next run of the job removes).

A batch job's output folder (`pfc_jax.batch`) holds:

- `manifest.json`: the settings that determine the results and, under `"items"`, what the
  inputs are (`identity()` of `pfc_jax.sources`; see `pfc_jax.batch.build_manifest`).
- `failures.jsonl`: one `{"id", "reason"}` object per line, per item that could not be read,
  in data-set order.
- `job.lock`: present while a job runs (and after a killed one, until the next run takes it
  over); it holds the PID and host of the process writing.
- `results-FIRST-LAST.npz`: one file per compute batch, holding the images of that batch
  (data-set positions FIRST to LAST, 8 or more digits; a batch need not be contiguous when a
  job was resumed). Arrays over the batch's `n` explained images:

  - `indices` `[n]` int64: the image's position in the data set (`pfc_jax.sources`).
  - `ids` `[n]` str: file stem or tfds id.
  - `saliency` `[n, H, W]` float16: PFC saliency, 1 - mean of w over channels (not normalised).
  - `labels` `[n, H, W]` int16: coalition index per pixel.
  - `num_coalitions` `[n]` int32, `target` `[n]` int32, `probs` `[n]` float32.

  and over its `m` unreadable items: `failed_indices` `[m]` int64, `failed_ids` `[m]` str,
  `failed_reasons` `[m]` str.

Folders written by pfc-jax before results files existed (manifest `"format": 1`) hold
`chunk-NNNNN.npz` files instead: chunk `c` covers data-set positions `c * chunk_size` to
`(c + 1) * chunk_size - 1`, with the arrays above but no `indices` or `failed_indices`.
`read_results` and `read_failures` read both layouts, and a job resumed in such a folder keeps
its chunk files and adds results files.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import tempfile
import zipfile
import zlib
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
LOCK_NAME = "job.lock"
RESULT_FIELDS = ("saliency", "labels", "num_coalitions", "target", "probs")
_RESULTS_FILE = re.compile(r"results-(\d{8,})-(\d{8,})\.npz")
_CHUNK_FILE = re.compile(r"chunk-(\d{5,})\.npz")


def results_path(out_dir: str | os.PathLike, first: int, last: int) -> Path:
  """Where the results of a compute batch of data-set positions `first..last` are stored."""
  return Path(out_dir) / f"results-{first:08d}-{last:08d}.npz"


def results_paths(out_dir: str | os.PathLike) -> list[Path]:
  """The results files in `out_dir`, in order of their first data-set position."""
  paths = [p for p in Path(out_dir).glob("results-*.npz") if _RESULTS_FILE.fullmatch(p.name)]
  return sorted(paths, key=lambda p: [int(g) for g in _RESULTS_FILE.fullmatch(p.name).groups()])


def chunk_paths(out_dir: str | os.PathLike) -> list[Path]:
  """The chunk files of a folder in the first layout (see the module docstring), in chunk order."""
  paths = [p for p in Path(out_dir).glob("chunk-*.npz") if _CHUNK_FILE.fullmatch(p.name)]
  return sorted(paths, key=lambda p: int(_CHUNK_FILE.fullmatch(p.name).group(1)))


def chunk_number(path: str | os.PathLike) -> int:
  """The chunk number `c` of a `chunk-NNNNN.npz` file."""
  return int(_CHUNK_FILE.fullmatch(Path(path).name).group(1))


def load_results_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads one results or chunk file whole, checking that it is intact.

  Every member's CRC is verified, so a truncated or damaged file is detected rather than read.

  Args:
    path: A `results-FIRST-LAST.npz` or `chunk-NNNNN.npz` file.

  Returns:
    `{name: array}` with the fields of the module docstring.

  Raises:
    ValueError: the file is truncated, damaged, or lacks a field or has fields of unequal
      lengths; the message names the file and what is wrong.
  """
  path = Path(path)
  required = ("ids", *RESULT_FIELDS, "failed_ids", "failed_reasons")
  if _RESULTS_FILE.fullmatch(path.name):
    required += ("indices", "failed_indices")
  try:
    with zipfile.ZipFile(path) as archive:
      arrays = {name.removesuffix(".npy"): np.lib.format.read_array(io.BytesIO(archive.read(name)))
                for name in archive.namelist()}
  except (OSError, EOFError, ValueError, RuntimeError, zipfile.BadZipFile, zlib.error) as e:
    # What zipfile and numpy raise on damaged bytes (RuntimeError: a flag read as "encrypted").
    raise ValueError(f"Damaged results file {str(path)!r} ({type(e).__name__}: {e}).") from e
  missing = [name for name in required if name not in arrays]
  if missing:
    raise ValueError(f"Damaged results file {str(path)!r}: no {', '.join(missing)}.")
  rows = {name: arrays[name].shape[:1] for name in required if not name.startswith("failed")}
  failed = {name: arrays[name].shape[:1] for name in required if name.startswith("failed")}
  image_fields_ok = arrays["saliency"].ndim == 3 and arrays["labels"].ndim == 3
  if len(set(rows.values())) != 1 or len(set(failed.values())) != 1 or not image_fields_ok:
    raise ValueError(f"Damaged results file {str(path)!r}: fields of unequal lengths "
                     f"{ {**rows, **failed} } or saliency/labels not [n, H, W].")
  return arrays


def _records(out_dir: Path) -> Iterator[tuple[int, Path, dict[str, np.ndarray]]]:
  """`(first data-set position, path, arrays)` of every results and chunk file in `out_dir`."""
  chunks = chunk_paths(out_dir)
  if chunks:
    chunk_size = int(json.loads((out_dir / MANIFEST_NAME).read_text())["chunk_size"])
  for path in chunks:
    yield chunk_number(path) * chunk_size, path, load_results_file(path)
  for path in results_paths(out_dir):
    yield int(_RESULTS_FILE.fullmatch(path.name).group(1)), path, load_results_file(path)


def _check_job_folder(out_dir: str | os.PathLike) -> Path:
  out_dir = Path(out_dir)
  if not (out_dir / MANIFEST_NAME).is_file():
    raise ValueError(f"`out_dir` {str(out_dir)!r} is not a batch job's output folder (no {MANIFEST_NAME}).")
  return out_dir


def read_results(out_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
  """Reads every finished image of a batch job, from either layout of the module docstring.

  Args:
    out_dir: A `pfc-jax batch` output folder, finished or not.

  Returns:
    `{id: record}` in data-set order; each record has `saliency` `[H, W]` float16, `labels`
    `[H, W]` int16, and ints `num_coalitions`, `target` and float `probs`.

  Raises:
    ValueError: `out_dir` has no manifest, a results file is damaged (run the job again to
      recompute it), or an id occurs twice.
  """
  out_dir = _check_job_folder(out_dir)
  rows = []
  for first, path, arrays in _records(out_dir):
    positions = arrays["indices"] if "indices" in arrays else first + np.arange(arrays["ids"].size)
    for row, (position, item_id) in enumerate(zip(positions.tolist(), arrays["ids"].tolist())):
      rows.append((position, item_id, path, {
          name: arrays[name][row] if arrays[name].ndim > 1 else arrays[name][row].item()
          for name in RESULT_FIELDS}))
  results = {}
  for _, item_id, path, record in sorted(rows, key=lambda row: row[0]):
    if item_id in results:
      raise ValueError(f"Id {item_id!r} occurs twice in {str(out_dir)!r} (again in {path.name}).")
    results[item_id] = record
  return results


def read_failures(out_dir: str | os.PathLike) -> dict[str, str]:
  """`{id: reason}` for every item of a batch job in `out_dir` that could not be read.

  Raises:
    ValueError: `out_dir` has no manifest, or a results file is damaged.
  """
  out_dir = _check_job_folder(out_dir)
  rows = []
  for first, _, arrays in _records(out_dir):
    positions = arrays.get("failed_indices", np.full(arrays["failed_ids"].size, first))
    rows += zip(positions.tolist(), arrays["failed_ids"].tolist(), arrays["failed_reasons"].tolist())
  return {item_id: reason for _, item_id, reason in sorted(rows, key=lambda row: row[0])}
