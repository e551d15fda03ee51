"""Throughput of the PFC pipeline by stage: s/image, TFLOP/s, MFU, compile time, peak memory.

  python scripts/benchmark.py --model vgg16 squeezenet1_1 --preset paper fast --batch 1 4 16 \
      --max-steps 20 --json docs/results/benchmark.json
  python scripts/benchmark.py --smoke    # seconds on a CPU: shapes_cnn, 16 px, "tiny" preset

For each model, preset, precision, image layout (`--batching`) and batch size, both stages
(coalitions, perturbation) run once on the same batch to compile, then `--repeats` times, timed.
Each row reports:
- seconds per image of each stage (timed runs / batch); with `--max-steps N` at most N steps run
  per stage and the time is scaled to the preset's steps (set-up included, a slight overestimate;
  coalitions that stopped early are not scaled);
- compile time: the first run minus a timed run (tracing and compilation of every program);
- GFLOP per image from XLA's cost analysis of the one-image programs (coalitions: set-up + one
  step x the steps taken; perturbation: set-up + one step x its steps), achieved TFLOP/s and the
  MFU against the device's dense peak (`PEAKS`; none known for CPUs);
- peak device memory, `memory_stats()["peak_bytes_in_use"]` where the backend reports it (GPU,
  TPU): the process's peak so far; rows run in increasing batch size;
- images per second of a whole-shard job at that batch size, compilation amortised:
  batch / (coalition + perturbation seconds);
- in the JSON only, `cpu_s_per_image`: the process's CPU seconds (every thread) per image, as
  the seconds are scaled; on a CPU shared with other work it compares layouts where the wall
  time cannot.
Weights are random (speed does not depend on their values) unless `--weights` names a file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

from pfc_jax import _loop, _precision, coalitions, models, perturbation, sources, weights
from pfc_jax.evaluation import PRESETS, preset_config
from pfc_jax.explain import ExplainConfig
from _xla_cost import flops

# (substring of jax's device_kind, lower case; name; dense peak TFLOP/s in bfloat16; in float32
# as XLA runs it by default: TF32 tensor cores on NVIDIA GPUs, bfloat16 passes on TPUs).
# Vendor data sheets, per chip.
PEAKS = (
    ("h100 pcie", "H100 PCIe", 756.0, 378.0),
    ("h100", "H100 SXM", 989.0, 494.7),
    ("h200", "H200", 989.0, 494.7),
    ("a100", "A100", 312.0, 156.0),
    ("tpu v4", "TPU v4", 275.0, 275.0),
    ("tpu v5 lite", "TPU v5e", 197.0, 197.0),
    ("tpu v5e", "TPU v5e", 197.0, 197.0),
    ("tpu v5", "TPU v5p", 459.0, 459.0),
    ("tpu v6", "TPU v6e", 918.0, 918.0),
)


def peak_tflops(device_kind: str, precision: str) -> tuple[str, float] | tuple[None, None]:
  """`(name, dense peak TFLOP/s)` of a device in `precision`, or `(None, None)` if unknown."""
  kind = device_kind.lower()
  for pattern, name, bf16, f32 in PEAKS:
    if pattern in kind:
      return name, bf16 if precision == "bfloat16" else f32
  return None, None


def _timed(fn, repeats: int) -> tuple[object, float, float, float]:
  """`(result, first call's seconds, mean seconds of `repeats` further calls, and their mean
  process CPU seconds)`."""
  start = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - start
  start, cpu_start = time.perf_counter(), time.process_time()
  for _ in range(repeats):
    result = jax.block_until_ready(fn())
  return (result, first, (time.perf_counter() - start) / repeats,
          (time.process_time() - cpu_start) / repeats)


def _peak_memory_gb() -> float | None:
  stats = jax.devices()[0].memory_stats()
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  return stats["peak_bytes_in_use"] / 1e9


def _config(preset: str, max_steps: int | None, precision: str, batching: str,
            compute_batch: int | None = None):
  """`(config run, config of the preset)` with precision, batching and compute batch set in
  both stages."""
  base = preset_config(preset)
  layout = dict(precision=precision, batching=batching, compute_batch=compute_batch)
  base = ExplainConfig(dataclasses.replace(base.coalitions, **layout),
                       dataclasses.replace(base.perturb, **layout))
  if not max_steps:
    return base, base
  return ExplainConfig(
      dataclasses.replace(base.coalitions, max_steps=min(max_steps, base.coalitions.max_steps)),
      dataclasses.replace(base.perturb, steps=min(max_steps, base.perturb.steps))), base


def _image_gflop(config: ExplainConfig, classifier, image, labels, key, coalition_steps: float):
  """GFLOP of one image's coalitions (`coalition_steps` steps) and perturbation, from XLA."""
  training = coalitions.image_training(config.coalitions)
  state = jax.eval_shape(training.init, image, key)
  coalition = (flops(training.init, image, key)
               + coalition_steps * flops(training.step, state))
  functions = _loop.image_functions(perturbation._STAGE)  # pylint: disable=protected-access
  static = dataclasses.replace(config.perturb, batching="auto", driver="auto")
  inputs = (image, labels, key, perturbation.Hyperparameters.from_config(config.perturb))
  state = jax.eval_shape(lambda c, i: functions.prepare(static, c, i), classifier, inputs)
  perturb = (flops(lambda c, i: functions.prepare(static, c, i), classifier, inputs)
             + config.perturb.steps * flops(lambda c, s: functions.step(static, c, s)[0],
                                            classifier, state))
  return coalition / 1e9, perturb / 1e9


