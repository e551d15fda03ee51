"""Interrupting a batch job loses nothing finished and corrupts nothing.

Real processes: Ctrl-C (SIGINT) in the middle of a compute batch stops at once and quietly;
SIGTERM in the middle of a write lets the write complete, then stops; SIGKILL in the middle of a
write; a second job on the same folder is refused; the dead job's lock is taken over; and a run
resumed with another chunk size ends equal to an uninterrupted run.

Twenty further kills run in one process: a SIGKILL changes nothing on disk but stops the job, so
its effect on the output is the folder as it is at that instant. The test copies the folder at
20 random instants of a job (while computing, and at each stage of a write: temporary file
created, half written, fully written, renamed into place), stops the job there, and resumes
from the copy, a fresh process start (about 3 s each, JAX import and compilation) saved per
kill.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from batch_job_main import run_batch_command
from pfc_jax import batch, io, models, parallel, sources, weights
from pfc_jax.explain import ExplainConfig

_ARGS = ("--model", "shapes_cnn", "--preset", "tiny", "--image-size", "16", "--no-progress")
_FIELDS = ("saliency", "labels", "num_coalitions", "target")


def _write_images(folder: Path, count: int, broken: int | None = None) -> list[str]:
  """`count` random 20x18 PNGs (`img00`...); item `broken` is not an image. Returns the ids."""
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(count)
  for i in range(count):
    if i == broken:
      (folder / f"img{i:02d}.png").write_bytes(b"\x89PNG truncated")
    else:
      Image.fromarray(rng.integers(0, 256, (20, 18, 3), dtype=np.uint8)).save(folder / f"img{i:02d}.png")
  return [f"img{i:02d}" for i in range(count) if i != broken]


def _assert_same_results(out: Path, reference: Path) -> None:
  """Every image exactly once, intact, and equal to the uninterrupted run's."""
  got, want = io.read_results(out), io.read_results(reference)  # Both check every file's CRCs.
  assert list(got) == list(want)
  rows = sum(io.load_results_file(path)["ids"].size for path in io.results_paths(out))
  assert rows == len(want), "an image is saved twice"
  for name in want:
    for field in _FIELDS:
      np.testing.assert_array_equal(got[name][field], want[name][field], err_msg=f"{name} {field}")
    np.testing.assert_allclose(got[name]["probs"], want[name]["probs"], rtol=1e-6, err_msg=name)
  assert io.read_failures(out) == io.read_failures(reference)
  assert (out / io.FAILURES_NAME).read_text() == (reference / io.FAILURES_NAME).read_text()
  assert not [p.name for p in out.iterdir() if p.name.startswith(".") or p.name == io.LOCK_NAME]


