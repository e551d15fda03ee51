"""`scripts/benchmark.py`: the smoke run, its FLOP accounting against counted convolutions, and
the table of device peaks behind the MFU."""

import json
import sys
from pathlib import Path

import pytest

from pfc_jax.models.coalition_net import conv_channels

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
import benchmark  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


def _conv_flops(layers) -> int:
  """2 * H * W * k * k * C_in * C_out summed over `(size, k, c_in, c_out)` convolutions."""
  return sum(2 * size * size * k * k * c_in * c_out for size, k, c_in, c_out in layers)


@pytest.mark.parametrize("device_kind, precision, expected", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", ("H100 SXM", 989.0)),
    ("NVIDIA H100 PCIe", "float32", ("H100 PCIe", 378.0)),
    ("NVIDIA H200", "float32", ("H200", 494.7)),
    ("NVIDIA A100-SXM4-80GB", "bfloat16", ("A100", 312.0)),
    ("TPU v4", "float32", ("TPU v4", 275.0)),
    ("TPU v5 lite", "bfloat16", ("TPU v5e", 197.0)),
    ("TPU v5", "bfloat16", ("TPU v5p", 459.0)),
    ("TPU v6 lite", "bfloat16", ("TPU v6e", 918.0)),
    ("cpu", "float32", (None, None)),
])
def test_peak_table(device_kind, precision, expected):
  assert benchmark.peak_tflops(device_kind, precision) == expected


def test_smoke_run_reports_every_figure(tmp_path):
  out = tmp_path / "rows.json"
  rows = benchmark.main(["--smoke", "--json", str(out)])
  assert [row["batch"] for row in rows] == [1, 2]
  assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(rows))
  for row in rows:
    seconds = row["s_per_image"]
    assert seconds["coalitions"] > 0 and seconds["perturbation"] > 0
    assert seconds["total"] == pytest.approx(seconds["coalitions"] + seconds["perturbation"])
    assert row["images_per_s"] == pytest.approx(1 / seconds["total"])
    assert min(row["compile_s"].values()) >= 0
    for stage in ("coalitions", "perturbation"):
      assert row["achieved_tflop_per_s"][stage] == pytest.approx(
          row["gflop_per_image"][stage] / seconds[stage] / 1e3)
    assert row["mfu"] is None and row["peak_memory_gb"] is None  # No peak known for a CPU.
  # FLOP accounting against the counted convolutions of the "tiny" preset at 16 px. A training
  # step of the coalition network is a forward and a backward pass: about 3 forward passes.
  channels = conv_channels(0.125)
  fen = _conv_flops([(16, 3, c_in, c_out) for c_in, c_out in zip((3, *channels[:-1]), channels)]
                    + [(16, 1, channels[-1], 8)])
  row = rows[0]
  coalition_steps = row["steps_run"]["coalitions"]
  assert 2.6 < row["gflop_per_image"]["coalitions"] * 1e9 / (coalition_steps * fen) < 3.4
  # A perturbation step: S = 2 noisy forward passes of shapes_cnn and their input gradients.
  cnn = _conv_flops([(16, 3, 3, 8), (16, 3, 8, 8), (8, 3, 8, 16), (8, 3, 16, 16),
                     (4, 3, 16, 32), (4, 3, 32, 32)])
  assert 1.7 < row["gflop_per_image"]["perturbation"] * 1e9 / (3 * 2 * cnn) < 2.3



def test_flops_are_counted_from_shapes_on_the_cpu():
  """The count needs only the arguments' shapes and dtypes, and matches the arithmetic."""
  import _xla_cost  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  import jax  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,import-outside-toplevel

  def matmul_then_conv(a, b, image, kernel):
    return (a @ b).sum() + jax.lax.conv_general_dilated(
        image, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")).sum()

  operands = (jnp.ones((8, 16)), jnp.ones((16, 4)), jnp.ones((2, 6, 6, 3), jnp.bfloat16),
              jnp.ones((3, 3, 3, 5), jnp.bfloat16))
  expected = 2 * 8 * 16 * 4 + 2 * 2 * 4 * 4 * 3 * 3 * 3 * 5  # 4 x 4 outputs, 27 taps
  # Beyond the products: the two sums and the bfloat16 conversions, a few hundred FLOPs.
  assert expected <= _xla_cost.flops(matmul_then_conv, *operands) <= 1.05 * expected
  typed_key = jax.random.key(0)
  assert _xla_cost.flops(lambda k, x: jax.random.normal(k, x.shape) * x, typed_key,
                         jnp.ones(4)) > 0


def test_recount_restores_the_cost_of_a_row(tmp_path):
  """`--recount` recomputes FLOPs, TFLOP/s and MFU from a file's rows, leaving the times."""
  out = tmp_path / "rows.json"
  rows = benchmark.main(["--smoke", "--max-steps", "3", "--json", str(out)])
  record = json.loads(out.read_text())
  for row in record["rows"]:
    row["gflop_per_image"] = {stage: float("nan") for stage in row["gflop_per_image"]}
    row["achieved_tflop_per_s"] = {stage: 0.0 for stage in row["achieved_tflop_per_s"]}
    row["device"] = "NVIDIA H200"  # As if measured there: the MFU is against its peak.
  out.write_text(json.dumps(record))
  recounted = benchmark.main(["--recount", str(out)])
  assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(recounted))
  for before, after in zip(rows, recounted):
    assert after["s_per_image"] == before["s_per_image"]
    for stage in ("coalitions", "perturbation", "total"):
      assert after["gflop_per_image"][stage] == pytest.approx(before["gflop_per_image"][stage])
      assert after["achieved_tflop_per_s"][stage] == pytest.approx(
          before["achieved_tflop_per_s"][stage])
      assert after["mfu"][stage] == pytest.approx(before["achieved_tflop_per_s"][stage] / 494.7)


def test_recount_names_a_bad_file(tmp_path, capsys):
  not_json = tmp_path / "rows.txt"
  not_json.write_text("no rows here")
  for path in (tmp_path / "missing.json", not_json):
    with pytest.raises(SystemExit):
      benchmark.main(["--recount", str(path)])
    assert f"--recount {path}: not a readable benchmark --json file" in capsys.readouterr().err