def benchmark(classifier, images, config: ExplainConfig, preset: ExplainConfig, repeats: int):
  """One row: both stages on `images [B, H, W, 3]`, timed and costed (see the module doc)."""
  batch = images.shape[0]
  keys = jax.random.split(jax.random.key(0), batch)
  found, coalition_first, coalition_s, coalition_cpu = _timed(
      lambda: coalitions.extract_coalitions(images, keys, config.coalitions), repeats)
  _, perturb_first, perturb_s, perturb_cpu = _timed(
      lambda: perturbation.perturb(classifier, images, found.labels, keys, config.perturb),
      repeats)
  steps_run = float(np.mean(found.steps))
  scales = _step_scales(config, preset, steps_run)
  seconds = {"coalitions": scales["coalitions"] * coalition_s / batch,
             "perturbation": scales["perturbation"] * perturb_s / batch}
  seconds["total"] = seconds["coalitions"] + seconds["perturbation"]
  cpu_seconds = {"coalitions": scales["coalitions"] * coalition_cpu / batch,
                 "perturbation": scales["perturbation"] * perturb_cpu / batch}
  cpu_seconds["total"] = cpu_seconds["coalitions"] + cpu_seconds["perturbation"]
  cost = _cost(preset, classifier, images[0], found.labels[0], keys[0],
               scales["coalitions"] * steps_run, seconds, config.perturb.precision,
               jax.devices()[0].device_kind)
  return {
      "batch": batch,
      "s_per_image": seconds,
      "cpu_s_per_image": cpu_seconds,
      "images_per_s": 1.0 / seconds["total"],
      "compile_s": {"coalitions": max(0.0, coalition_first - coalition_s),
                    "perturbation": max(0.0, perturb_first - perturb_s)},
      **cost,
      "peak_memory_gb": _peak_memory_gb(),
      "steps_run": {"coalitions": steps_run, "perturbation": config.perturb.steps},
      "scaled_to_preset_steps": set(scales.values()) != {1.0},
  }


def _step_scales(config: ExplainConfig, preset: ExplainConfig, coalition_steps_run: float):
  """Factors from the steps run (`config`) to the preset's, per stage. Coalitions that stopped
  early (mean steps below the maximum) are not scaled: the preset's run stops at the same step."""
  coalition_scale = preset.coalitions.max_steps / config.coalitions.max_steps
  if coalition_steps_run < config.coalitions.max_steps:
    coalition_scale = 1.0
  return {"coalitions": coalition_scale,
          "perturbation": preset.perturb.steps / config.perturb.steps}


