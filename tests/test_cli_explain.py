"""`pfc-jax explain` end to end on the packaged shapes classifier with the "tiny" preset."""

import argparse
import json

import numpy as np
import pytest
from PIL import Image

from pfc_jax import cli, data, models, viz, weights
from pfc_jax.commands import explain as explain_command


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
    image = data.load_image(record["image"], 32)
    assert panel.shape == viz.panel(image, arrays["labels"], arrays["saliency"]).shape

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


def _error_line(capsys) -> str:
  """The command's stderr, checked to be one line and no traceback."""
  err = capsys.readouterr().err
  assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
  return err


def test_missing_weights_file_is_one_line_naming_file_and_flag(tmp_path, capsys):
  _write_image(tmp_path / "a.png", 0)
  code = cli.main(["explain", str(tmp_path / "a.png"), "--model", "shapes_cnn", "--weights",
                   str(tmp_path / "absent.safetensors"), "--out", str(tmp_path / "out")])
  err = _error_line(capsys)
  assert code == 2
  assert "`--weights`" in err and "absent.safetensors' does not exist" in err


@pytest.mark.parametrize("model, advice", [
    ("vgg16", "https://huggingface.co/timm/vgg16.tv_in1k/resolve/main/model.safetensors saved as"),
    ("squeezenet1_1", "without torch, pass a squeezenet1_1 weights file in torchvision layout as "
                      ".safetensors"),
])
def test_offline_without_weights_says_what_to_pass_with_the_flag(model, advice, tmp_path, capsys,
                                                                  monkeypatch):
  monkeypatch.setenv(weights.CACHE_ENV, str(tmp_path / "cache"))
  monkeypatch.setattr(weights, "_has_torch", lambda: False)

  def offline(download, dest):
    raise OSError("network unreachable")

  monkeypatch.setattr(weights, "_fetch", offline)
  _write_image(tmp_path / "a.png", 0)
  code = cli.main(["explain", str(tmp_path / "a.png"), "--model", model,
                   "--out", str(tmp_path / "out")])
  err = _error_line(capsys)
  assert code == 2
  assert f"No {model} weights in the cache" in err and advice in err
  assert "Pass the file with `--weights FILE`" in err and "`source`" not in err


def test_a_directory_is_reported_as_one(tmp_path, capsys):
  (tmp_path / "photos").mkdir()
  code = cli.main(["explain", str(tmp_path / "photos"), "--model", "shapes_cnn", "--preset",
                   "tiny", "--out", str(tmp_path / "out"), "--no-progress"])
  assert code == 1
  err = capsys.readouterr().err
  assert "photos' is a directory, not an image file" in err and "pfc-jax batch --images" in err


def test_tiny_and_transparent_images_are_explained_with_warnings(tmp_path, capsys):
  Image.new("RGB", (1, 1), (200, 10, 10)).save(tmp_path / "dot.png")
  cutout = np.zeros((64, 64, 4), np.uint8)
  cutout[16:48, 16:48] = (30, 200, 30, 255)  # An opaque square on a transparent field.
  Image.fromarray(cutout).save(tmp_path / "cutout.png")
  out = tmp_path / "out"
  code = cli.main(["explain", str(tmp_path / "dot.png"), str(tmp_path / "cutout.png"), "--model",
                   "shapes_cnn", "--preset", "tiny", "--out", str(out)])
  assert code == 0
  # With the progress bar shown, each warning is a line of its own, not written after the bar.
  lines = capsys.readouterr().err.replace("\r", "\n").splitlines()
  assert any(line.startswith("pfc-jax explain: warning: Image '") and
             line.endswith("dot.png' is only 1x1 pixels, far below the 64-pixel input: it is "
                           "upsampled 73x.") for line in lines)
  assert any(line.startswith("pfc-jax explain: warning: Image '") and line.endswith(
      "cutout.png' has transparent pixels; they are composited onto white.") for line in lines)
  dot, cut = json.loads((out / "summary.json").read_text())["images"]
  assert len(dot["warnings"]) == 1 and "1x1 pixels" in dot["warnings"][0]
  assert len(cut["warnings"]) == 1 and "transparent" in cut["warnings"][0]


def test_bad_image_size_is_a_usage_error(tmp_path, capsys):
  _write_image(tmp_path / "a.png", 0)
  code = cli.main(["explain", str(tmp_path / "a.png"), "--model", "shapes_cnn", "--image-size",
                   "0", "--out", str(tmp_path / "out")])
  assert code == 2 and "`--image-size` must be at least 8" in _error_line(capsys)


def test_interrupt_exits_quietly(tmp_path, capsys, monkeypatch):
  def interrupted(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(explain_command, "explain", interrupted)
  _write_image(tmp_path / "a.png", 0)
  code = cli.main(["explain", str(tmp_path / "a.png"), "--model", "shapes_cnn",
                   "--out", str(tmp_path / "out"), "--no-progress"])
  assert code == cli.INTERRUPTED and "interrupted" in _error_line(capsys)


def _subcommand_parsers() -> dict[str, argparse.ArgumentParser]:
  parser = cli.build_parser()
  (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
  return subparsers.choices


@pytest.mark.parametrize("command", ["convert-weights", "explain", "demo", "evaluate", "batch"])
def test_help_states_every_default(command):
  parser = _subcommand_parsers()[command]
  text = "".join(parser.format_help().split())  # Long defaults wrap anywhere.
  for action in parser._actions:
    if not action.option_strings or action.required or action.default == argparse.SUPPRESS:
      continue
    stated = ("default" in (action.help or "").lower()
              or f"(default:{action.default})".replace(" ", "") in text)
    assert stated, f"{command} {action.option_strings[0]}"
