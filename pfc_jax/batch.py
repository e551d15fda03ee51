"""Resumable, kill-safe batch explanation of a whole image source.

A job explains items `0 .. N-1` of a source (`pfc_jax.sources`) in compute batches of
`chunk_size` images, each batch spread over every device. Each finished batch is saved at once
as one results file written atomically (temporary file, then rename), so whenever and however a
job ends, even by SIGKILL, every image finished before that moment is on disk, and no file is
ever half written. Running the job again skips the saved images and explains the rest; the
chunk size may differ between runs. Image `i` is explained with the key
`fold_in(PRNGKey(seed), i)`, so the results do not depend on chunk size, device count, process
count or where a job was resumed.

On resume a results file that is damaged (truncated, corrupt) is reported, removed and its
images explained again. `manifest.json` records every setting that changes the results (and,
for information, the first run's chunk size and layout: `explain.EXECUTION_FIELDS`, which change
how images are computed, not the results); a job with different settings is refused on an
existing output folder. It also records what the inputs are (`source.identity()`: each image
file's name, size and modification time; a tfds split's version and size), and a resume whose
inputs changed since the job started (an item replaced, renamed, added or removed) is refused,
naming the items, rather than mixing results of the old and the new inputs; the ids of the
first few saved items are also read back from the source and compared. So is a resume by another pfc-jax
version, whose results may differ. A folder written before identities were recorded (manifest
format 2 and older) cannot be checked: it is resumed with a warning, and the identities of the
inputs found then, and the version, are recorded for later runs.

While a job runs it holds `job.lock` in its folder, so a second job on the same folder is
refused rather than interleaved; the lock is an `flock`, which the operating system releases
however the process ends, and the file names the holder's PID. A lock left by a process that
has ended is taken over.

Reading and decoding the next compute batch, and writing the previous one's results file, run on
background threads while the current batch computes (`pfc_jax.prefetch`), so the device does not
wait on the host; a results file is still complete before it counts as saved.

Items that cannot be read are recorded with the reason in their results file and in
`failures.jsonl`, and the job carries on; they are not retried on resume. The file format is
described in `pfc_jax.io`.

With `exit_on_signal=True` (the command line), SIGINT (Ctrl-C) and SIGTERM end the job at once,
even in the middle of a compute batch: a write under way completes, one line says how many
items are saved and how to resume, and the process exits with 128 + the signal number (130,
143). The computation under way is dropped; everything finished before it is kept.

Across hosts, every process runs `run_job` with the same arguments (after
`parallel.initialize_distributed()`); each reads only its rows of each compute batch, and
process 0 holds the lock and writes the files, so `out_dir` need only be writable by
process 0.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import signal
import socket
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import jax
import numpy as np
import tqdm

import pfc_jax
from pfc_jax import io, parallel, prefetch, sources
from pfc_jax.classifier import check_classifier
from pfc_jax.explain import EXECUTION_FIELDS, ExplainConfig, resolve_config
from pfc_jax.sources import BadItemError

_FORMAT_VERSION = 3  # 3: manifests record the inputs' identity ("items").
# Manifest entries recorded for information only: resuming with other values is allowed.
_UNCHECKED = ("format", "chunk_size")
_ITEMS = "items"  # The inputs' identity, compared item by item (`sources.identity_changes`).
_VERSION = "pfc_jax"  # The pfc-jax version that computed the results.
_ID_CHECKS = 8  # Saved items whose ids are read back from the source on resume.
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_ACCELERATOR_CHUNK_SIZE = 64


class JobSummary(NamedTuple):
  """What one `run_job` call did, and where the job stands.

  Attributes:
    num_items: Items in the source.
    already_done: Items finished (explained or found unreadable) before this call.
    explained: Images explained by this call.
    failed: Items found unreadable by this call.
    total_failed: Unreadable items of the whole job, listed in `failures.jsonl`.
  """
  num_items: int
  already_done: int
  explained: int
  failed: int
  total_failed: int


class JobLockedError(RuntimeError):
  """Another job holds the output folder's `job.lock`."""


