"""The resumable batch job: per-chunk atomic results, failures recorded, resumption, refusal."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from batch_job_main import run_batch_command
from pfc_jax import batch, io, sources
from pfc_jax.explain import ExplainConfig

_ARGS = ("--model", "shapes_cnn", "--preset", "tiny", "--image-size", "16", "--chunk-size", "3",
         "--no-progress")


def _write_images(folder: Path, count: int) -> list[str]:
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(count)
  for i in range(count):
    Image.fromarray(rng.integers(0, 256, (20, 18, 3), dtype=np.uint8)).save(folder / f"img{i:02d}.png")
  return [f"img{i:02d}" for i in range(count)]


def test_corrupt_image_is_recorded_and_job_completes(tmp_path):
  ids = _write_images(tmp_path / "in", 5)
  (tmp_path / "in" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
  out = tmp_path / "out"
  assert run_batch_command(["--images", str(tmp_path / "in"), "--out", str(out), *_ARGS]) == 0
  results = io.read_results(out)
  assert sorted(results) == ids
  record = results["img03"]
  assert record["saliency"].shape == (16, 16) and record["saliency"].dtype == np.float16
  assert record["labels"].shape == (16, 16)
  assert 0.0 < record["probs"] <= 1.0 and isinstance(record["target"], int)
  failures = [json.loads(line) for line in (out / io.FAILURES_NAME).read_text().splitlines()]
  assert [f["id"] for f in failures] == ["broken"] and failures[0]["reason"]
  assert sorted(p.name for p in out.iterdir()) == [
      "chunk-00000.npz", "chunk-00001.npz", "failures.jsonl", "manifest.json"]

  # Same arguments again: every chunk is skipped, nothing is rewritten.
  mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("chunk-*.npz")}
  assert run_batch_command(["--images", str(tmp_path / "in"), "--out", str(out), *_ARGS]) == 0
  assert {p.name: p.stat().st_mtime_ns for p in out.glob("chunk-*.npz")} == mtimes


def test_changed_settings_are_refused_naming_the_setting(tmp_path, capsys):
  _write_images(tmp_path / "in", 2)
  (tmp_path / "out").mkdir()
  source = sources.ImageFolderSource(tmp_path / "in", 16)
  manifest = batch.build_manifest(source, ExplainConfig.preset("tiny"), 3, 0,
                                  {"model": "shapes_cnn", "weights": None, "preset": "tiny"})
  io.write_json(tmp_path / "out" / io.MANIFEST_NAME, manifest)
  assert batch.check_manifest(tmp_path / "out", manifest)
  code = run_batch_command(["--images", str(tmp_path / "in"), "--out", str(tmp_path / "out"),
                   *_ARGS, "--seed", "5"])
  assert code == 2
  message = capsys.readouterr().err
  assert "seed: 0 there, 5 now" in message and "chunk_size" not in message
  with pytest.raises(ValueError, match="perturb.steps"):
    changed = json.loads(json.dumps(manifest))
    changed["config"]["perturb"]["steps"] += 1
    batch.check_manifest(tmp_path / "out", changed)


def test_read_results_needs_a_manifest(tmp_path):
  with pytest.raises(ValueError, match="manifest"):
    io.read_results(tmp_path)


def test_killed_job_resumes_with_every_id_once(tmp_path):
  ids = _write_images(tmp_path / "in", 12)
  out = tmp_path / "out"
  command = [sys.executable, str(Path(__file__).parent / "batch_job_main.py"), "0.3",
             "--images", str(tmp_path / "in"), "--out", str(out), *_ARGS]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "cache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  job = subprocess.Popen(command, env=env)
  deadline = time.monotonic() + 240
  while not list(out.glob("chunk-*.npz")) and job.poll() is None and time.monotonic() < deadline:
    time.sleep(0.05)
  job.send_signal(signal.SIGKILL)
  job.wait()
  finished = len(list(out.glob("chunk-*.npz")))
  assert 1 <= finished < 4, "the job was to be killed between its first and last chunk"

  subprocess.run(command[:2] + ["0"] + command[3:], env=env, check=True, timeout=240)
  results = io.read_results(out)
  assert sorted(results) == ids
  assert sum(np.load(path)["ids"].size for path in out.glob("chunk-*.npz")) == len(ids)
  assert not [p.name for p in out.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_write_what_one_process_writes(tmp_path):
  """A real multi-process job: two JAX processes with two CPU devices each, joined over gloo."""
  ids = _write_images(tmp_path / "in", 7)
  assert run_batch_command(["--images", str(tmp_path / "in"), "--out", str(tmp_path / "one"),
                            *_ARGS]) == 0
  address = f"localhost:{_free_port()}"
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  jobs = [subprocess.Popen(
      [sys.executable, str(Path(__file__).parent / "batch_job_main.py"), "0",
       "--images", str(tmp_path / "in"), "--out", str(tmp_path / "two"), *_ARGS, "--distributed",
       "--coordinator-address", address, "--num-processes", "2", "--process-id", str(process)],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for process in (0, 1)]
  try:
    outputs = [job.communicate(timeout=300)[0] for job in jobs]
  finally:
    for job in jobs:
      job.kill()
  assert [job.returncode for job in jobs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]

  one, two = io.read_results(tmp_path / "one"), io.read_results(tmp_path / "two")
  assert sorted(two) == ids
  assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
      p.name for p in (tmp_path / "one").iterdir())
  for name in ids:
    assert two[name]["target"] == one[name]["target"]
    np.testing.assert_allclose(two[name]["saliency"].astype(np.float32),
                               one[name]["saliency"].astype(np.float32), atol=2e-3, err_msg=name)
    assert np.mean(two[name]["labels"] == one[name]["labels"]) > 0.98, name
