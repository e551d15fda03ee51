"""Device memory of each stage's step program, per image, from XLA's memory analysis.

  python scripts/memory.py --model vgg16 squeezenet1_1 --preset fast paper --batch 1 16 64
  python scripts/memory.py --smoke       # seconds: shapes_cnn, 32 px, "tiny" preset

Nothing runs and no weights are needed: each step is compiled for abstract parameters on the
default backend and `memory_analysis()` reports the buffers the compiled program holds
(arguments, outputs, temporaries: activations kept for the backward pass, gradients,
convolution workspaces), not what an allocator held around it (the autotuner's trial
workspaces on a GPU, which inflate `memory_stats()["peak_bytes_in_use"]`). The program is the
one a stage runs per step in `--batching` ("dense": one step over `--batch` images; "map" and
"sequential": the one-image step, whatever the batch):

- coalitions: the coalition network's training step (`paper`: the whole network at full
  resolution; `fast`: the heads on the frozen backbone's features);
- perturbation: one Adam step (`fast`: both games, all noisy images in one classifier batch
  under "dense").

Each row gives the larger of the two stages (they run one after the other), per image:
(temporaries + carries) / batch, and the classifier's parameters once. Then, for each stage, the
`compute_batch` that `pfc_jax._loop.default_compute_batch` would choose on a device whose
allocator may hold 12 GB (a 16 GB GPU under JAX's default preallocation of 75%, e.g. Colab's
T4) and 60 GB (an 80 GB one): the same on both wherever the step's 8 GB budget
(`_loop.STEP_MEMORY_BUDGET`) is the tighter bound. XLA:CPU and XLA:GPU fuse and lay out
differently, so figures taken on the CPU are estimates of a GPU's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from pfc_jax import _loop, _precision, coalitions, models, perturbation
from pfc_jax.evaluation import PRESETS, preset_config
from pfc_jax.explain import ExplainConfig

_GB = 1e9
DEVICES_GB = {"16 GB GPU": 12.0, "80 GB GPU": 60.0}  # bytes_limit at 75% preallocation.


def _abstract_classifier(model: str, size: int):
  variables = jax.eval_shape(models.module(model).init, jax.random.key(0),
                             jnp.zeros((1, size, size, 3)))
  return models.classifier(model, variables)


def _step_memory(stage, static, shared, inputs, batch: int, layout: str):
  """`(memory analysis, shared bytes)` of `stage`'s step for `batch` images in `layout`."""
  dense = layout == "dense"
  inputs = jax.tree.map(lambda x: jax.ShapeDtypeStruct((batch if dense else 1, *x.shape[1:]),
                                                       x.dtype), inputs)
  carries = jax.eval_shape(lambda s, i: jax.vmap(lambda one: stage.prepare(static, s, one))(i),
                           shared, inputs)
  if dense:
    step = _loop.jit_step(_loop._dense_paired_step(stage))  # pylint: disable=protected-access
    analysis = step.lower(static, (shared, carries)).compile().memory_analysis()
  else:
    step = _loop.jit_step(_loop._paired_step(stage.step))  # pylint: disable=protected-access
    one = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), carries)
    analysis = step.lower(static, (shared, one)).compile().memory_analysis()
  return analysis, _loop._nbytes(shared), _loop._nbytes(carries)  # pylint: disable=protected-access


def _inputs(config: ExplainConfig, size: int):
  """Abstract one-image inputs of both stages."""
  image = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), 1))
  hyper = jax.eval_shape(lambda: jax.tree.map(
      lambda v: jnp.full(1, v), perturbation.Hyperparameters.from_config(config.perturb)))
  labels = jax.ShapeDtypeStruct((1, size, size), jnp.int32)
  return (image, keys), (image, labels, keys, hyper)


def _stages(config: ExplainConfig, classifier, layout: str):
  """`{stage name: (stage, static, shared)}` as `explain` runs them in `layout`: under
  "dense" the perturbation's games share one program, otherwise they run one after another
  (the first, the larger, is the one measured)."""
  # pylint: disable=protected-access
  games = perturbation._games(config.perturb)
  return {
      "coalitions": (coalitions._STAGE, coalitions._static_config(config.coalitions), None),
      "perturbation": ((perturbation._GAMES_STAGE, games, classifier) if layout == "dense"
                       else (perturbation._STAGE, games[0], classifier)),
  }


