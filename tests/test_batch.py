"""The resumable batch job: atomic results files, failures recorded, exit codes, resumption,
refusal, the first folder layout, and two processes. Interruptions: `test_batch_interrupt.py`."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pfc_jax
from batch_job_main import run_batch_command
from pfc_jax import batch, io, models, sources, weights
from pfc_jax.explain import ExplainConfig

_ARGS = ("--model", "shapes_cnn", "--preset", "tiny", "--image-size", "16", "--chunk-size", "3",
         "--no-progress")


def _write_images(folder: Path, count: int) -> list[str]:
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(count)
  for i in range(count):
    Image.fromarray(rng.integers(0, 256, (20, 18, 3), dtype=np.uint8)).save(folder / f"img{i:02d}.png")
  return [f"img{i:02d}" for i in range(count)]


def test_corrupt_image_is_recorded_and_job_completes(tmp_path, capsys):
  ids = _write_images(tmp_path / "in", 5)
  (tmp_path / "in" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
  out = tmp_path / "out"
  # Some items unreadable: exit code 1, as `pfc-jax explain` gives.
  assert run_batch_command(["--images", str(tmp_path / "in"), "--out", str(out), *_ARGS]) == 1
  assert "1 of 6 items could not be read" in capsys.readouterr().err
  results = io.read_results(out)
  assert sorted(results) == ids
  record = results["img03"]
  assert record["saliency"].shape == (16, 16) and record["saliency"].dtype == np.float16
  assert record["labels"].shape == (16, 16)
  assert 0.0 < record["probs"] <= 1.0 and isinstance(record["target"], int)
  failures = [json.loads(line) for line in (out / io.FAILURES_NAME).read_text().splitlines()]
  assert [f["id"] for f in failures] == ["broken"] and failures[0]["reason"]
  assert io.read_failures(out) == {"broken": failures[0]["reason"]}
  # Sorted paths: broken.jpg is item 0, so the first batch of 3 holds it and two images.
  assert sorted(p.name for p in out.iterdir()) == [
      "failures.jsonl", "manifest.json", "results-00000000-00000002.npz",
      "results-00000003-00000005.npz"]
  first = io.load_results_file(out / "results-00000000-00000002.npz")
  assert first["indices"].tolist() == [1, 2] and first["failed_indices"].tolist() == [0]

  # Same arguments again: every item is skipped, nothing is rewritten; still exit code 1.
  mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
  assert run_batch_command(["--images", str(tmp_path / "in"), "--out", str(out), *_ARGS]) == 1
  assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
  assert "6 items, 6 done before; 0 explained now" in capsys.readouterr().out


def test_warnings_are_lines_of_their_own_under_the_progress_bar(tmp_path, capsys):
  _write_images(tmp_path / "in", 2)
  cutout = np.zeros((20, 18, 4), np.uint8)
  cutout[5:15, 5:15] = (30, 200, 30, 255)  # An opaque square on a transparent field.
  Image.fromarray(cutout).save(tmp_path / "in" / "cutout.png")
  args = [arg for arg in _ARGS if arg != "--no-progress"]
  assert run_batch_command(["--images", str(tmp_path / "in"), "--out", str(tmp_path / "out"),
                            *args]) == 0
  lines = capsys.readouterr().err.replace("\r", "\n").splitlines()
  assert any(line.startswith("pfc-jax batch: warning: Image '") and
             line.endswith("cutout.png' has transparent pixels; they are composited onto white.")
             for line in lines)


def test_exit_code_says_whether_every_item_failed(tmp_path, capsys):
  (tmp_path / "in").mkdir()
  for name in ("a.png", "b.jpg", "c.png"):  # Three, as the chunk size: one compiled shape.
    (tmp_path / "in" / name).write_bytes(b"not an image")
  assert run_batch_command(["--images", str(tmp_path / "in"), "--out", str(tmp_path / "bad"),
                            *_ARGS]) == 1
  assert "every item (3) could not be read" in capsys.readouterr().err
  assert io.read_results(tmp_path / "bad") == {}
  assert list(io.read_failures(tmp_path / "bad")) == ["a", "b", "c"]

  _write_images(tmp_path / "good", 3)
  assert run_batch_command(["--images", str(tmp_path / "good"), "--out", str(tmp_path / "ok"),
                            *_ARGS]) == 0
  assert "could not be read" not in capsys.readouterr().err


def test_changed_settings_are_refused_naming_the_setting(tmp_path, capsys):
  _write_images(tmp_path / "in", 2)
  (tmp_path / "out").mkdir()
  source = sources.ImageFolderSource(tmp_path / "in", 16)
  manifest = batch.build_manifest(source, ExplainConfig.preset("tiny"), 3, 0,
                                  {"model": "shapes_cnn", "weights": None, "preset": "tiny"})
  io.write_json(tmp_path / "out" / io.MANIFEST_NAME, manifest)
  assert batch.check_manifest(tmp_path / "out", manifest) == manifest
  code = run_batch_command(["--images", str(tmp_path / "in"), "--out", str(tmp_path / "out"),
                   *_ARGS, "--seed", "5", "--chunk-size", "2"])
  assert code == 2
  message = capsys.readouterr().err
  assert "seed: 0 there, 5 now" in message and "chunk_size" not in message
  assert len(message.strip().splitlines()) == 1 and "Traceback" not in message
  # The chunk size is for information only: another one resumes the job.
  assert run_batch_command(["--images", str(tmp_path / "in"), "--out", str(tmp_path / "out"),
                            *_ARGS, "--chunk-size", "2"]) == 0
  assert json.loads((tmp_path / "out" / io.MANIFEST_NAME).read_text())["chunk_size"] == 3
  with pytest.raises(ValueError, match="perturb.steps"):
    changed = json.loads(json.dumps(manifest))
    changed["config"]["perturb"]["steps"] += 1
    batch.check_manifest(tmp_path / "out", changed)


def test_the_layout_is_chosen_per_run_and_changes_neither_the_results_nor_the_manifest(tmp_path, capsys):
  ids = _write_images(tmp_path / "in", 3)
  common = ["--images", str(tmp_path / "in"), "--model", "shapes_cnn", "--preset", "tiny",
            "--image-size", "16", "--no-progress"]
  assert run_batch_command([*common, "--out", str(tmp_path / "seq"), "--batching", "sequential"]) == 0
  # A job begun under one layout resumes under another: its manifest is that of the first run.
  source = sources.ImageFolderSource(tmp_path / "in", 16)
  manifest = batch.build_manifest(source, ExplainConfig.preset("tiny"), 3, 0,
                                  {"model": "shapes_cnn", "weights": None, "preset": "tiny"})
  (tmp_path / "dense").mkdir()
  io.write_json(tmp_path / "dense" / io.MANIFEST_NAME, manifest)
  assert run_batch_command([*common, "--out", str(tmp_path / "dense"), "--batching", "dense",
                            "--compute-batch", "2"]) == 0
  sequential, dense = io.read_results(tmp_path / "seq"), io.read_results(tmp_path / "dense")
  assert list(sequential) == list(dense) == ids
  for name in ids:
    np.testing.assert_array_equal(dense[name]["labels"], sequential[name]["labels"])
    np.testing.assert_allclose(dense[name]["saliency"].astype(np.float32),
                               sequential[name]["saliency"].astype(np.float32), atol=2e-3)
  stored = json.loads((tmp_path / "dense" / io.MANIFEST_NAME).read_text())
  assert stored["config"]["perturb"]["batching"] == "auto"
  capsys.readouterr()
  for flags, named in [(["--batching", "sequential", "--compute-batch", "2"], "--compute-batch"),
                       (["--compute-batch", "0"], "--compute-batch")]:
    assert run_batch_command([*common, "--out", str(tmp_path / "bad"), *flags]) == 2
    message = capsys.readouterr().err
    assert named in message and "Traceback" not in message


def _save_png(path: Path, seed: int) -> None:
  Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20, 18, 3), dtype=np.uint8)).save(path)


def _folder_state(out: Path) -> dict[str, int]:
  return {p.name: p.stat().st_mtime_ns for p in out.iterdir()}


@pytest.mark.parametrize("change, named", [
    ("replace b's pixels", "changed b.png ('"),
    ("rename c to d", "removed c.png; added d.png"),
    ("delete a, add 0", "removed a.png; added 0.png"),
])
def test_resume_with_changed_inputs_is_refused_naming_the_items(tmp_path, capsys, change, named):
  """The reported cases: each rerun said "3 items, 3 done before; 0 explained now" and kept the
  old results."""
  folder, out = tmp_path / "in", tmp_path / "out"
  folder.mkdir()
  for seed, name in enumerate("abc"):
    _save_png(folder / f"{name}.png", seed)
  command = ["--images", str(folder), "--out", str(out), *_ARGS]
  assert run_batch_command(command) == 0
  if change == "replace b's pixels":
    _save_png(folder / "b.png", 10)
  elif change == "rename c to d":
    (folder / "c.png").rename(folder / "d.png")
  else:
    (folder / "a.png").unlink()
    _save_png(folder / "0.png", 11)
  capsys.readouterr()
  saved = _folder_state(out)
  assert run_batch_command(command) == 2
  message = capsys.readouterr().err
  assert "holds a job with other inputs" in message and named in message
  assert "Use another output folder" in message and "Differences" not in message
  assert _folder_state(out) == saved  # Nothing removed or rewritten.


def test_unchanged_inputs_resume_and_their_identity_is_name_size_and_mtime(tmp_path, capsys):
  ids = _write_images(tmp_path / "in", 2)
  command = ["--images", str(tmp_path / "in"), "--out", str(tmp_path / "out"), *_ARGS]
  assert run_batch_command(command) == 0
  items = json.loads((tmp_path / "out" / io.MANIFEST_NAME).read_text())["items"]
  stats = {f"{i}.png": (tmp_path / "in" / f"{i}.png").stat() for i in ids}
  assert items == {name: f"{st.st_size} bytes, mtime_ns {st.st_mtime_ns}" for name, st in stats.items()}
  os.utime(tmp_path / "in" / "img01.png", ns=(stats["img01.png"].st_atime_ns, 1))
  assert run_batch_command(command) == 2  # Same bytes, other mtime: refused as changed.
  assert "changed img01.png" in capsys.readouterr().err


def test_manifest_without_identities_resumes_with_a_warning_and_records_them(tmp_path, capsys):
  ids = _write_images(tmp_path / "in", 2)
  out = tmp_path / "out"
  command = ["--images", str(tmp_path / "in"), "--out", str(out), *_ARGS]
  assert run_batch_command(command) == 0
  manifest = json.loads((out / io.MANIFEST_NAME).read_text())
  old = {key: value for key, value in manifest.items() if key not in ("items", "pfc_jax")}
  io.write_json(out / io.MANIFEST_NAME, {**old, "format": 2})  # As pfc-jax wrote it before.
  capsys.readouterr()
  assert run_batch_command(command) == 0
  captured = capsys.readouterr()
  assert "did not record what the inputs are" in captured.err and "2 saved items are kept" in captured.err
  assert "2 items, 2 done before; 0 explained now" in captured.out
  assert json.loads((out / io.MANIFEST_NAME).read_text()) == {
      **old, "format": 2, "pfc_jax": pfc_jax.__version__, "items": manifest["items"]}
  _save_png(tmp_path / "in" / f"{ids[0]}.png", 20)
  assert run_batch_command(command) == 2  # Checked from now on.
  assert f"changed {ids[0]}.png" in capsys.readouterr().err


def test_tfds_resume_checks_the_version_and_the_saved_ids(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  classifier = models.classifier("shapes_cnn", weights.load("shapes_cnn"))
  config, out = ExplainConfig.preset("tiny"), tmp_path / "out"
  with tfds.testing.mock_data(num_examples=3, data_dir=str(tmp_path / "data")):
    source = sources.TfdsSource("mnist", "test", data_dir=tmp_path / "data", size=16)
    run = lambda: batch.run_job(source, classifier, out, config=config, chunk_size=3, progress=False)
    assert run() == batch.JobSummary(3, 0, 3, 0, 0)
    manifest = json.loads((out / io.MANIFEST_NAME).read_text())
    assert manifest["items"]["version"] == str(tfds.builder("mnist").info.version)
    assert run() == batch.JobSummary(3, 3, 0, 0, 0)

    io.write_json(out / io.MANIFEST_NAME, {**manifest, "items": {"version": "0.0.1"}})
    with pytest.raises(ValueError, match=r"other inputs.*changed version \('0.0.1' there, '"):
      run()
    io.write_json(out / io.MANIFEST_NAME, manifest)
    path = out / "results-00000000-00000002.npz"
    arrays = io.load_results_file(path)
    io.write_npz(path, **{**arrays, "ids": np.array(["test:0", "test:9", "test:2"])})
    with pytest.raises(ValueError, match="item 1 is 'test:1' now but 'test:9' in results-00000000"):
      run()


def test_resume_by_another_pfc_jax_version_is_refused(tmp_path, capsys):
  _write_images(tmp_path / "in", 1)
  out = tmp_path / "out"
  command = ["--images", str(tmp_path / "in"), "--out", str(out), *_ARGS]
  assert run_batch_command(command) == 0
  manifest = json.loads((out / io.MANIFEST_NAME).read_text())
  assert manifest["pfc_jax"] == pfc_jax.__version__
  io.write_json(out / io.MANIFEST_NAME, {**manifest, "pfc_jax": "0.0.9"})
  assert run_batch_command(command) == 2
  assert f"pfc_jax: '0.0.9' there, '{pfc_jax.__version__}' now" in capsys.readouterr().err


def test_read_results_needs_a_manifest(tmp_path):
  with pytest.raises(ValueError, match="manifest"):
    io.read_results(tmp_path)


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
      [sys.executable, str(Path(__file__).parent / "batch_job_main.py"),
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


def test_first_layout_folder_is_read_and_resumed(tmp_path):
  """A folder of chunk files (manifest format 1) reads as before and resumes with results files."""
  ids = _write_images(tmp_path / "in", 4)
  (tmp_path / "in" / "img99.png").write_bytes(b"not an image")  # Item 4: in chunk 2.
  source = sources.ImageFolderSource(tmp_path / "in", 16)
  config, settings = ExplainConfig.preset("tiny"), {"model": "shapes_cnn"}
  out = tmp_path / "out"
  manifest = {**batch.build_manifest(source, config, 2, 0, settings), "format": 1}
  io.write_json(out / io.MANIFEST_NAME, manifest)
  rng = np.random.default_rng(0)
  written = {}
  for chunk, names in ((0, ids[:2]), (1, ids[2:])):
    arrays = {"ids": np.array(names), "saliency": rng.random((2, 16, 16)).astype(np.float16),
              "labels": rng.integers(0, 3, (2, 16, 16)).astype(np.int16),
              "num_coalitions": np.array([3, 2], np.int32), "target": np.array([1, 0], np.int32),
              "probs": np.array([0.5, 0.25], np.float32), "failed_ids": np.array([], str),
              "failed_reasons": np.array([], str)}
    io.write_npz(out / f"chunk-{chunk:05d}.npz", **arrays)
    written.update({name: (arrays["saliency"][row], arrays["target"][row])
                    for row, name in enumerate(names)})
  results = io.read_results(out)
  assert list(results) == ids
  for name, (saliency, target) in written.items():
    np.testing.assert_array_equal(results[name]["saliency"], saliency)
    assert results[name]["target"] == target

  summary = batch.run_job(source, models.classifier("shapes_cnn", weights.load("shapes_cnn")), out, config=config,
                          settings=settings, progress=False)
  assert summary == batch.JobSummary(5, 4, 0, 1, 1)
  assert sorted(p.name for p in out.glob("*.npz")) == [
      "chunk-00000.npz", "chunk-00001.npz", "results-00000004-00000004.npz"]
  assert io.read_failures(out) == {"img99": io.load_results_file(
      out / "results-00000004-00000004.npz")["failed_reasons"][0]}
  assert list(io.read_results(out)) == ids
  assert json.loads((out / io.MANIFEST_NAME).read_text())["format"] == 1


def test_image_size_defaults_to_the_models_own(tmp_path, capsys):
  _write_images(tmp_path / "in", 1)
  args = ["--images", str(tmp_path / "in"), "--model", "shapes_cnn", "--preset", "tiny",
          "--no-progress"]
  assert run_batch_command([*args, "--out", str(tmp_path / "out")]) == 0
  assert io.read_results(tmp_path / "out")["img00"]["saliency"].shape == (64, 64)
  assert run_batch_command([*args, "--out", str(tmp_path / "bad"), "--image-size", "4"]) == 2
  assert "`--image-size` must be at least 8" in capsys.readouterr().err


def test_a_refused_resume_names_the_settings_before_the_config(tmp_path):
  """Another preset changes many config fields: the preset, the likeliest cause, comes first."""
  _write_images(tmp_path / "in", 1)
  source = sources.ImageFolderSource(tmp_path / "in", 16)
  settings = {"model": "shapes_cnn", "weights": None}
  stored = batch.build_manifest(source, ExplainConfig.preset("tiny"), 1, 0,
                                {**settings, "preset": "tiny"})
  io.write_json(tmp_path / io.MANIFEST_NAME, stored)
  wanted = batch.build_manifest(source, ExplainConfig.preset("fast"), 1, 0,
                                {**settings, "preset": "fast"})
  with pytest.raises(ValueError) as refused:
    batch.check_manifest(tmp_path, wanted)
  message = str(refused.value)
  assert "config." in message
  assert message.index("settings.preset: 'tiny' there, 'fast' now") < message.index("config.")
