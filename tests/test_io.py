"""Atomic writes leave either the old file or the new one, never a partial or temporary file."""

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