def _cost(preset: ExplainConfig, classifier, image, labels, key, coalition_steps: float,
          seconds: dict, precision: str, device_kind: str) -> dict:
  """GFLOP per image, achieved TFLOP/s and MFU of a row timed at `seconds` per image."""
  coalition_gflop, perturb_gflop = _image_gflop(preset, classifier, image, labels, key,
                                                coalition_steps)
  gflop = {"coalitions": coalition_gflop, "perturbation": perturb_gflop,
           "total": coalition_gflop + perturb_gflop}
  tflops = {stage: gflop[stage] / seconds[stage] / 1e3 for stage in seconds}
  peak_name, peak = peak_tflops(device_kind, precision)
  return {"gflop_per_image": gflop, "achieved_tflop_per_s": tflops, "peak": peak_name,
          "mfu": {stage: value / peak for stage, value in tflops.items()} if peak else None}


def recount(path: str) -> list[dict]:
  """Recounts the FLOPs, TFLOP/s and MFU of the rows in a `--json` file, in place.

  For files written before the count was taken on XLA:CPU (on a GPU they hold XLA:GPU's count,
  which leaves out the convolutions run by cuDNN). The times stay as measured.
  """
  record = json.loads(Path(path).read_text())
  max_steps = _parser().parse_args(record["argv"]).max_steps
  with jax.default_device(jax.devices("cpu")[0]):
    for row in record["rows"]:
      config, preset = _config(row["preset"], max_steps, row["precision"],
                               row["batching"].split("+")[-1])
      steps_run = row["steps_run"]["coalitions"]
      image = np.zeros((row["size"], row["size"], 3), np.float32)
      row.update(_cost(preset, _random_classifier(row["model"], row["size"]), image,
                       np.zeros(image.shape[:2], np.int32), jax.random.key(0),
                       _step_scales(config, preset, steps_run)["coalitions"] * steps_run,
                       {stage: row["s_per_image"][stage] for stage in ("coalitions",
                                                                         "perturbation", "total")},
                       row["precision"], row["device"]))
  Path(path).write_text(json.dumps(record, indent=2))
  return record["rows"]


def _random_classifier(name: str, size: int):
  module = models.module(name)
  variables = jax.jit(module.init)(jax.random.key(0), np.zeros((1, size, size, 3), np.float32))
  return models.classifier(name, variables)


def _layouts(config: ExplainConfig) -> str:
  """The stages' resolved layouts: one name, or `coalitions+perturbation` where they differ."""
  layouts = (config.coalitions.layout(), config.perturb.layout())
  return layouts[0] if layouts[0] == layouts[1] else "+".join(layouts)


