"""The evaluation loop on a hand-built classifier, and `pfc-jax evaluate` end to end."""

import dataclasses
import importlib.resources
import importlib.util
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from pfc_jax import baselines, cli, evaluation, metrics
from pfc_jax.benchmarks import shapes
from pfc_jax.commands import evaluate as evaluate_command
from pfc_jax.explain import ExplainConfig
from test_baselines import colour_classifier, colour_images

HAS_SHAPES_WEIGHTS = importlib.resources.files("pfc_jax").joinpath("assets/shapes_cnn.safetensors").is_file()
FAST = ("gradcam", "occlusion", "rise")


def test_report_holds_the_metrics_of_each_method():
  classifier = colour_classifier()
  images, masks = colour_images(2)
  config = evaluation.EvaluationConfig(methods=FAST, preset="tiny", batch_size=2, curve_steps=8)
  report = evaluation.evaluate(classifier, images, config, labels=np.array([0, 1]), masks=masks,
                               model="colours", progress=False)
  assert report["model"] == "colours" and report["images"] == 2
  assert report["top1_accuracy"] == 50.0
  assert list(report["methods"]) == list(FAST)
  for values in report["methods"].values():
    assert set(values) == {"average_drop", "increase_in_confidence", "deletion_auc",
                           "insertion_auc", "pointing_game", "relevance_mass", "seconds_per_image"}
    assert values["seconds_per_image"] > 0

  # Grad-CAM is deterministic: the report's means are the metrics of its maps.
  target = np.zeros(2, np.int32)
  saliency = baselines.gradcam(classifier, images, target)
  gradcam = report["methods"]["gradcam"]
  np.testing.assert_allclose(
      gradcam["average_drop"], 100 * np.mean(metrics.average_drop(classifier, images, saliency, target)),
      rtol=1e-5)
  np.testing.assert_allclose(
      gradcam["deletion_auc"],
      np.mean(metrics.deletion_auc(classifier, images, saliency, target, num_steps=8)), rtol=1e-5)
  assert gradcam["pointing_game"] == 100.0
  np.testing.assert_allclose(gradcam["relevance_mass"],
                             np.mean(metrics.relevance_mass(saliency, masks)), rtol=1e-5)