def default_chunk_size(mesh) -> int:
  """Images per compute batch when none is given: one per device on the CPU, else 64.

  On the CPU, explaining images together is no faster than one after the other (2 shared CPU
  cores, SqueezeNet 1.1, "fast" preset, 4 photos at 64 px, `parallel.sharded_explain` after
  compilation: 47.4 s as one batch, 47.2 s one at a time), so each image is saved as soon as it
  is done. On GPU and TPU larger batches raise throughput; 64 images are explained (and saved)
  together, at least one per device.
  """
  if mesh.devices.flat[0].platform == "cpu":
    return mesh.size
  return max(_ACCELERATOR_CHUNK_SIZE, mesh.size)


def build_manifest(source, config: ExplainConfig, chunk_size: int, seed: int,
                   settings: dict[str, Any]) -> dict[str, Any]:
  """The JSON-ready record of everything that determines a job's results.

  Args:
    source: The image source (its `describe()` and `identity()` are recorded).
    config: The explanation settings.
    chunk_size: Images per compute batch; recorded for information (not checked on resume).
    seed: The job's seed.
    settings: Caller's further settings, e.g. model name and weights fingerprint.
  """
  return json.loads(json.dumps({
      "format": _FORMAT_VERSION, "input": source.describe(), "chunk_size": int(chunk_size),
      "seed": int(seed), "settings": settings, "config": dataclasses.asdict(config),
      _VERSION: pfc_jax.__version__, _ITEMS: source.identity()}))


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    flat = {}
    for key, value in tree.items():
      flat.update(_flatten(value, f"{prefix}{key}."))
    return flat
  return {prefix[:-1]: tree}


def check_manifest(out_dir: str | Path, manifest: dict[str, Any]) -> dict[str, Any] | None:
  """Checks `manifest` against the one stored in `out_dir`, except the informational entries.

  The settings and the pfc-jax version are compared entry by entry, the inputs' identities
  item by item. A stored manifest without identities and version (written before they were
  recorded) passes those two checks.

  Returns:
    The stored manifest, or None when `out_dir` holds none.

  Raises:
    ValueError: the stored manifest differs in a setting that changes the results, or in the
      inputs (an item changed, added or removed; the message names every setting and up to 10
      items of each kind), or was written by a newer pfc-jax.
  """
  path = Path(out_dir) / io.MANIFEST_NAME
  if not path.is_file():
    return None
  stored_manifest = json.loads(path.read_text())
  if stored_manifest.get("format", 0) > _FORMAT_VERSION:
    raise ValueError(f"`out` {str(out_dir)!r} was written by a newer pfc-jax (format "
                     f"{stored_manifest['format']}); upgrade pfc-jax or use another output folder.")
  checked = lambda m: {key: value for key, value in m.items()
                       if key != _ITEMS and (key != _VERSION or _VERSION in stored_manifest)}
  stored, wanted = _flatten(checked(stored_manifest)), _flatten(checked(manifest))
  differences = [f"{key}: {stored.get(key, '<missing>')!r} there, {wanted.get(key, '<missing>')!r} now"
                 for key in sorted(set(stored) | set(wanted),
                                   key=lambda key: (not key.startswith("settings."), key))
                 if key not in _UNCHECKED and key.rsplit(".", 1)[-1] not in EXECUTION_FIELDS
                 and stored.get(key) != wanted.get(key)]
  changes = []
  if _ITEMS in stored_manifest:
    changes = sources.identity_changes(stored_manifest[_ITEMS], manifest[_ITEMS])
  if differences or changes:
    raise ValueError(
        f"`out` {str(out_dir)!r} holds a job with other "
        + " and ".join(["settings"] * bool(differences) + ["inputs"] * bool(changes))
        + "; resuming would mix their results with these. Use another output folder, or delete "
        "it to start over."
        + (" Differences: " + "; ".join(differences) + "." if differences else "")
        + (" Inputs changed since the job started: " + "; ".join(changes) + "." if changes else ""))
  return stored_manifest


