"""`pfc-jax explain` end to end on the packaged shapes classifier with the "tiny" preset."""

import json

import numpy as np
from PIL import Image

from pfc_jax import cli, models


def _write_image(path, seed):
  pixels = np.random.default_rng(seed).integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(path)


def test_explain_command_writes_panels_arrays_and_summary(tmp_path, capsys):
  photos = tmp_path / "photos"
  photos.mkdir()
  _write_image(photos / "a.png", 0)
  _write_image(photos / "b.jpg", 1)
  (photos / "broken.png").write_bytes(b"not an image")
  out = tmp_path / "out"
  args = ["explain", str(photos / "a.png"), str(photos / "broken.png"), str(photos / "b.jpg"),
          "--model", "shapes_cnn", "--preset", "tiny", "--image-size", "32", "--seed", "3",
          "--out", str(out), "--no-progress"]
  assert cli.main(args) == 1
  assert "broken.png" in capsys.readouterr().err
  assert sorted(p.name for p in out.iterdir()) == ["a.npz", "a.png", "b.npz", "b.png", "summary.json"]

  summary = json.loads((out / "summary.json").read_text())
  assert [r["image"] for r in summary["failed"]] == [str(photos / "broken.png")]
  assert summary["settings"]["preset"] == "tiny" and summary["settings"]["seed"] == 3
  assert summary["settings"]["config"]["perturb"]["steps"] > 0
  names = models.class_names("shapes_cnn")
  for record in summary["images"]:
    arrays = np.load(out / record["npz"])
    assert arrays["saliency"].shape == arrays["labels"].shape == (32, 32)
    assert arrays["w"].shape == (32, 32, 3)
    assert int(arrays["target"]) == record["class_index"]
    assert record["class_name"] == names[record["class_index"]]
    np.testing.assert_allclose(float(arrays["probs"]), record["probability"], rtol=1e-6)
    assert 0 < record["probability"] <= 1 and record["seconds"] > 0
    panel = np.asarray(Image.open(out / record["png"]))
    # Three 32 px tiles enlarged 5x to reach the panel's 160 px minimum, two 4 px gaps.
    assert panel.shape[1] == 3 * 160 + 8 and panel.shape[2] == 3

  # The same image alone, with its position's key, gives the same arrays; no failures: exit 0.
  again = tmp_path / "again"
  args = ["explain", str(photos / "a.png"), "--model", "shapes_cnn", "--preset", "tiny",
          "--image-size", "32", "--seed", "3", "--out", str(again), "--no-progress"]
  assert cli.main(args) == 0
  first, second = np.load(out / "a.npz"), np.load(again / "a.npz")
  for name in ("saliency", "w", "labels"):
    np.testing.assert_array_equal(first[name], second[name])


def test_explain_command_reports_bad_weights(tmp_path, capsys):
  bad = tmp_path / "weights.safetensors"
  bad.write_bytes(b"nonsense")
  _write_image(tmp_path / "a.png", 0)
  code = cli.main(["explain", str(tmp_path / "a.png"), "--model", "shapes_cnn", "--weights", str(bad),
                   "--out", str(tmp_path / "out"), "--no-progress"])
  assert code == 2 and "weights" in capsys.readouterr().err