def test_results_do_not_depend_on_batch_size_or_slice():
  """Every score, ROAD's noisy imputation included, of a random baseline."""
  classifier = colour_classifier()
  images, _ = colour_images(3)
  config = evaluation.EvaluationConfig(methods=("rise",), preset="tiny", batch_size=2, curve_steps=8,
                                       protocols=("drop", "curves", "road"))
  whole = evaluation.evaluate(classifier, images, config, progress=False)  # Pads the last batch.
  singles = evaluation.evaluate(
      classifier, images, dataclasses.replace(config, batch_size=1), progress=False)
  tail = evaluation.evaluate(classifier, images[1:], config, first_index=1, progress=False)
  head = evaluation.evaluate(classifier, images[:1], config, progress=False)
  keys = [key for key in whole["methods"]["rise"] if key != "seconds_per_image"]
  assert set(keys) == {key for protocol in config.protocols for key in evaluation.PROTOCOLS[protocol]}
  for key in keys:
    values = [np.asarray(report["methods"]["rise"][key]) for report in (whole, singles, head, tail)]
    np.testing.assert_allclose(values[0], values[1], rtol=1e-5, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(values[0], (values[2] + 2 * values[3]) / 3, rtol=1e-5, atol=1e-6,
                               err_msg=key)


def test_markdown_table_has_one_row_per_method():
  report = {"methods": {"a": {"average_drop": 12.345, "deletion_auc": 0.12345, "seconds_per_image": 2.0},
                        "b": {"average_drop": 50.0, "deletion_auc": 0.5, "seconds_per_image": 0.25}}}
  lines = evaluation.markdown_table(report).splitlines()
  assert len(lines) == 4
  assert "Avg drop" in lines[0] and "Deletion" in lines[0] and "Pointing" not in lines[0]
  assert lines[2] == "| a | 12.35 | 0.123 | 2 |"


@pytest.mark.parametrize("name", ["nope", "pfc-bogus", "pfc-coalition-off", "pfc-fast-paper",
                                  "pfc-cosine-constant"])
def test_bad_method_names_raise(name):
  with pytest.raises(ValueError, match="method"):
    evaluation.method_spec(name, "fast")


def test_earlier_objectives_keep_fasts_coalitions_and_differ_from_it_in_the_objective():
  fast = ExplainConfig.preset("fast")
  published, lowres, noise = (evaluation.preset_config(name) for name in
                              ("fast_published", "fast_lowres", "fast_noise"))
  assert fast.coalitions == noise.coalitions == lowres.coalitions == published.coalitions
  assert dataclasses.replace(fast.perturb, blur_sigma=0.0, noise_std=1.0, noise_samples=8,
                             max_w=5.0, deletion_weight=0.0,
                             with_preservation_game=False) == noise.perturb
  assert dataclasses.replace(noise.perturb, parameterization="lowres", confidence="hinge",
                             confidence_weight=100.0) == lowres.perturb
  assert dataclasses.replace(lowres.perturb, parameterization="pixel", max_w=1.0,
                             learning_rate=3e-2) == published.perturb
  assert published.perturb.consistency == "published"
  assert evaluation.method_spec("pfc-fast_noise", "fast")[1] == noise
  assert evaluation.preset_config("paper") == ExplainConfig.preset("paper")
  with pytest.raises(ValueError, match="best"):
    evaluation.preset_config("best")


def test_pfc_method_names_edit_the_preset():
  kind, config = evaluation.method_spec("pfc-coalition-vgg16init-paper", "fast")
  paper = ExplainConfig.preset("paper")
  assert kind == "pfc"
  assert config.perturb == dataclasses.replace(paper.perturb, consistency="coalition")
  assert config.coalitions == dataclasses.replace(paper.coalitions, init="vgg16")
  assert evaluation.method_spec("pfc", "tiny")[1] == ExplainConfig.preset("tiny")
  assert evaluation.method_spec("pfc-cosine", "fast")[1].perturb == dataclasses.replace(
      ExplainConfig.preset("fast").perturb, schedule="cosine")
  assert evaluation.method_spec("pfc-smooth", "fast")[1].perturb == dataclasses.replace(
      ExplainConfig.preset("fast").perturb, saliency_sigma=8.0)
  assert evaluation.method_spec("pfc-blur-fast_noise", "fast")[1].perturb == dataclasses.replace(
      evaluation.EARLIER_OBJECTIVES["fast_noise"], blur_sigma=10.0)
  assert evaluation.method_spec("pfc-blur", "fast")[1] == ExplainConfig.preset("fast")
  relative = evaluation.method_spec("pfc-relative_blur", "fast")[1].perturb
  assert relative == dataclasses.replace(ExplainConfig.preset("fast").perturb, blur_sigma=0.0,
                                         blur_fraction=0.08)
  fast = ExplainConfig.preset("fast").perturb
  assert evaluation.method_spec("pfc-two_games", "fast")[1] == ExplainConfig.preset("fast")
  assert evaluation.method_spec("pfc-preservation", "fast")[1].perturb == dataclasses.replace(
      fast, deletion_weight=0.0, with_preservation_game=False)
  assert evaluation.method_spec("pfc-dual", "fast")[1].perturb == dataclasses.replace(
      fast, deletion_weight=10.0, with_preservation_game=False)
  for both in ("pfc-pixel-region", "pfc-blur-relative_blur", "pfc-dual-two_games"):
    first, second = both.split("-")[1:]
    with pytest.raises(ValueError, match=f"{first} and {second} set the same setting"):
      evaluation.method_spec(both, "fast")
  with pytest.raises(ValueError, match=r"unknown modifier\(s\) \['relative'\]"):
    evaluation.method_spec("pfc-relative-blur", "fast")
  assert evaluation.needs_vgg_params(evaluation.EvaluationConfig(methods=("pfc-vgg16init",)))
  assert not evaluation.needs_vgg_params(evaluation.EvaluationConfig(methods=("pfc-off", "gradcam")))


def test_pfc_runs_in_the_evaluation():
  config = evaluation.EvaluationConfig(methods=("pfc",), preset="tiny", curve_steps=4)
  images, _ = colour_images(1)
  report = evaluation.evaluate(colour_classifier(), images, config, progress=False)
  assert 0.0 <= report["methods"]["pfc"]["average_drop"] <= 100.0


def test_read_labels_names_the_missing_column(tmp_path):
  path = tmp_path / "labels.csv"
  path.write_text("file,label\na.png,1\n")
  with pytest.raises(ValueError, match="class_index"):
    evaluate_command.read_labels(path)


def _run_cli(args, capsys):
  code = cli.main(["evaluate", *args, "--no-progress"])
  return code, capsys.readouterr()


@pytest.mark.skipif(not HAS_SHAPES_WEIGHTS, reason="shapes_cnn weights are not shipped yet")
def test_cli_on_the_shapes_benchmark(tmp_path, capsys):
  out = tmp_path / "report.json"
  code, captured = _run_cli(
      ["--model", "shapes_cnn", "--benchmark", "shapes", "--num-images", "3", "--methods",
       "gradcam,rise", "--preset", "tiny", "--out", str(out)], capsys)
  assert code == 0, captured.err
  report = json.loads(out.read_text())
  assert report["images"] == 3 and list(report["methods"]) == ["gradcam", "rise"]
  assert 0.0 <= report["methods"]["gradcam"]["pointing_game"] <= 100.0
  assert "| gradcam |" in captured.out and "top-1" in captured.out


@pytest.mark.skipif(not HAS_SHAPES_WEIGHTS, reason="shapes_cnn weights are not shipped yet")
def test_cli_on_a_labelled_folder(tmp_path, capsys):
  data = shapes.generate(3, size=64, seed=1)
  rows = ["file,wnid,class_index,class_name"]
  for i, (image, label) in enumerate(zip(data.images, data.labels)):
    Image.fromarray((image * 255).round().astype(np.uint8)).save(tmp_path / f"{i}.png")
    rows.append(f"{i}.png,x,{label},shape")
  (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
  out = tmp_path / "report.json"
  code, captured = _run_cli(
      ["--model", "shapes_cnn", "--images", str(tmp_path), "--labels", str(tmp_path / "labels.csv"),
       "--offset", "1", "--methods", "gradcam", "--out", str(out)], capsys)
  assert code == 0, captured.err
  report = json.loads(out.read_text())
  assert report["images"] == 2 and "pointing_game" not in report["methods"]["gradcam"]
  assert 0.0 <= report["top1_accuracy"] <= 100.0


def test_cli_reports_bad_arguments(tmp_path, capsys):
  code, captured = _run_cli(
      ["--model", "shapes_cnn", "--images", str(tmp_path), "--methods", "gradcam",
       "--out", str(tmp_path / "r.json")], capsys)
  assert code == 2 and "--labels" in captured.err
  assert not (tmp_path / "r.json").exists()


def _counting(monkeypatch):
  """Wraps `evaluation.method_function` so that each call of a method counts its images."""
  calls = []
  make = evaluation.method_function

  def method_function(name, preset, vgg_params=None):
    method = make(name, preset, vgg_params)

    def counted(classifier, images, target, keys):
      calls.append((name, images.shape[0]))
      return method(classifier, images, target, keys)
    return counted
  monkeypatch.setattr(evaluation, "method_function", method_function)
  return calls


def test_records_resume_an_interrupted_evaluation(tmp_path, monkeypatch):
  classifier = colour_classifier()
  images, masks = colour_images(3)
  config = evaluation.EvaluationConfig(methods=("gradcam", "rise"), preset="tiny", batch_size=2,
                                       curve_steps=8)
  path = tmp_path / "r.records.jsonl"
  whole = evaluation.evaluate(classifier, images, config, masks=masks, records=path,
                              first_index=5, progress=False)
  lines = path.read_text().splitlines()
  assert json.loads(lines[0])["settings"]["preset"] == "tiny"
  records = [json.loads(line) for line in lines[1:]]
  assert sorted((r["method"], r["index"]) for r in records) == sorted(
      (m, i) for m in ("gradcam", "rise") for i in (5, 6, 7))

  # Interrupted after the first batch's Grad-CAM, in the middle of writing RISE's records.
  path.write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])
  calls = _counting(monkeypatch)
  resumed = evaluation.evaluate(classifier, images, config, masks=masks, records=path,
                                first_index=5, progress=False)
  assert calls == [("rise", 2), ("gradcam", 2), ("rise", 2)]
  assert len(path.read_text().splitlines()) == len(lines)
  for name in ("gradcam", "rise"):
    for key in ("average_drop", "deletion_auc", "pointing_game", "relevance_mass"):
      np.testing.assert_allclose(resumed["methods"][name][key], whole["methods"][name][key],
                                 rtol=1e-5, err_msg=f"{name} {key}")

  calls.clear()
  again = evaluation.evaluate(classifier, images, config, masks=masks, records=path,
                              first_index=5, progress=False)
  assert calls == [] and again["methods"] == resumed["methods"]


