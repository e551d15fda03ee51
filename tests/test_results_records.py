"""The committed records of docs/results still parse and reprint under the current code."""

from pathlib import Path

import pytest

from pfc_jax import evaluation

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
EVALUATE_RECORDS = sorted(path for path in RESULTS.rglob("*.records.jsonl")
                          if '"method"' in path.read_text())


def test_the_results_folder_holds_evaluate_records():
  assert len(EVALUATE_RECORDS) >= 10


@pytest.mark.parametrize("path", EVALUATE_RECORDS, ids=lambda path: path.name)
def test_every_method_parses_and_every_fingerprint_is_current(path):
  """A rerun of the command that wrote `path` reprints it: its preset and method names are
  known, and each score that carries a `settings_id` matches the method's current one (a
  mismatch makes `evaluate` refuse the file)."""
  settings, records, _ = evaluation.read_records(path)
  preset = settings["preset"]
  assert preset in evaluation.PRESETS
  stale = {}
  for (method, _), record in records.items():
    evaluation.method_spec(method, preset)
    if "settings_id" in record and record["settings_id"] != evaluation.method_settings_id(
        method, preset):
      stale[method] = record["settings_id"]
  assert not stale, f"{path.name}: scores computed under other settings: {stale}"


def _table(text: str, header: str) -> dict[str, list[str]]:
  """`{first cell: the other cells}` of the Markdown table whose header row starts `header`."""
  lines = text[text.index(header):].splitlines()
  rows = {}
  for line in lines[2:]:
    if not line.startswith("|"):
      break
    cells = [cell.strip().strip("*") for cell in line.strip("|").split("|")]
    rows[cells[0].replace("`", "")] = cells[1:]
  return rows


def test_the_readme_family_table_is_the_records_means():
  """The README's table of PFC against its family reprints the committed records: the means of
  each column over the 125 held-out photos, `fast` from its own records."""
  readme = (RESULTS.parents[1] / "README.md").read_text()
  table = _table(readme, "| method (125 held-out photos)")
  sources = {"PFC (fast)": ("photos_heldout_two_games", "pfc"),
             "Extremal Perturbations": ("photos_heldout_family", "extremal_perturbation"),
             "XRAI": ("photos_heldout_family", "xrai"),
             "LIME (quickshift)": ("photos_heldout_family", "lime"),
             "LIME over PFC's coalitions": ("photos_heldout_family", "lime_coalitions")}
  assert set(table) == set(sources)
  columns = (("insertion_auc", 3), ("road_morf", 3), ("road_lerf", 3), ("average_drop_blur", 1))
  for name, (stem, method) in sources.items():
    _, records, _ = evaluation.read_records(RESULTS / f"{stem}.records.jsonl")
    means = evaluation._means([records[(method, index)] for index in range(125, 250)])
    for cell, (metric, digits) in zip(table[name], columns):
      assert cell == f"{means[metric]:.{digits}f}", (name, metric, cell, means[metric])
