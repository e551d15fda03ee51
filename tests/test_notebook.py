"""The Colab quickstart runs top to bottom on CPU: every cell, the `tiny` preset, small sizes.

The install cell is pointed at this checkout (`PFC_JAX_REPO`) and finds pfc-jax importable from
it, so it installs nothing. The kernel gets two CPU devices, so the sharded paths shard; the
photo is explained with random SqueezeNet 1.1 weights written here, so no download is tried.
"""

from pathlib import Path

import jax
import numpy as np
import pytest

from pfc_jax import models, weights

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "colab" / "pfc_jax_quickstart.ipynb"


def _outputs(cell, kind: str) -> list:
  """The text of a cell's stream outputs (`kind` "text") or its displayed data of MIME `kind`."""
  if kind == "text":
    return [o["text"] for o in cell.get("outputs", []) if o["output_type"] == "stream"]
  return [o["data"][kind] for o in cell.get("outputs", []) if kind in o.get("data", {})]


def test_quickstart_notebook_runs_every_cell_on_cpu(tmp_path, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  pytest.importorskip("ipykernel")
  variables = models.module("squeezenet1_1").init(jax.random.key(0),
                                                  np.zeros((1, 96, 96, 3), np.float32))
  weights.save(variables, tmp_path / "squeezenet1_1.safetensors")
  for name, value in {
      "PFC_JAX_REPO": str(ROOT), "PFC_JAX_NOTEBOOK_SMOKE": "1",
      "PFC_JAX_PHOTO_MODEL": "squeezenet1_1",
      "PFC_JAX_PHOTO_WEIGHTS": str(tmp_path / "squeezenet1_1.safetensors"),
      "PFC_JAX_CACHE": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}.items():
    monkeypatch.setenv(name, value)
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  assert not any(cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")
  work = tmp_path / "work"
  work.mkdir()
  nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": str(work)}}).execute()

  code = [cell for cell in notebook.cells if cell.cell_type == "code"]
  text = ["".join(_outputs(cell, "text")) for cell in code]
  install, device, shapes, photo, job, evaluate = text
  assert "nothing to install" in install and str(ROOT / "pfc_jax") in install
  assert "backend 'cpu': 2 device(s)" in device and "'tiny'" in device
  assert shapes.count("pointing game") == 2
  assert "squeezenet1_1 sees" in photo
  assert "2 results on 2 device(s)" in job and (work / "shapes-run").is_dir()
  assert len(_outputs(code[2], "image/png")) == 2 and len(_outputs(code[3], "image/png")) == 1
  table = "".join(_outputs(code[5], "text/markdown"))
  assert all(f"| {method} |" in table for method in ("pfc", "gradcam"))
