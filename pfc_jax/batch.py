"""Resumable batch explanation of a whole image source, chunk by chunk.

A job explains items `0 .. N-1` of a source (`pfc_jax.sources`) in chunks of `chunk_size`
consecutive indices. Each finished chunk is one file written atomically (temporary file, then
rename), so an interrupted job leaves only whole chunks; running it again skips them and redoes
the rest. `manifest.json` records every setting that changes the results; a job with different
settings is refused on an existing output folder. Item `i` is explained with the key
`fold_in(PRNGKey(seed), i)`, so the results do not depend on chunk size, device count, process
count or where a job was resumed. Items that cannot be read are recorded with the reason in
their chunk and in `failures.jsonl`, and the job carries on. The file format is described in
`pfc_jax.io`.

Across hosts, every process runs `run_job` with the same arguments (after
`parallel.initialize_distributed()`); each reads only its rows of each chunk, and process 0
writes the files, so `out_dir` need only be writable by process 0.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import tqdm

from pfc_jax import io, parallel
from pfc_jax.explain import ExplainConfig
from pfc_jax.sources import BadItemError

_FORMAT_VERSION = 1


class JobSummary(NamedTuple):
  """What one `run_job` call did.

  Attributes:
    num_chunks: Chunks in the job.
    skipped_chunks: Chunks already finished before this call.
    explained: Images explained by this call.
    failed: Items of this call's chunks that could not be read.
  """
  num_chunks: int
  skipped_chunks: int
  explained: int
  failed: int


def build_manifest(source, config: ExplainConfig, chunk_size: int, seed: int,
                   settings: dict[str, Any]) -> dict[str, Any]:
  """The JSON-ready record of everything that determines a job's results.

  Args:
    source: The image source (its `describe()` is recorded).
    config: The explanation settings.
    chunk_size: Images per chunk file.
    seed: The job's seed.
    settings: Caller's further settings, e.g. model name and weights fingerprint.
  """
  return json.loads(json.dumps({
      "format": _FORMAT_VERSION, "input": source.describe(), "chunk_size": int(chunk_size),
      "seed": int(seed), "settings": settings, "config": dataclasses.asdict(config)}))


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    flat = {}
    for key, value in tree.items():
      flat.update(_flatten(value, f"{prefix}{key}."))
    return flat
  return {prefix[:-1]: tree}


def check_manifest(out_dir: str | Path, manifest: dict[str, Any]) -> bool:
  """Checks `manifest` against the one stored in `out_dir`.

  Returns:
    Whether `out_dir` already holds a manifest (an equal one).

  Raises:
    ValueError: the stored manifest differs; the message names every differing setting.
  """
  path = Path(out_dir) / io.MANIFEST_NAME
  if not path.is_file():
    return False
  stored = _flatten(json.loads(path.read_text()))
  wanted = _flatten(manifest)
  differences = [f"{key}: {stored.get(key, '<missing>')!r} there, {wanted.get(key, '<missing>')!r} now"
                 for key in sorted(set(stored) | set(wanted)) if stored.get(key) != wanted.get(key)]
  if differences:
    raise ValueError(
        f"`out` {str(out_dir)!r} holds a job with other settings; use another output folder or "
        "delete it to start over. Differences: " + "; ".join(differences))
  return True


def _remove_temporary_files(out_dir: Path) -> None:
  """Removes temporary files an interrupted writer left (`io.atomic_path` names them `.*.tmp`)."""
  for path in out_dir.glob(".*.tmp"):
    path.unlink(missing_ok=True)


def _read_rows(source, indices: list[int]) -> tuple[list[str], np.ndarray, list[tuple[str, str]]]:
  """Reads items; an unreadable one gets a mid-grey placeholder image and a failure entry."""
  ids, images, failures = [], [], []
  for index in indices:
    try:
      item_id, image = source.read(index)
    except BadItemError as e:
      item_id, image = e.item_id, np.full((source.size, source.size, 3), 0.5, np.float32)
      failures.append((item_id, e.reason))
    ids.append(item_id)
    images.append(image)
  return ids, np.stack(images), failures


def _explain_chunk(source, indices: list[int], classifier, config: ExplainConfig, seed: int, mesh,
                   vgg_params) -> dict[str, np.ndarray]:
  """Explains one chunk on every device of every process; returns the chunk file's arrays."""
  global_size = parallel.padded_size(len(indices), mesh)
  padded = indices + [indices[-1]] * (global_size - len(indices))
  rows = padded[parallel.process_slice(global_size, mesh)] if jax.process_count() > 1 else padded
  ids, images, failures = _read_rows(source, rows)
  explanation = parallel.sharded_explain(
      classifier, images, parallel.image_keys(seed, rows), config, mesh, vgg_params)
  gathered = parallel.allgather_objects({"ids": ids, "failures": failures})
  ids = [item_id for part in gathered for item_id in part["ids"]][:len(indices)]
  failures = dict(failure for part in gathered for failure in part["failures"])
  keep = np.array([item_id not in failures for item_id in ids], bool)
  return {
      "ids": np.array(ids, str)[keep],
      "saliency": np.asarray(explanation.saliency[:len(indices)][keep], np.float16),
      "labels": np.asarray(explanation.labels[:len(indices)][keep], np.int16),
      "num_coalitions": np.asarray(explanation.num_coalitions[:len(indices)][keep], np.int32),
      "target": np.asarray(explanation.target[:len(indices)][keep], np.int32),
      "probs": np.asarray(explanation.probs[:len(indices)][keep], np.float32),
      "failed_ids": np.array(list(failures), str),
      "failed_reasons": np.array(list(failures.values()), str),
  }


