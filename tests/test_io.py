"""Atomic writes leave either the old file or the new one, never a partial or temporary file;
a damaged results file is detected, never misread."""

import json

import numpy as np
import pytest

from pfc_jax import io


def test_write_npz_and_json(tmp_path):
  io.write_npz(tmp_path / "a.npz", x=np.arange(3))
  io.write_json(tmp_path / "sub" / "b.json", {"k": 1})
  np.testing.assert_array_equal(np.load(tmp_path / "a.npz")["x"], np.arange(3))
  assert json.loads((tmp_path / "sub" / "b.json").read_text()) == {"k": 1}


def test_failed_write_keeps_old_file_and_no_temporary(tmp_path):
  target = tmp_path / "r.json"
  io.write_json(target, {"v": 1})
  with pytest.raises(RuntimeError):
    with io.atomic_path(target) as tmp:
      tmp.write_text("{half")
      raise RuntimeError("interrupted")
  assert json.loads(target.read_text()) == {"v": 1}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def _results_arrays() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  return {"indices": np.array([3, 4]), "ids": np.array(["a", "b"]),
          "saliency": rng.random((2, 8, 8)).astype(np.float16),
          "labels": rng.integers(0, 3, (2, 8, 8)).astype(np.int16),
          "num_coalitions": np.array([3, 2], np.int32), "target": np.array([1, 0], np.int32),
          "probs": np.array([0.5, 0.25], np.float32), "failed_indices": np.array([5]),
          "failed_ids": np.array(["c"]), "failed_reasons": np.array(["unreadable"])}


def test_damaged_results_file_is_detected_never_misread(tmp_path):
  """Truncations and flipped bytes throughout a results file: each is detected (ValueError naming
  the file) or falls where it changes nothing read (zip timestamps and the like)."""
  arrays = _results_arrays()
  path = io.results_path(tmp_path, 3, 5)
  assert path.name == "results-00000003-00000005.npz"
  io.write_npz(path, **arrays)
  data = path.read_bytes()
  loaded = io.load_results_file(path)
  assert all(np.array_equal(loaded[name], value) for name, value in arrays.items())
  detected = 0
  for position in range(0, len(data), 7):
    for damaged in (data[:position], data[:position] + bytes([data[position] ^ 0x10]) + data[position + 1:]):
      path.write_bytes(damaged)
      try:
        loaded = io.load_results_file(path)
      except ValueError as e:
        assert path.name in str(e)
        detected += 1
        continue
      for name, value in arrays.items():
        np.testing.assert_array_equal(loaded[name], value, err_msg=f"byte {position}")
  assert detected > len(data) // 7  # Every truncation at least.


def test_results_file_missing_or_ragged_field_is_refused(tmp_path):
  arrays = _results_arrays()
  io.write_npz(tmp_path / "results-00000003-00000005.npz",
               **{k: v for k, v in arrays.items() if k != "indices"})
  with pytest.raises(ValueError, match="no indices"):
    io.load_results_file(tmp_path / "results-00000003-00000005.npz")
  io.write_npz(tmp_path / "results-00000003-00000005.npz", **{**arrays, "target": np.array([1])})
  with pytest.raises(ValueError, match="unequal lengths"):
    io.load_results_file(tmp_path / "results-00000003-00000005.npz")