class _JobLock:
  """`out_dir/job.lock`, held with `flock` from `acquire` to `release` (or the process's end).

  The file holds `{"pid", "host"}` of the holder, for messages only: whether a lock is held is
  the operating system's `flock` state, which ends with the process however it ends.
  """

  def __init__(self, out_dir: Path):
    self.path = out_dir / io.LOCK_NAME
    self._fd = None
    self._guard = threading.Lock()

  @staticmethod
  def _holder(fd: int) -> str:
    try:
      holder = json.loads(os.pread(fd, 4096, 0))
      return f"process {int(holder['pid'])} on {holder['host']}"
    except (ValueError, TypeError, KeyError):  # Empty or half written by a killed process.
      return "an unknown process"

  def acquire(self) -> str | None:
    """Takes the lock.

    Returns:
      The previous holder, when a lock file left by a process that has ended was taken over.

    Raises:
      JobLockedError: another running process holds the lock.
    """
    self.path.parent.mkdir(parents=True, exist_ok=True)
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = self._holder(fd)
        os.close(fd)
        raise JobLockedError(
            f"`out` {str(self.path.parent)!r} is in use by another job ({holder}, "
            f"{self.path.name}); wait for it to end or stop it, or use another output folder."
        ) from None
      try:
        opened, named = os.fstat(fd), os.stat(self.path)
        if (opened.st_dev, opened.st_ino) == (named.st_dev, named.st_ino):
          break
      except FileNotFoundError:
        pass
      os.close(fd)  # The holder removed the file as it released it; lock the next one.
    stale = self._holder(fd) if os.fstat(fd).st_size else None
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
    self._fd = fd
    return stale

  def release(self) -> None:
    """Removes the file and releases the lock; safe to call twice and from any thread."""
    with self._guard:
      if self._fd is not None:
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None


@dataclasses.dataclass
class _Progress:
  """Where a running job stands; read by the signal watcher to say what is saved."""
  out_dir: Path
  num_items: int
  done: int = 0
  failed: int = 0
  job_lock: _JobLock | None = None
  bar_shown: bool = False
  write_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
  stopping: threading.Event = dataclasses.field(default_factory=threading.Event)

  def wait_if_stopping(self) -> None:
    """Blocks for good once a stop signal is being handled (the watcher ends the process), so
    that no write starts after the one under way when the signal came."""
    if self.stopping.is_set():
      threading.Event().wait()

  def release_lock(self) -> None:
    if self.job_lock is not None:
      self.job_lock.release()

  def stop_message(self, signum: int) -> str:
    return (f"pfc-jax batch: stopped by {signal.Signals(signum).name}; {self.done} of "
            f"{self.num_items} items are saved in {self.out_dir} ({self.failed} unreadable). "
            "Run the same command again to resume.")


def _watch_signals(read_fd: int, progress: _Progress) -> None:
  """Waits for SIGINT or SIGTERM (or a 0 byte: the job ended), then ends the process."""
  while True:
    signum = os.read(read_fd, 1)[0]
    if signum == 0:
      return
    if signum in _STOP_SIGNALS:
      break
  progress.stopping.set()
  progress.write_lock.acquire()  # A write under way completes; none starts after it.
  progress.release_lock()
  sys.stdout.flush()  # The message goes below the progress bar, which stays as it was at the stop.
  sys.stderr.write(("\n" if progress.bar_shown else "") + progress.stop_message(signum) + "\n")
  sys.stderr.flush()
  os._exit(128 + signum)  # Without waiting for the computation under way.


def _ignore(signum, frame) -> None:  # pylint: disable=unused-argument
  """Python-level handler: the signal is acted on by `_watch_signals`."""


@contextlib.contextmanager
def _exit_on_signal(progress: _Progress) -> Iterator[None]:
  """Within the block, SIGINT and SIGTERM end the process promptly (see the module docstring).

  A compiled computation holds the main thread in C, where Python's own handlers (and so
  KeyboardInterrupt) wait until it returns. Python's C-level handler also writes the signal's
  number to the wakeup fd, from whichever thread receives it, so a watcher thread reading that
  fd can act at once. Must be entered from the main thread.
  """
  read_fd, write_fd = os.pipe()
  os.set_blocking(write_fd, False)
  previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
  previous = {signum: signal.signal(signum, _ignore) for signum in _STOP_SIGNALS}
  watcher = threading.Thread(target=_watch_signals, args=(read_fd, progress), daemon=True,
                             name="pfc-jax-signals")
  watcher.start()
  try:
    yield
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)
    signal.set_wakeup_fd(previous_fd)
    os.write(write_fd, b"\0")
    watcher.join()
    os.close(read_fd)
    os.close(write_fd)


def _remove_temporary_files(out_dir: Path) -> None:
  """Removes temporary files an interrupted writer left (`io.atomic_path` names them `.*.tmp`)."""
  for path in out_dir.glob(".*.tmp"):
    path.unlink(missing_ok=True)