def test_records_of_a_method_whose_settings_changed_are_refused(tmp_path, monkeypatch):
  """Each score keeps its method's settings fingerprint; a rerun after the method's meaning
  changed (here: the `smooth` modifier's sigma) stops before computing anything."""
  classifier = colour_classifier()
  images, _ = colour_images(1)
  config = evaluation.EvaluationConfig(methods=("gradcam", "pfc-smooth"), preset="tiny",
                                       curve_steps=4)
  path = tmp_path / "r.records.jsonl"
  evaluation.evaluate(classifier, images, config, records=path, progress=False)
  rows = [json.loads(line) for line in path.read_text().splitlines()[1:]]
  assert {r["method"]: r["settings_id"] for r in rows} == {
      m: evaluation.method_settings_id(m, "tiny") for m in config.methods}
  assert evaluation.method_settings_id("pfc-smooth", "tiny") != evaluation.method_settings_id(
      "pfc", "tiny")
  monkeypatch.setitem(evaluation.PFC_MODIFIERS, "smooth", ("perturb", dict(saliency_sigma=2.0)))
  calls = _counting(monkeypatch)
  with pytest.raises(ValueError, match=r"r\.records\.jsonl.*pfc-smooth computed with other"):
    evaluation.evaluate(classifier, images, config, records=path, progress=False)
  assert calls == []
  # Rows written before the fingerprint existed are resumed as they are.
  path.write_text("\n".join([path.read_text().splitlines()[0]] + [
      json.dumps({k: v for k, v in r.items() if k != "settings_id"}) for r in rows]) + "\n")
  evaluation.evaluate(classifier, images, config, records=path, progress=False)
  assert calls == []


