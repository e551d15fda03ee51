"""pfc-jax under the JAX global modes research code turns on: 64-bit mode and NaN checks."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

_TESTS = Path(__file__).parent


def test_core_cases_run_under_x64_and_debug_nans(tmp_path):
  """`JAX_ENABLE_X64=1` and `JAX_DEBUG_NANS=1`, each in its own process (`jax_modes_main.py`):
  every case runs, in float32 and finite, and the two modes agree to float32 rounding, except
  PFC's explanation: its coalition network's initial weights and its noise are drawn from the
  PRNG in the default float dtype, which is float64 under x64 (other bits, other draws)."""
  python_path = os.pathsep.join([str(_TESTS.parent), os.environ.get("PYTHONPATH", "")])
  modes = {"x64": "JAX_ENABLE_X64", "debug_nans": "JAX_DEBUG_NANS"}
  jobs = {mode: subprocess.Popen(
      [sys.executable, str(_TESTS / "jax_modes_main.py"), str(tmp_path / f"{mode}.npz")],
      env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": python_path, variable: "1"},
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for mode, variable in modes.items()}
  for mode, job in jobs.items():
    output = job.communicate(timeout=600)[0]
    assert job.returncode == 0, f"{mode}:\n{output[-3000:]}"
  x64, checked = (np.load(tmp_path / f"{mode}.npz") for mode in modes)
  assert sorted(x64.files) == sorted(checked.files) and len(x64.files) > 20
  for name in x64.files:
    if name.startswith("explain/"):
      continue
    np.testing.assert_allclose(x64[name], checked[name], rtol=1e-4, atol=1e-5, err_msg=name)
