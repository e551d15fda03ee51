"""Every script in examples/ runs end to end in a fresh process and prints what it promises."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NUMBER = r"-?\d+\.\d+"


def _run(name: str, **env: str) -> str:
  """stdout of `python examples/<name>`, run from the repository root (its pfc_jax first)."""
  environment = {**os.environ, "PYTHONPATH": str(ROOT), **env}
  result = subprocess.run([sys.executable, str(ROOT / "examples" / name)], cwd=ROOT,
                          env=environment, capture_output=True, text=True, timeout=900,
                          check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def test_nnx_research_loop_explains_with_one_compilation():
  lines = _run("nnx_research_loop.py").strip().splitlines()
  pattern = (rf"step (\d+): loss ({NUMBER}), probe [0-4]/4 classified correctly, relevance "
             rf"mass ({NUMBER}), explain compilations (\d+)")
  matches = [re.fullmatch(pattern, line) for line in lines]
  assert len(lines) == 3 and all(matches), lines
  assert [int(m.group(1)) for m in matches] == [50, 100, 150]
  assert [int(m.group(4)) for m in matches] == [1, 1, 1]  # Every explanation reuses the first.
  assert all(0.0 <= float(m.group(3)) <= 1.0 for m in matches)


def test_custom_objective_lowers_the_objective_and_names_both_classes():
  lines = _run("custom_objective.py").strip().splitlines()
  classes = "cross|ring|triangle|star"
  pattern = (rf"image \d: ({classes}) rather than ({classes}): objective ({NUMBER}) -> "
             rf"({NUMBER}), relevance mass ({NUMBER})")
  matches = [re.fullmatch(pattern, line) for line in lines]
  assert len(lines) == 2 and all(matches), lines
  for m in matches:
    assert m.group(1) != m.group(2)
    assert float(m.group(4)) < float(m.group(3))
    assert 0.0 <= float(m.group(5)) <= 1.0


def test_shard_batch_splits_the_batch_over_every_device():
  devices = 8  # Fake CPU devices, set before JAX starts in the example's process.
  out = _run("shard_batch.py", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  match = re.fullmatch(rf"8 images on (\d+) devices: saliency \(8, 32, 32\), mean relevance "
                       rf"mass ({NUMBER})", out.strip())
  assert match, out
  assert int(match.group(1)) == devices and 0.0 <= float(match.group(2)) <= 1.0