class _Saved(NamedTuple):
  """What the intact results files of a folder hold."""
  done: set[int]  # Data-set positions explained or found unreadable.
  failures: dict[str, tuple[int, str]]  # id -> (position, or its chunk's first one; reason)
  ids: dict[int, tuple[str, str]]  # position -> (id, file name); results files only


def _scan(out_dir: Path, stored_manifest: dict[str, Any] | None, num_items: int) -> _Saved:
  """Reads every results (and first-layout chunk) file; removes damaged ones with a warning.

  Raises:
    ValueError: two files hold the same data-set position.
  """
  chunk_size = stored_manifest["chunk_size"] if stored_manifest else 0
  owner, failures, ids = {}, {}, {}
  for path in io.chunk_paths(out_dir) + io.results_paths(out_dir):
    try:
      arrays = io.load_results_file(path)
    except ValueError as e:
      warnings.warn(f"{e} Removed it; its images are explained again.", stacklevel=3)
      path.unlink()
      continue
    if "indices" in arrays:
      positions = arrays["indices"].tolist() + arrays["failed_indices"].tolist()
      failed_positions = arrays["failed_indices"].tolist()
      ids.update((position, (item_id, path.name)) for position, item_id in zip(
          positions, arrays["ids"].tolist() + arrays["failed_ids"].tolist()))
    else:
      first = io.chunk_number(path) * chunk_size
      positions = list(range(first, min(num_items, first + chunk_size)))
      failed_positions = [first] * arrays["failed_ids"].size
    for position in positions:
      if position in owner:
        raise ValueError(f"{owner[position].name} and {path.name} in {str(out_dir)!r} both hold "
                         f"item {position}; remove one of them and run the job again.")
      owner[position] = path
    failures.update((item_id, (position, reason)) for item_id, reason, position in zip(
        arrays["failed_ids"].tolist(), arrays["failed_reasons"].tolist(), failed_positions))
  return _Saved(set(owner), failures, ids)


def _check_saved_ids(source, ids: dict[int, tuple[str, str]], out_dir: Path) -> None:
  """Reads back the ids of the first `_ID_CHECKS` saved items from `source` (`item_id`) and
  compares them with the saved ones. The first ones, read in order, cost one record each, also
  for sequential readers (`sources._TfDataRecords`); another build or order of a data set
  changes them as surely as any.

  Raises:
    ValueError: naming the items whose ids differ: the source is not the one the results were
      computed from (another tfds build, or records in another order).
  """
  positions = [position for position in sorted(ids) if position < len(source)][:_ID_CHECKS]
  current = {position: source.item_id(position) for position in positions}
  wrong = [f"item {position} is {item_id!r} now but {ids[position][0]!r} in {ids[position][1]}"
           for position, item_id in current.items() if item_id != ids[position][0]]
  if wrong:
    raise ValueError(
        f"`out` {str(out_dir)!r} holds results of other inputs: " + "; ".join(wrong) + ". Use "
        "another output folder, or delete it to start over.")


def _write_failures(out_dir: Path, failures: dict[str, tuple[int, str]]) -> None:
  """Writes `failures.jsonl` in data-set order, unless it already says the same."""
  text = "".join(json.dumps({"id": item_id, "reason": reason}) + "\n"
                 for item_id, (_, reason) in sorted(failures.items(), key=lambda item: item[1][0]))
  path = out_dir / io.FAILURES_NAME
  if not path.is_file() or path.read_text() != text:
    io.write_bytes(path, text.encode())


def _read_rows(source, indices: list[int]) -> tuple[list[str], np.ndarray, list[tuple[int, str, str]]]:
  """Reads items; an unreadable one gets a mid-grey placeholder image and a failure entry."""
  ids, images, failures = [], [], []
  for index in indices:
    try:
      item_id, image = source.read(index)
    except BadItemError as e:
      item_id, image = e.item_id, np.full((source.size, source.size, 3), 0.5, np.float32)
      failures.append((index, item_id, e.reason))
    ids.append(item_id)
    images.append(image)
  return ids, np.stack(images), failures