def _write_failures(out_dir: Path) -> None:
  lines = [json.dumps({"id": item_id, "reason": reason}) + "\n"
           for item_id, reason in io.read_failures(out_dir).items()]
  io.write_bytes(out_dir / io.FAILURES_NAME, "".join(lines).encode())


def run_job(source, classifier, out_dir: str | Path, *, config: ExplainConfig = ExplainConfig(),
            chunk_size: int = 64, seed: int = 0, settings: dict[str, Any] | None = None,
            vgg_params: Any = None, mesh=None, progress: bool = True) -> JobSummary:
  """Explains every item of `source` into `out_dir`, resuming a previous run of the same job.

  Args:
    source: An indexed source with `__len__`, `read(i) -> (id, image01)`, `describe()` and
      `size` (`sources.ImageFolderSource`, `sources.TfdsSource`).
    classifier: The `Classifier` to explain.
    out_dir: Output folder, created if missing.
    config: Explanation settings.
    chunk_size: Images per chunk file; also the batch given to `explain`.
    seed: Item `i`'s key is `fold_in(PRNGKey(seed), i)`.
    settings: Further settings to record and check in the manifest (model, weights).
    vgg_params: VGG16 parameters for the coalition network's `init="vgg16"`.
    mesh: Data mesh; default every device (`parallel.data_mesh()`).
    progress: Show a progress bar (images/s, ETA) on process 0.

  Returns:
    A `JobSummary`.

  Raises:
    ValueError: `out_dir` holds a job with other settings, or `chunk_size` < 1.
  """
  if chunk_size < 1:
    raise ValueError(f"`chunk_size` must be at least 1, got {chunk_size}.")
  out_dir = Path(out_dir)
  mesh = parallel.data_mesh() if mesh is None else mesh
  writer = jax.process_index() == 0
  manifest = build_manifest(source, config, chunk_size, seed, settings or {})
  num_chunks = -(-len(source) // chunk_size)
  if writer:
    if not check_manifest(out_dir, manifest):
      io.write_json(out_dir / io.MANIFEST_NAME, manifest)
    _remove_temporary_files(out_dir)
    pending = [c for c in range(num_chunks) if not io.chunk_path(out_dir, c).is_file()]
  else:
    pending = None
  pending = parallel.allgather_objects(pending)[0]
  total = sum(min(len(source), (c + 1) * chunk_size) - c * chunk_size for c in pending)
  explained = failed = 0
  with tqdm.tqdm(total=total, unit="img", disable=not (progress and writer), desc="explain") as bar:
    for chunk in pending:
      indices = list(range(chunk * chunk_size, min(len(source), (chunk + 1) * chunk_size)))
      arrays = _explain_chunk(source, indices, classifier, config, seed, mesh, vgg_params)
      if writer:
        io.write_npz(io.chunk_path(out_dir, chunk), **arrays)
        if arrays["failed_ids"].size:
          _write_failures(out_dir)
      explained += arrays["ids"].size
      failed += arrays["failed_ids"].size
      bar.update(len(indices))
  if writer:
    _write_failures(out_dir)
  return JobSummary(num_chunks, num_chunks - len(pending), explained, failed)