def test_maps_of_a_method_whose_settings_changed_are_refused(tmp_path, monkeypatch):
  """A maps folder keeps each method's settings fingerprint with its maps, as records do."""
  classifier = colour_classifier()
  images, _ = colour_images(1)
  config = evaluation.EvaluationConfig(methods=("pfc-smooth",), preset="tiny", curve_steps=4)
  maps = tmp_path / "maps"
  evaluation.evaluate(classifier, images, config, maps_dir=maps, progress=False)
  [file] = (maps / "pfc-smooth").iterdir()
  with np.load(file) as stored:
    assert str(stored["settings_id"]) == evaluation.method_settings_id("pfc-smooth", "tiny")
    kept = dict(stored)
  monkeypatch.setitem(evaluation.PFC_MODIFIERS, "smooth", ("perturb", dict(saliency_sigma=2.0)))
  calls = _counting(monkeypatch)
  with pytest.raises(ValueError, match=r"maps.*pfc-smooth made with other settings"):
    evaluation.evaluate(classifier, images, config, maps_dir=maps, progress=False)
  assert calls == []
  # Maps stored before the fingerprint existed are used as they are.
  np.savez(file, **{k: v for k, v in kept.items() if k != "settings_id"})
  evaluation.evaluate(classifier, images, config, maps_dir=maps, progress=False)
  assert calls == []