def _start(args: list[str], cache: Path) -> subprocess.Popen:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  return subprocess.Popen([sys.executable, str(Path(__file__).parent / "batch_job_main.py"), *args],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(condition, job: subprocess.Popen, what: str, timeout: float = 120) -> None:
  deadline = time.monotonic() + timeout
  while not condition():
    if job.poll() is not None:
      raise AssertionError(f"the job ended before {what}: {job.communicate()}")
    if time.monotonic() > deadline:
      job.kill()
      raise AssertionError(f"no {what} after {timeout} s")
    time.sleep(0.02)


def test_ctrl_c_sigkill_and_second_job_in_real_processes(tmp_path, capsys):
  ids = _write_images(tmp_path / "in", 5, broken=1)
  job_args = ["--images", str(tmp_path / "in"), "--out", str(tmp_path / "out"), *_ARGS]
  assert run_batch_command(["--images", str(tmp_path / "in"), "--out", str(tmp_path / "reference"),
                            *_ARGS]) == 1
  capsys.readouterr()
  out, cache = tmp_path / "out", tmp_path / "cache"

  # 1. Ctrl-C while the main thread is held inside XLA (second compute batch, stalled 60 s):
  # the process ends at once, quietly, with what was saved.
  job = _start(["--stall", "60", *job_args], cache)
  _wait_for(lambda: io.results_path(out, 0, 0).is_file(), job, "first results file")
  time.sleep(0.5)
  job.send_signal(signal.SIGINT)
  start = time.monotonic()
  stdout, stderr = job.communicate(timeout=60)
  assert time.monotonic() - start < 10, "did not stop within the compute batch"
  assert job.returncode == 130, stderr
  assert stderr.splitlines() == [
      f"pfc-jax batch: stopped by SIGINT; 1 of 5 items are saved in {out} (0 unreadable). "
      "Run the same command again to resume."], stderr
  assert stdout == ""
  assert sorted(p.name for p in out.iterdir()) == [
      "failures.jsonl", "manifest.json", "results-00000000-00000000.npz"]

  # 2. SIGTERM in the middle of writing a results file (writes paused half way for 2 s): the
  # write completes, then the process ends.
  job = _start(["--slow-write", "2", *job_args], cache)
  _wait_for(lambda: list(out.glob(".results-*.tmp")), job, "results file being written")
  job.send_signal(signal.SIGTERM)
  stdout, stderr = job.communicate(timeout=60)
  assert job.returncode == 143, stderr
  assert stderr.splitlines() == [
      f"pfc-jax batch: stopped by SIGTERM; 2 of 5 items are saved in {out} (1 unreadable). "
      "Run the same command again to resume."], stderr
  assert io.results_path(out, 1, 1).is_file() and not list(out.glob(".*.tmp"))
  assert not (out / io.LOCK_NAME).exists()

  # 3. SIGKILL in the middle of writing a results file; a second job on the same folder is
  # refused meanwhile.
  job = _start(["--slow-write", "3", *job_args], cache)
  _wait_for(lambda: list(out.glob(".results-*.tmp")), job, "results file being written")
  assert run_batch_command(job_args) == 2
  refusal = capsys.readouterr().err
  assert f"is in use by another job (process {job.pid} on " in refusal, refusal
  assert len(refusal.splitlines()) == 1
  job.kill()
  job.wait()
  killed = job.pid
  assert list(out.glob(".results-*.tmp")) and (out / io.LOCK_NAME).is_file()

  # 4. Resume (here, in this process) with another chunk size: the dead job's lock is taken
  # over, its partial file removed.
  assert run_batch_command([*job_args, "--chunk-size", "2"]) == 1  # Item 1 is unreadable.
  stderr = capsys.readouterr().err
  assert f"pfc-jax batch: warning: Took over {out / io.LOCK_NAME} from process {killed} on " in stderr
  _assert_same_results(out, tmp_path / "reference")
  assert sorted(io.read_results(out)) == ids


class _Killed(BaseException):
  """Stops a job at a kill point (BaseException, so no `except Exception` in the job catches it)."""


def _snapshot(folder: Path, copy: Path) -> None:
  """`shutil.copytree(folder, copy)` while the job's writer thread may rename a temporary file
  in `folder` meanwhile: a copy that saw a file vanish is thrown away and taken again."""
  while True:
    try:
      shutil.copytree(folder, copy)
      return
    except shutil.Error:
      shutil.rmtree(copy, ignore_errors=True)


def test_twenty_kills_at_random_moments_lose_and_duplicate_nothing(tmp_path, monkeypatch):
  _write_images(tmp_path / "in", 16, broken=5)
  source = sources.ImageFolderSource(tmp_path / "in", 16)
  classifier = models.classifier("shapes_cnn", weights.load("shapes_cnn"))
  config = ExplainConfig.preset("tiny")

  def run(out: Path, chunk_size: int):
    return batch.run_job(source, classifier, out, config=config, chunk_size=chunk_size,
                         progress=False)

  run(tmp_path / "reference", 1)

  out, snapshot = tmp_path / "out", tmp_path / "snapshot"
  rng = np.random.default_rng(13)
  moments = {"count": 0, "kill_at": 0}
  stages = []

  def moment(stage: str) -> None:
    moments["count"] += 1
    if moments["count"] == moments["kill_at"]:
      _snapshot(out, snapshot)  # The folder as a SIGKILL at this instant leaves it.
      stages.append(stage)
      raise _Killed

  explain = parallel.sharded_explain

  def explain_with_kill_points(*args, **kwargs):
    moment("computing")
    result = explain(*args, **kwargs)
    moment("computed, not saved")
    return result

  def write_bytes_with_kill_points(path, data):  # `io.write_bytes`, with its stages exposed.
    with io.atomic_path(path) as tmp:
      moment("temporary file created")
      tmp.write_bytes(data[:len(data) // 2])
      moment("half written")
      tmp.write_bytes(data)
      moment("written, not renamed")
    moment("renamed")

  monkeypatch.setattr(parallel, "sharded_explain", explain_with_kill_points)
  monkeypatch.setattr(io, "write_bytes", write_bytes_with_kill_points)
  takeovers = 0
  every_stage = {"computing", "computed, not saved", "temporary file created", "half written",
                 "written, not renamed", "renamed"}
  # Writes run on a background thread beside the next batch's computation, so the order of
  # the moments varies: kill until every stage has been hit (and at least 20 times).
  # A run with fewer moments left than `kill_at` finishes the job: it is checked and a fresh
  # job is killed instead. The loop ends on a kill that left some images saved.
  resumable = False
  while (len(stages) < 20 or (set(stages) != every_stage and len(stages) < 60)
         or (not resumable and len(stages) < 100)):
    moments.update(count=0, kill_at=int(rng.integers(1, 10)))
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      try:
        summary = run(out, int(rng.integers(1, 3)))
      except _Killed:
        shutil.rmtree(out)
        snapshot.rename(out)
        resumable = bool(io.results_paths(out))
      else:
        assert summary.num_items == 16 and summary.total_failed == 1, summary
        _assert_same_results(out, tmp_path / "reference")
        shutil.rmtree(out)
        resumable = False
    takeovers += sum("Took over" in str(w.message) for w in caught)
  assert set(stages) == every_stage, stages
  assert takeovers >= 15  # Each run after a kill past the lock takes over the dead one's lock.

  moments.update(count=0, kill_at=0)
  with pytest.warns(UserWarning, match="Took over"):
    summary = run(out, 2)
  assert summary.num_items == 16 and summary.total_failed == 1
  assert 0 < summary.already_done < 16  # The kills kept some images and left some to do.
  _assert_same_results(out, tmp_path / "reference")


def test_damaged_results_file_is_detected_and_recomputed(tmp_path, capsys):
  _write_images(tmp_path / "in", 4)
  reference, out = tmp_path / "reference", tmp_path / "out"
  for folder in (reference, out):
    assert run_batch_command(["--images", str(tmp_path / "in"), "--out", str(folder), *_ARGS]) == 0
  truncated, flipped = io.results_path(out, 1, 1), io.results_path(out, 2, 2)
  truncated.write_bytes(truncated.read_bytes()[:-40])
  data = bytearray(flipped.read_bytes())
  data[len(data) // 3] ^= 0xFF  # Inside the compressed saliency: only the CRC can tell.
  flipped.write_bytes(bytes(data))
  for path in (truncated, flipped):
    with pytest.raises(ValueError, match=f"Damaged results file .*{path.name}"):
      io.load_results_file(path)
  with pytest.raises(ValueError, match="Damaged results file"):
    io.read_results(out)
  capsys.readouterr()

  assert run_batch_command(["--images", str(tmp_path / "in"), "--out", str(out), *_ARGS]) == 0
  captured = capsys.readouterr()
  assert "4 items, 2 done before; 2 explained now" in captured.out
  warned = [line for line in captured.err.splitlines() if "Damaged results file" in line]
  assert len(warned) == 2 and all(line.startswith("pfc-jax batch: warning: ") for line in warned)
  _assert_same_results(out, reference)


def test_lock_refuses_a_second_job_and_takes_over_a_dead_ones(tmp_path, capsys):
  _write_images(tmp_path / "in", 2)
  out = tmp_path / "out"
  args = ["--images", str(tmp_path / "in"), "--out", str(out), *_ARGS]
  held = batch._JobLock(out)  # pylint: disable=protected-access  # a job running meanwhile
  assert held.acquire() is None
  assert json.loads((out / io.LOCK_NAME).read_text())["pid"] == os.getpid()
  assert run_batch_command(args) == 2
  message = capsys.readouterr().err
  assert f"is in use by another job (process {os.getpid()} on " in message and "job.lock" in message
  assert not (out / io.MANIFEST_NAME).exists()  # Refused before touching anything.
  held.release()
  held.release()  # Twice is harmless (the signal watcher and the job may both release).
  assert not (out / io.LOCK_NAME).exists()

  # A lock file whose process ended while writing it (no flock held, half a PID) is taken over.
  (out / io.LOCK_NAME).write_text('{"pid": 12')
  assert run_batch_command(args) == 0
  err = capsys.readouterr().err
  assert f"warning: Took over {out / io.LOCK_NAME} from an unknown process, which has ended." in err
  assert not (out / io.LOCK_NAME).exists()
  assert len(io.read_results(out)) == 2