def _read_batch(source, indices: list[int], mesh) -> tuple[list[int], tuple]:
  """`(rows, _read_rows(rows))`: this process's rows of one compute batch (padded to a
  multiple of the device count by repeating the last index), read."""
  global_size = parallel.padded_size(len(indices), mesh)
  padded = indices + [indices[-1]] * (global_size - len(indices))
  rows = padded[parallel.process_slice(global_size, mesh)] if jax.process_count() > 1 else padded
  return rows, _read_rows(source, rows)


def _explain_batch(indices: list[int], read: tuple[list[int], tuple], classifier,
                   config: ExplainConfig, seed: int, mesh, vgg_params) -> dict[str, np.ndarray]:
  """Explains one compute batch, read by `_read_batch`, on every device of every process;
  returns its file's arrays."""
  rows, (ids, images, failures) = read
  check_classifier(classifier, images)  # Also where `sharded_explain` traces `explain`.
  explanation = parallel.sharded_explain(
      classifier, images, parallel.image_keys(seed, rows), config, mesh, vgg_params)
  gathered = parallel.allgather_objects({"ids": ids, "failures": failures})
  ids = [item_id for part in gathered for item_id in part["ids"]][:len(indices)]
  failed = {index: (item_id, reason) for part in gathered for index, item_id, reason in part["failures"]}
  keep = np.array([index not in failed for index in indices], bool)
  return {
      "indices": np.array(indices, np.int64)[keep],
      "ids": np.array(ids, str)[keep],
      "saliency": np.asarray(explanation.saliency[:len(indices)][keep], np.float16),
      "labels": np.asarray(explanation.labels[:len(indices)][keep], np.int16),
      "num_coalitions": np.asarray(explanation.num_coalitions[:len(indices)][keep], np.int32),
      "target": np.asarray(explanation.target[:len(indices)][keep], np.int32),
      "probs": np.asarray(explanation.probs[:len(indices)][keep], np.float32),
      "failed_indices": np.array(sorted(failed), np.int64),
      "failed_ids": np.array([failed[index][0] for index in sorted(failed)], str),
      "failed_reasons": np.array([failed[index][1] for index in sorted(failed)], str),
  }


def _prepare(out_dir: Path, manifest: dict[str, Any], source,
             progress: _Progress) -> tuple[list[int], dict[str, tuple[int, str]]]:
  """On the writing process: takes the lock, checks the settings and the inputs, finds what is
  left to do."""
  num_items = len(source)
  progress.job_lock = _JobLock(out_dir)
  stale = progress.job_lock.acquire()
  if stale is not None:
    warnings.warn(f"Took over {progress.job_lock.path} from {stale}, which has ended.", stacklevel=3)
  stored = check_manifest(out_dir, manifest)
  _remove_temporary_files(out_dir)
  saved = _scan(out_dir, stored, num_items)
  _check_saved_ids(source, saved.ids, out_dir)
  if stored is None:
    io.write_json(out_dir / io.MANIFEST_NAME, manifest)
  elif _ITEMS not in stored:
    warnings.warn(
        f"{out_dir / io.MANIFEST_NAME} was written by a pfc-jax that did not record what the "
        f"inputs are, so whether they changed since the job started cannot be checked; its "
        f"{len(saved.done)} saved items are kept. What the inputs are now is recorded, and "
        "later runs check it.", stacklevel=3)
    io.write_json(out_dir / io.MANIFEST_NAME,
                  {**stored, _VERSION: manifest[_VERSION], _ITEMS: manifest[_ITEMS]})
  _write_failures(out_dir, saved.failures)
  return [i for i in range(num_items) if i not in saved.done], saved.failures