def test_records_written_with_other_settings_are_refused(tmp_path):
  classifier = colour_classifier()
  images, _ = colour_images(1)
  config = evaluation.EvaluationConfig(methods=("gradcam",), preset="tiny", curve_steps=8)
  path = tmp_path / "r.records.jsonl"
  evaluation.evaluate(classifier, images, config, records=path, settings={"images": "a"},
                      progress=False)
  with pytest.raises(ValueError, match=r"r\.records\.jsonl.*images, seed"):
    evaluation.evaluate(classifier, images, dataclasses.replace(config, seed=1), records=path,
                        settings={"images": "b"}, progress=False)
  path.write_text("not json\n")
  with pytest.raises(ValueError, match="settings line"):
    evaluation.evaluate(classifier, images, config, records=path, progress=False)


@pytest.mark.skipif(not HAS_SHAPES_WEIGHTS, reason="shapes_cnn weights are not shipped yet")
def test_cli_resumes_from_its_records(tmp_path, capsys, monkeypatch):
  out = tmp_path / "report.json"
  args = ["--model", "shapes_cnn", "--benchmark", "shapes", "--num-images", "2", "--methods",
          "gradcam", "--preset", "tiny", "--out", str(out)]
  assert _run_cli(args, capsys)[0] == 0
  first = json.loads(out.read_text())
  records = out.with_suffix(".records.jsonl")
  assert len(records.read_text().splitlines()) == 3  # Settings and two images.

  calls = _counting(monkeypatch)
  assert _run_cli(args, capsys)[0] == 0
  assert calls == [] and json.loads(out.read_text())["methods"] == first["methods"]

  code, captured = _run_cli([*args, "--benchmark-seed", "2"], capsys)
  assert code == 2 and "report.records.jsonl" in captured.err and "benchmark_seed" in captured.err


def test_paired_difference_across_records_files(tmp_path):
  script = pathlib.Path(__file__).parents[1] / "scripts" / "paired_difference.py"
  data = {"model": "m", "images": "photos", "labels": "labels.csv", "image_size": 8,
          "weights": "w", "seed": 0}
  rng = np.random.default_rng(0)
  scores = {preset: rng.random((5, 4)) for preset in ("paper", "fast")}
  for preset, values in scores.items():
    log = evaluation.RecordLog(tmp_path / f"{preset}.jsonl", {**data, "preset": preset})
    log.append([{"method": "pfc", "index": 10 + i, "average_drop": float(v[0]),
                 "increase_in_confidence": float(v[1]), "deletion_auc": float(v[2]),
                 "insertion_auc": float(v[3]), "seconds": 1.0} for i, v in enumerate(values)])
  run = lambda *args: subprocess.run([sys.executable, str(script), *map(str, args)],
                                     capture_output=True, text=True)
  result = run(tmp_path / "paper.jsonl", "pfc", "pfc", "--second-records", tmp_path / "fast.jsonl")
  assert result.returncode == 0, result.stderr
  expected = (scores["paper"] - scores["fast"]).mean(axis=0)
  printed = {line.split()[0]: float(line.split()[1]) for line in result.stdout.splitlines()[1:]}
  np.testing.assert_allclose(
      [printed[k] for k in ("average_drop", "increase_in_confidence", "deletion_auc",
                            "insertion_auc")], expected, atol=1e-4)

  evaluation.RecordLog(tmp_path / "other.jsonl", {**data, "weights": "v", "preset": "fast"})
  result = run(tmp_path / "paper.jsonl", "pfc", "pfc", "--second-records", tmp_path / "other.jsonl")
  assert result.returncode != 0 and "weights" in result.stderr


