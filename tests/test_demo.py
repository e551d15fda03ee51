"""End-to-end test of `pfc-jax demo` on tiny settings."""

import json

import numpy as np
from PIL import Image

from pfc_jax import cli
from pfc_jax.benchmarks import shapes


def test_demo_writes_panel_arrays_and_summary(tmp_path, capsys):
  out = tmp_path / "demo"
  code = cli.main(["demo", "--out", str(out), "--num-images", "1", "--preset", "tiny",
                   "--seed", "2"])
  assert code == 0
  assert str(out) in capsys.readouterr().out

  summary = json.loads((out / "summary.json").read_text())
  assert summary["settings"]["model"] == "shapes_cnn"
  (record,) = summary["images"]
  expected = shapes.generate(1, size=64, seed=2)
  assert record["label"] == shapes.CLASS_NAMES[expected.labels[0]]

  panel = np.asarray(Image.open(out / record["png"]))
  assert panel.ndim == 3 and panel.shape[-1] == 3 and panel.std() > 0

  arrays = np.load(out / record["npz"])
  np.testing.assert_array_equal(arrays["image"], expected.images[0])
  np.testing.assert_array_equal(arrays["mask"], expected.masks[0])
  assert arrays["saliency"].shape == (64, 64) and np.isfinite(arrays["saliency"]).all()
  assert arrays["labels"].shape == (64, 64) and arrays["w"].shape == (64, 64, 3)
  assert int(arrays["target"]) == record["class_index"]
  assert record["class_name"] == shapes.CLASS_NAMES[record["class_index"]]
  assert 0.0 <= record["relevance_mass"] <= 1.0


def test_demo_rejects_zero_images(tmp_path, capsys):
  assert cli.main(["demo", "--out", str(tmp_path), "--num-images", "0"]) == 2
  assert "--num-images" in capsys.readouterr().err


def test_demo_explains_the_vision_transformer(tmp_path):
  out = tmp_path / "demo"
  assert cli.main(["demo", "--out", str(out), "--model", "shapes_vit", "--num-images", "1",
                   "--preset", "tiny"]) == 0
  summary = json.loads((out / "summary.json").read_text())
  assert summary["settings"]["model"] == "shapes_vit"
  (record,) = summary["images"]
  saliency = np.load(out / record["npz"])["saliency"]
  assert saliency.shape == (64, 64) and np.isfinite(saliency).all()
