"""`scripts/sweep.py`: the coalition cache gives the labels `explain_sweep` computes, and a run
from the cache reproduces a run without it."""

import dataclasses
import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from pfc_jax import ExplainConfig, explain_sweep, models, weights
from pfc_jax.benchmarks import shapes

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
import sweep  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


def test_cached_labels_are_explain_sweeps(tmp_path, monkeypatch):
  images = shapes.generate(2, size=32, seed=0).images
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(np.arange(2))
  config = ExplainConfig.preset("tiny")
  classifier = models.classifier("shapes_cnn", weights.load("shapes_cnn"))
  expected = explain_sweep(classifier, images, keys, config, {"max_w": [1.0]}).labels

  computed = sweep._coalition_labels(images, keys, [5, 6], config, tmp_path, "tag")
  np.testing.assert_array_equal(computed, expected)
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      "labels-tag-00000005.npz", "labels-tag-00000006.npz"]

  def no_training(*args, **kwargs):
    raise AssertionError("the cache was not used")

  monkeypatch.setattr(sweep, "extract_coalitions", no_training)
  np.testing.assert_array_equal(
      sweep._coalition_labels(images, keys, [5, 6], config, tmp_path, "tag"), expected)
  with pytest.raises(AssertionError, match="cache was not used"):
    sweep._coalition_labels(images, keys, [5, 7], config, tmp_path, "tag")


def test_run_from_cache_reproduces_run_without(tmp_path):
  common = ["--model", "shapes_cnn", "--num-images", "2", "--batch-size", "2", "--preset", "tiny",
            "--sweep", "max_w=1,3", "--road"]
  sweep.main(common + ["--records", str(tmp_path / "plain.jsonl")])
  for name in ("fill.jsonl", "from_cache.jsonl"):
    sweep.main(common + ["--records", str(tmp_path / name),
                         "--coalition-cache", str(tmp_path / "cache")])
  assert len(list((tmp_path / "cache").glob("labels-*.npz"))) == 2
  read = lambda name: [json.loads(line) for line in
                       (tmp_path / name).read_text().splitlines()[1:]]
  plain = read("plain.jsonl")
  assert len(plain) == 4 and {"road_morf", "road_lerf", "pointing_game"} <= set(plain[0])
  assert read("fill.jsonl") == plain
  assert read("from_cache.jsonl") == plain


def test_saliency_readouts_equal_runs_with_that_readout(tmp_path):
  common = ["--model", "shapes_cnn", "--num-images", "2", "--batch-size", "2", "--preset", "tiny",
            "--sweep", "max_w=1,3"]
  edits = ["steps=20", "learning_rate=0.5"]  # maps far from constant: no near ties
  sweep.main(common + ["--records", str(tmp_path / "readouts.jsonl"), "--saliency-sigma", "0,2",
                       "--perturb", *edits])
  sweep.main(common + ["--records", str(tmp_path / "smooth.jsonl"),
                       "--perturb", *edits, "saliency_sigma=2"])
  read = lambda name: {(r["setting"], r["index"]): r for r in (
      json.loads(line) for line in (tmp_path / name).read_text().splitlines()[1:])}
  readouts, smooth = read("readouts.jsonl"), read("smooth.jsonl")
  assert len(readouts) == 8
  for (setting, index), record in smooth.items():
    expected = readouts[(setting + ",saliency_sigma=2", index)]
    for metric in ("insertion_auc", "relevance_mass", "average_drop"):
      np.testing.assert_allclose(record[metric], expected[metric], rtol=1e-4, atol=1e-5)
  assert any(readouts[(s, i)]["relevance_mass"] != readouts[(s.replace("=2", "=0"), i)]["relevance_mass"]
             for s, i in readouts if s.endswith("saliency_sigma=2"))


def test_bad_settings_stop_before_the_records_file_is_started(tmp_path):
  common = ["--model", "shapes_cnn", "--num-images", "1", "--preset", "tiny"]
  for extra, match in ((["--sweep", "max_w=5", "--saliency-sigma", "-1"], "saliency-sigma"),
                       (["--sweep", "max_w=5", "--saliency-sigma", "abc"], "saliency-sigma"),
                       (["--sweep", "max_w=5", "--saliency-sigma", "inf"], "saliency-sigma"),
                       (["--sweep", "mask_weight=-1"], "mask_weight"),
                       (["--sweep", "mask_weight=abc"], "--sweep: mask_weight must be a float"),
                       (["--sweep", "max_w=5", "--perturb", "blur_sigma=nan"],
                        "--perturb: `blur_sigma` must be >= 0"),
                       (["--sweep", "max_w=5", "--perturb", "bogus=1"],
                        "--perturb: 'bogus' is not a PerturbConfig field"),
                       (["--sweep", "max_w=5", "--perturb", "steps=2.5"],
                        "--perturb: steps must be an int"),
                       (["--sweep", "max_w=5", "--num-channels", "x"], "--num-channels")):
    with pytest.raises(SystemExit, match=match):
      sweep.main(common + extra + ["--records", str(tmp_path / "x.jsonl")])
    assert not (tmp_path / "x.jsonl").exists()


def test_assignments_take_their_fields_types_and_keep_the_typed_numbers():
  parsed = sweep._parse_assignments(
      "--sweep", ["confidence_weight=3,0.5,nan", "max_w+noise_samples=2:4", "confidence=hinge"])
  assert parsed == {("confidence_weight",): [(3,), (0.5,), (pytest.approx(float("nan"), nan_ok=True),)],
                    ("max_w", "noise_samples"): [(2, 4)], ("confidence",): [("hinge",)]}
  assert isinstance(parsed[("max_w", "noise_samples")][0][1], int)


def test_records_of_a_preset_that_changed_meaning_are_refused(tmp_path, monkeypatch):
  """The records header keeps a fingerprint of the full config, so a rerun after the preset
  changed meaning does not resume scores computed under the former one; a header written before
  the fingerprint existed is compared without it."""
  records = tmp_path / "r.jsonl"
  args = ["--model", "shapes_cnn", "--num-images", "1", "--preset", "tiny", "--sweep", "max_w=1",
          "--records", str(records)]
  sweep.main(args)
  lines = records.read_text().splitlines()
  header = json.loads(lines[0])["settings"]
  assert len(header["config_id"]) == 12

  tiny = ExplainConfig.preset("tiny")
  changed = dataclasses.replace(tiny, perturb=dataclasses.replace(tiny.perturb, steps=tiny.perturb.steps + 1))
  monkeypatch.setattr(ExplainConfig, "preset", lambda name: changed)
  with pytest.raises(SystemExit, match="other settings"):
    sweep.main(args)
  monkeypatch.undo()

  del header["config_id"]
  records.write_text("\n".join([json.dumps({"settings": header})] + lines[1:]) + "\n")
  sweep.main(args)  # Resumed: nothing recomputed, nothing appended.
  assert records.read_text().splitlines()[1:] == lines[1:]