def test_protocols_added_later_are_computed_from_stored_maps(tmp_path, monkeypatch):
  classifier = colour_classifier()
  images, masks = colour_images(3)
  config = evaluation.EvaluationConfig(methods=("gradcam", "rise"), preset="tiny", batch_size=2,
                                       curve_steps=8)
  paths = dict(records=tmp_path / "r.records.jsonl", maps_dir=tmp_path / "maps")
  first = evaluation.evaluate(classifier, images, config, masks=masks, progress=False, **paths)
  assert sorted(p.name for p in (tmp_path / "maps" / "rise").iterdir()) == [
      "maps-00000000-00000001.npz", "maps-00000002-00000002.npz"]

  calls = _counting(monkeypatch)
  more = dataclasses.replace(config, protocols=("drop", "curves", "drop_mean", "curves_fine", "road"))
  second = evaluation.evaluate(classifier, images, more, masks=masks, progress=False, **paths)
  assert calls == []  # Every map came from the store.
  for name in ("gradcam", "rise"):
    for key, value in first["methods"][name].items():
      assert second["methods"][name][key] == value, (name, key)
  _, records, _ = evaluation.read_records(paths["records"])
  with np.load(tmp_path / "maps" / "rise" / "maps-00000000-00000001.npz") as stored:
    np.testing.assert_array_equal(stored["indices"], [0, 1])
    saliency = stored["maps"]
  target = np.zeros(2, np.int32)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(np.arange(2))
  road = metrics.road(classifier, images[:2], saliency, target, keys)
  np.testing.assert_allclose([records[("rise", i)]["road_morf"] for i in (0, 1)],
                             road.morf.mean(axis=1), rtol=1e-5)
  np.testing.assert_allclose(
      [records[("rise", i)]["average_drop_mean"] for i in (0, 1)],
      metrics.average_drop(classifier, images[:2], saliency, target, masked_value="mean"), rtol=1e-5)
  fine = metrics.deletion_auc(classifier, images[:2], saliency, target,
                              num_steps=metrics.rise_steps(*images.shape[1:3]))
  np.testing.assert_allclose([records[("rise", i)]["deletion_auc_fine"] for i in (0, 1)], fine,
                             rtol=1e-5)
  assert len(second["methods"]["rise"]["road_lerf_curve"]) == len(metrics.ROAD_FRACTIONS)
  table = evaluation.markdown_table(second)
  assert "ROAD MoRF" in table and "Fine deletion AUC" in table

  with pytest.raises(ValueError, match=r"maps.*seed"):
    evaluation.evaluate(classifier, images, dataclasses.replace(config, seed=1), progress=False,
                        maps_dir=tmp_path / "maps")


def test_map_as_produced_scores_only_maps_in_the_unit_range():
  classifier = colour_classifier()
  images, _ = colour_images(2)
  saliency = np.stack([np.full((16, 16), 0.5, np.float32), np.full((16, 16), 2.0, np.float32)])
  config = evaluation.EvaluationConfig(methods=("gradcam",))
  scores = evaluation.protocol_scores("drop_raw", classifier, images, jax.numpy.asarray(saliency),
                                       np.zeros(2, np.int32), None, config)
  assert scores["average_drop_raw"][1] is None and scores["increase_in_confidence_raw"][1] is None
  np.testing.assert_allclose(
      scores["average_drop_raw"][0],
      metrics.average_drop(classifier, images[:1], saliency[:1], np.zeros(1, np.int32),
                           normalization="none")[0], rtol=1e-6)
  report = {"methods": {"a": {"average_drop_raw": None, "seconds_per_image": 1.0}}}
  assert evaluation.markdown_table(report).splitlines()[2] == "| a | n/a | 1 |"