def _table(rows: list[dict]) -> str:
  lines = ["| model | preset | precision | batching | batch | s/image coal. + pert. = total | "
           "images/s | compile s | TFLOP/s coal. / pert. | MFU coal. / pert. | peak GB |",
           "|---|---|---|---|---:|---|---:|---:|---|---|---:|"]
  for r in rows:
    s, t = r["s_per_image"], r["achieved_tflop_per_s"]
    mfu = (f"{r['mfu']['coalitions']:.1%} / {r['mfu']['perturbation']:.1%}" if r["mfu"]
           else "n/a")
    memory = f"{r['peak_memory_gb']:.1f}" if r["peak_memory_gb"] is not None else "n/a"
    lines.append(
        f"| {r['model']} | {r['preset']} | {r['precision']} | {r['batching']} | {r['batch']} | "
        f"{s['coalitions']:.3g} + {s['perturbation']:.3g} = {s['total']:.3g} | "
        f"{r['images_per_s']:.3g} | {sum(r['compile_s'].values()):.1f} | "
        f"{t['coalitions']:.3g} / {t['perturbation']:.3g} | {mfu} | {memory} |")
  return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--model", nargs="+", default=["squeezenet1_1"], choices=models.MODEL_NAMES)
  parser.add_argument("--weights", help="Weights file (one --model only); default: random.")
  parser.add_argument("--size", type=int, default=224, help="Image side, pixels.")
  parser.add_argument("--preset", nargs="+", default=["fast"], choices=PRESETS)
  parser.add_argument("--batch", nargs="+", type=int, default=[1], help="Images per call.")
  parser.add_argument("--precision", nargs="+", default=["auto"], choices=_precision.PRECISIONS,
                      help="'auto': bfloat16 on GPU/TPU, float32 on CPU (the library's default).")
  parser.add_argument("--batching", nargs="+", default=["auto"], choices=_loop.BATCHINGS,
                      help="Both stages' layout; a row names the layouts it resolved to, "
                           "coalitions+perturbation where they differ.")
  parser.add_argument("--compute-batch", type=int,
                      help="Images per compiled step of the 'dense' layout; default: the "
                           "library's choice (from the device's memory).")
  parser.add_argument("--repeats", type=int, default=1, help="Timed runs per stage.")
  parser.add_argument("--images", help="Folder or glob of photos (default: random images).")
  parser.add_argument("--max-steps", type=int,
                      help="Run at most N steps per stage and scale to the preset's steps.")
  parser.add_argument("--json", help="Also write the rows to this JSON file.")
  parser.add_argument("--smoke", action="store_true",
                      help="A few seconds on any backend: shapes_cnn, 16 px, 'tiny', batch 1 2.")
  parser.add_argument("--recount", nargs="+", metavar="JSON",
                      help="Only recount the FLOPs, TFLOP/s and MFU of these --json files' rows "
                           "with today's presets (times unchanged), rewrite the files in place "
                           "and print the rows; other options are ignored.")
  return parser


def main(argv: list[str] | None = None) -> list[dict]:
  parser = _parser()
  args = parser.parse_args(argv)
  if args.recount:
    rows = []
    for path in args.recount:
      try:
        rows += recount(path)
      except (OSError, ValueError, KeyError, TypeError) as error:
        parser.error(f"--recount {path}: not a readable benchmark --json file ({error!r}).")
    print(_table(rows))
    return rows
  if args.smoke:
    args.model, args.size, args.preset, args.batch = ["shapes_cnn"], 16, ["tiny"], [1, 2]
  if args.weights and len(args.model) != 1:
    parser.error("--weights needs exactly one --model.")
  if min(args.batch) < 1 or args.size < 8:
    parser.error("--batch must be at least 1 and --size at least 8.")

  device = jax.devices()[0]
  print(f"{jax.default_backend()}: {jax.device_count()} x {device.device_kind}, jax "
        f"{jax.__version__}, {args.size} px", flush=True)
  rows = []

  def save():  # After every row, so that a run cut short keeps what it measured.
    if args.json:
      Path(args.json).parent.mkdir(parents=True, exist_ok=True)
      Path(args.json).write_text(json.dumps(
          {"backend": jax.default_backend(), "device": device.device_kind,
           "device_count": jax.device_count(), "jax": jax.__version__,
           "argv": sys.argv[1:] if argv is None else argv, "rows": rows}, indent=2))

  for model in args.model:
    classifier = (models.classifier(model, weights.load(model, source=args.weights))
                  if args.weights else _random_classifier(model, args.size))
    source = sources.ImageFolderSource(args.images, args.size) if args.images else None
    for preset in args.preset:
      for precision in map(_precision.resolve_precision, args.precision):
        for batching in args.batching:
          config, preset_config = _config(preset, args.max_steps, precision, batching,
                                          args.compute_batch)
          for batch in sorted(args.batch):
            if source:
              images = np.stack([source.read(i % len(source))[1] for i in range(batch)])
            else:
              images = np.random.default_rng(batch).random(
                  (batch, args.size, args.size, 3), np.float32)
            row = benchmark(classifier, images, config, preset_config, args.repeats)
            rows.append({"model": model, "preset": preset, "precision": precision,
                         "batching": _layouts(config), "size": args.size,
                         "device": device.device_kind, **row})
            print(_table(rows[-1:]).splitlines()[-1], flush=True)
            save()
  print(_table(rows))
  return rows


if __name__ == "__main__":
  main()