def row(model: str, preset: str, size: int, batch: int, layout: str, precision: str) -> dict:
  """Memory of both stages' steps for `batch` images (see the module docstring)."""
  base = preset_config(preset)
  config = ExplainConfig(dataclasses.replace(base.coalitions, precision=precision),
                         dataclasses.replace(base.perturb, precision=precision))
  classifier = _abstract_classifier(model, size)
  stage_inputs = dict(zip(("coalitions", "perturbation"), _inputs(config, size)))
  result = {"model": model, "preset": preset, "size": size, "batch": batch, "layout": layout,
            "precision": precision, "backend": jax.default_backend()}
  for name, (stage, static, shared) in _stages(config, classifier, layout).items():
    stage_layout = layout if name == "perturbation" or not config.coalitions.train_backbone \
        else "map"  # `paper`'s coalitions keep the one-image program.
    analysis, shared_bytes, carry_bytes = _step_memory(stage, static, shared, stage_inputs[name],
                                                       batch, stage_layout)
    images = batch if stage_layout == "dense" else 1
    per_image = (analysis.temp_size_in_bytes + 2 * carry_bytes) / images
    memory = _loop.DenseMemory(shared_bytes, int(per_image * images))  # For `images` images.
    result[name] = {
        "layout": stage_layout, "temp_gb": analysis.temp_size_in_bytes / _GB,
        "shared_gb": shared_bytes / _GB, "per_image_gb": per_image / _GB,
        "step_gb": memory.estimate(1) / _GB}
    if batch == 1 and stage_layout == "dense":
      result[name]["default_compute_batch"] = {
          device: _default(memory, limit * _GB) for device, limit in DEVICES_GB.items()}
  return result


def _default(memory: _loop.DenseMemory, limit: float) -> int:
  """`_loop.default_compute_batch`'s choice for a device whose allocator may hold `limit`."""
  budget = min(0.8 * limit, _loop.STEP_MEMORY_BUDGET)
  compute_batch = _loop.MAX_COMPUTE_BATCH
  while compute_batch > 1 and memory.estimate(compute_batch) > budget:
    compute_batch //= 2
  return compute_batch


def _table(rows: list[dict]) -> str:
  lines = ["| model | preset | precision | layout | batch | coalitions GB/image | "
           "perturbation GB/image | parameters GB | step GB (larger stage) | default "
           "compute_batch coal. / pert., 16 GB; 80 GB |",
           "|---|---|---|---|---:|---:|---:|---:|---:|---|"]
  for r in rows:
    coal, pert = r["coalitions"], r["perturbation"]
    defaults = [(s.get("default_compute_batch") or {}) for s in (coal, pert)]
    text = ("; ".join(" / ".join(str(d.get(device, "-")) for d in defaults)
                      for device in DEVICES_GB) if any(defaults) else "")
    lines.append(
        f"| {r['model']} | {r['preset']} | {r['precision']} | {coal['layout']}+{pert['layout']} "
        f"| {r['batch']} | {coal['per_image_gb']:.3f} | {pert['per_image_gb']:.3f} | "
        f"{pert['shared_gb']:.3f} | {max(coal['step_gb'], pert['step_gb']):.2f} | {text} |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--model", nargs="+", default=["squeezenet1_1"], choices=models.MODEL_NAMES)
  parser.add_argument("--preset", nargs="+", default=["fast"], choices=PRESETS)
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--batch", nargs="+", type=int, default=[1, 16])
  parser.add_argument("--batching", nargs="+", default=["dense"], choices=("dense", "map"))
  parser.add_argument("--precision", nargs="+", default=["auto"], choices=_precision.PRECISIONS)
  parser.add_argument("--json", help="Also write the rows to this JSON file.")
  parser.add_argument("--smoke", action="store_true", help="shapes_cnn, 32 px, 'tiny', batch 1 2.")
  args = parser.parse_args(argv)
  if args.smoke:
    args.model, args.preset, args.size, args.batch = ["shapes_cnn"], ["tiny"], 32, [1, 2]
  print(f"{jax.default_backend()}: {jax.devices()[0].device_kind}, jax {jax.__version__}",
        flush=True)
  rows = []
  for model in args.model:
    for preset in args.preset:
      for precision in map(_precision.resolve_precision, args.precision):
        for layout in args.batching:
          for batch in sorted(set(args.batch) if layout == "dense" else {1}):
            rows.append(row(model, preset, args.size, batch, layout, precision))
            print(_table(rows[-1:]).splitlines()[-1], flush=True)
            if args.json:
              Path(args.json).parent.mkdir(parents=True, exist_ok=True)
              Path(args.json).write_text(json.dumps({"argv": sys.argv[1:] if argv is None else argv,
                                                     "rows": rows}, indent=2))
  print(_table(rows))
  return rows


if __name__ == "__main__":
  main()