def test_randomization_check_on_the_first_images(tmp_path, monkeypatch):
  classifier = colour_classifier()
  images, _ = colour_images(3)
  config = evaluation.EvaluationConfig(methods=("gradcam",), preset="tiny", batch_size=2,
                                       curve_steps=4, randomization=1)
  totals, updates = [], []

  class Bar:  # Records what the progress bar is told.
    def __init__(self, total, **_):
      totals.append(total)
    def __enter__(self):
      return self
    def __exit__(self, *_):
      return False
    def update(self, n):
      updates.append(n)
    def set_postfix_str(self, _):
      pass
  monkeypatch.setattr(evaluation.tqdm, "tqdm", Bar)
  report = evaluation.evaluate(classifier, images, config, first_index=4, progress=False,
                               records=tmp_path / "r.jsonl")
  assert totals == [3] and sum(updates) == 3  # The bar counts images, not image x method.
  _, records, _ = evaluation.read_records(tmp_path / "r.jsonl")
  assert [("randomization_spearman" in records[("gradcam", i)]) for i in (4, 5, 6)] == [
      True, False, False]
  more = evaluation.evaluate(classifier, images, dataclasses.replace(config, randomization=3),
                             first_index=4, progress=False, records=tmp_path / "r.jsonl")
  _, records, _ = evaluation.read_records(tmp_path / "r.jsonl")
  assert all("randomization_spearman" in records[("gradcam", i)] for i in (4, 5, 6))
  assert more["methods"]["gradcam"]["average_drop"] == report["methods"]["gradcam"]["average_drop"]
  randomized = metrics.randomized_classifier(
      classifier, jax.random.fold_in(jax.random.key(0), 2 ** 32 - 1), images)
  target = np.zeros(1, np.int32)
  want = metrics.spearman(baselines.gradcam(classifier, images[:1], target),
                          baselines.gradcam(randomized, images[:1], target))
  np.testing.assert_allclose(report["methods"]["gradcam"]["randomization_spearman"], want[0],
                             rtol=1e-5)


def test_default_records_settings_keep_their_first_form(tmp_path):
  config = evaluation.EvaluationConfig()
  assert set(evaluation._record_settings("m", config, {"images": "x"})) == {
      "model", "preset", "seed", "curve_steps", "pointing_tolerance", "images"}
  fine = dataclasses.replace(config, fine_curve_pixels=100)
  assert evaluation._record_settings("m", fine, None)["fine_curve_pixels"] == 100


@pytest.mark.skipif(not HAS_SHAPES_WEIGHTS, reason="shapes_cnn weights are not shipped yet")
def test_committed_records_reprint_their_table(tmp_path, capsys, monkeypatch):
  results = pathlib.Path(__file__).parents[1] / "docs" / "results"
  committed = json.loads((results / "shapes_fast.json").read_text())
  records = tmp_path / "shapes_fast.records.jsonl"
  records.write_text((results / "shapes_fast.records.jsonl").read_text())
  calls = _counting(monkeypatch)
  code, captured = _run_cli(
      ["--model", "shapes_cnn", "--benchmark", "shapes", "--num-images", "32", "--methods",
       ",".join(committed["methods"]), "--preset", committed["preset"], "--out",
       str(tmp_path / "r.json"), "--records", str(records)],
      capsys)
  assert code == 0, captured.err
  assert calls == []
  assert evaluation.markdown_table(committed) in captured.out


def test_paired_difference_pairs_only_images_where_both_have_the_metric(tmp_path):
  script = pathlib.Path(__file__).parents[1] / "scripts" / "paired_difference.py"
  spec = importlib.util.spec_from_file_location("paired_difference", script)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  log = evaluation.RecordLog(tmp_path / "r.jsonl", {"model": "m"})
  log.append([{"method": m, "index": i, "average_drop": 0.1 * i + (m == "a"),
               "average_drop_raw": None if (m, i) == ("a", 0) else 0.5,
               "randomization_spearman": 0.3 if i < 1 else None, "seconds": 1.0}
              for m in ("a", "b") for i in range(3)])
  indices, pairs = module.paired_scores(str(tmp_path / "r.jsonl"), "a", "b")
  assert indices == [0, 1, 2]
  np.testing.assert_allclose(pairs["average_drop"][:, 0] - pairs["average_drop"][:, 1], 1.0)
  assert len(pairs["average_drop_raw"]) == 2 and len(pairs["randomization_spearman"]) == 1