def run_job(source, classifier, out_dir: str | Path, *, config: ExplainConfig | None = None,
            chunk_size: int | None = None, seed: int = 0, settings: dict[str, Any] | None = None,
            vgg_params: Any = None, mesh=None, progress: bool = True,
            exit_on_signal: bool = False, timings: prefetch.Timings | None = None) -> JobSummary:
  """Explains every item of `source` into `out_dir`, resuming a previous run of the same job.

  Args:
    source: An indexed source with `__len__`, `read(i) -> (id, image01)`, `describe()`,
      `identity()`, `item_id(i)` and `size` (`sources.ImageFolderSource`, `sources.TfdsSource`).
    classifier: The `Classifier` to explain.
    out_dir: Output folder, created if missing.
    config: Explanation settings; default `ExplainConfig.preset("fast")`.
    chunk_size: Images explained together, over every device, and saved together; default
      `default_chunk_size(mesh)` (one image per device on the CPU, 64 on GPU and TPU). May
      differ between runs of a job; it changes neither the results nor what is kept.
    seed: Item `i`'s key is `fold_in(PRNGKey(seed), i)`.
    settings: Further settings to record and check in the manifest (model, weights).
    vgg_params: VGG16 parameters for the coalition network's `init="vgg16"`.
    mesh: Data mesh; default every device (`parallel.data_mesh()`).
    progress: Show a progress bar (images/s, ETA) on process 0.
    exit_on_signal: SIGINT and SIGTERM end the process promptly, as the module docstring
      says, instead of raising KeyboardInterrupt once the computation under way returns. Call
      from the main thread; not for interactive sessions, whose process would end.
    timings: Accumulates where the time goes (`prefetch.Timings`): reading, computing, writing
      and the computation's waits for the host.

  Returns:
    A `JobSummary`.

  Raises:
    ValueError: `out_dir` holds a job with other settings or other inputs (an item changed,
      renamed, added or removed since the job started; the message names them), two of its
      results files overlap, or `chunk_size` < 1.
    JobLockedError: another running job holds `out_dir`.

  Warns:
    UserWarning: a damaged results file was removed (its images are explained again), the
      lock of a process that has ended was taken over, or the folder's manifest predates the
      inputs' identities (see the module docstring).
  """
  mesh = parallel.data_mesh() if mesh is None else mesh
  chunk_size = default_chunk_size(mesh) if chunk_size is None else chunk_size
  if chunk_size < 1:
    raise ValueError(f"`chunk_size` must be at least 1, got {chunk_size}.")
  out_dir = Path(out_dir)
  writer = jax.process_index() == 0
  config = resolve_config(config)
  manifest = build_manifest(source, config, chunk_size, seed, settings or {})
  state = _Progress(out_dir, len(source))
  with contextlib.ExitStack() as stack:
    if exit_on_signal:
      stack.enter_context(_exit_on_signal(state))
    stack.callback(state.release_lock)
    pending = failures = error = None
    if writer:
      try:
        pending, failures = _prepare(out_dir, manifest, source, state)
      except (ValueError, JobLockedError) as e:
        error = e
    shared = parallel.allgather_objects({"pending": pending, "failed": len(failures or {}),
                                         "error": error and str(error)})[0]
    if error is not None:
      raise error
    if shared["error"] is not None:
      raise ValueError(shared["error"])
    pending, already_failed = shared["pending"], shared["failed"]
    state.done, state.failed = len(source) - len(pending), already_failed
    already_done, explained, failed = state.done, 0, 0

    def save(indices, arrays):  # On the writing thread, one batch after another.
      state.wait_if_stopping()
      with state.write_lock:
        if writer:
          io.write_npz(io.results_path(out_dir, indices[0], indices[-1]), **arrays)
          if arrays["failed_ids"].size:
            failures.update((item_id, (position, reason)) for position, item_id, reason in zip(
                arrays["failed_indices"].tolist(), arrays["failed_ids"].tolist(),
                arrays["failed_reasons"].tolist()))
            _write_failures(out_dir, failures)
        state.done += len(indices)
        state.failed += arrays["failed_ids"].size

    batches = [pending[start:start + chunk_size] for start in range(0, len(pending), chunk_size)]
    reads = prefetch.read_ahead(lambda indices: _read_batch(source, indices, mesh), batches,
                                timings=timings)
    with contextlib.closing(reads), prefetch.WriteBehind(timings=timings) as writes, tqdm.tqdm(
        total=len(pending), unit="img", disable=not (progress and writer), desc="explain") as bar:
      state.bar_shown = not bar.disable
      for indices, read in zip(batches, reads):
        start = time.perf_counter()
        arrays = _explain_batch(indices, read, classifier, config, seed, mesh, vgg_params)
        if timings is not None:
          timings.add("compute", time.perf_counter() - start)
          timings.add("batches", 1)
          timings.add("images", len(indices))
        writes.submit(save, indices, arrays)
        explained += arrays["ids"].size
        failed += arrays["failed_ids"].size
        bar.update(len(indices))
  return JobSummary(len(source), already_done, explained, failed, already_failed + failed)
