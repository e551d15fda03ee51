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