def test_paired_difference_reads_sweep_records_across_objectives(tmp_path):
  script = pathlib.Path(__file__).parents[1] / "scripts" / "paired_difference.py"
  spec = importlib.util.spec_from_file_location("paired_difference", script)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)

  def write(name, perturb, setting, offset, indices, model="m"):
    lines = [json.dumps({"settings": {"model": model, "preset": "fast", "perturb": perturb}})]
    lines += [json.dumps({"setting": setting, "index": i, "insertion_auc": 0.1 * i + offset})
              for i in indices]
    (tmp_path / name).write_text("\n".join(lines) + "\n")

  write("a.jsonl", {"parameterization": "guided"}, "max_w=5", 0.25, range(4))
  write("b.jsonl", {}, "max_w=5", 0.0, range(6))
  indices, pairs = module.paired_scores(str(tmp_path / "a.jsonl"), "max_w=5", "max_w=5",
                                        str(tmp_path / "b.jsonl"))
  assert indices == [0, 1, 2, 3]  # Only the images both files scored.
  np.testing.assert_allclose(pairs["insertion_auc"][:, 0] - pairs["insertion_auc"][:, 1], 0.25)
  write("c.jsonl", {}, "max_w=5", 0.0, range(6), model="other")
  with pytest.raises(SystemExit, match="model"):
    module.paired_scores(str(tmp_path / "a.jsonl"), "max_w=5", "max_w=5", str(tmp_path / "c.jsonl"))


def test_no_coalitions_ablation_perturbs_one_coalition_with_explains_keys():
  """`pfc-no_coalitions` is `perturb` on all-zero labels with the keys `explain` uses; it differs
  from `pfc` only through the coalitions, and its fingerprint differs from `pfc`'s."""
  from pfc_jax.explain import stage_keys
  from pfc_jax.perturbation import perturb
  kind, config = evaluation.method_spec("pfc-no_coalitions-guided", "tiny")
  assert kind == "pfc_no_coalitions"
  assert config == evaluation.method_spec("pfc-guided", "tiny")[1]
  assert (evaluation.method_settings_id("pfc-no_coalitions-guided", "tiny")
          != evaluation.method_settings_id("pfc-guided", "tiny"))
  with pytest.raises(ValueError, match="no_coalitions given twice"):
    evaluation.method_spec("pfc-no_coalitions-no_coalitions", "tiny")
  classifier = colour_classifier()
  images, _ = colour_images(2)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(3), i))(np.arange(2))
  target = np.zeros(2, np.int32)
  ablated = evaluation.method_function("pfc-no_coalitions-guided", "tiny")(
      classifier, images, target, keys)
  expected = perturb(classifier, images, np.zeros(images.shape[:3], np.int32),
                     stage_keys(keys)[1], config.perturb).saliency
  np.testing.assert_array_equal(np.asarray(ablated), np.asarray(expected))
  # Long enough for w to take shape (tiny's 3 steps leave it flat): the coalitions then matter.
  longer = dataclasses.replace(config, perturb=dataclasses.replace(
      config.perturb, steps=30, learning_rate=0.5, lowres_stride=2))
  ablated = evaluation._pfc_saliency_without_coalitions(classifier, images, target, keys,
                                                        config=longer)
  with_coalitions = evaluation._pfc_saliency(classifier, images, target, keys, config=longer,
                                             vgg_params=None)
  assert np.abs(np.asarray(ablated) - np.asarray(with_coalitions)).max() > 1e-3
