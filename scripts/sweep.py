"""Sensitivity of PFC's maps to its settings: metrics per setting, from one compiled sweep.

  python scripts/sweep.py --model shapes_cnn --benchmark-seed 0 --num-images 16 --preset fast \
      --perturb parameterization=region --sweep mask_weight=0.03,0.1,0.3 \
      --records docs/results/sweep_shapes_mask.jsonl

Every combination of the `--sweep` values (fields of `pfc_jax.perturbation.SWEEPABLE`) is
explained as `pfc_jax.explain_sweep` would, by one `perturb_sweep` call per batch on the batch's
coalitions: one compilation, K x B problems in one vmapped batch. `--num-channels 5,10,20` adds an outer loop over the coalition network's output
channels l (the paper's open question 1; a structural setting, so one compilation per value).
Photos: `--images DIR --labels CSV [--offset N --limit M]` instead of the shapes benchmark, e.g.
the tuning runs of docs/faithfulness.md (rows 0-15):

  python scripts/sweep.py --model squeezenet1_1 --weights ../shared/evaldata/squeezenet1_1.safetensors \
      --images ../shared/evaldata/imagenet-sample --labels ../shared/evaldata/imagenet-sample/labels.csv \
      --limit 16 --preset fast_lowres --road --coalition-cache runs/coalitions \
      --perturb parameterization=guided confidence=log_softmax --sweep confidence_weight=10,100 \
      --records docs/results/tuning/photos_guided_logsoftmax.records.jsonl

Per-image scores go to `--records` (JSON lines, one per setting and image) as each batch
finishes; a rerun skips what is there, and the table of means is printed from the records.
`--road` adds ROAD MoRF/LeRF (Rong et al. 2022, `pfc_jax.metrics.road`).

`--saliency-sigma 0,4,8` scores each setting's w under several saliency readouts
(`PerturbConfig.saliency_sigma`, `pfc_jax.perturbation.smooth_saliency`) at no further
perturbation cost; each becomes a setting `...,saliency_sigma=S`, equal to the run with that
field set.

`--coalition-cache DIR` keeps each image's coalition labels in DIR (one `.npz` per image, keyed
by the coalition settings, seed and data), so that runs of other perturbation variants on the
same images skip the coalition stage; the labels are those `explain_sweep` would compute.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import math
import os
from pathlib import Path

import jax
import numpy as np

from pfc_jax import data, evaluation, metrics, models, weights
from pfc_jax.benchmarks import shapes
from pfc_jax.coalitions import extract_coalitions
from pfc_jax.explain import stage_keys
from pfc_jax.perturbation import PerturbConfig, perturb_sweep, saliency_map, sweep_settings

SCORES = ("average_drop", "increase_in_confidence", "deletion_auc", "insertion_auc",
          "road_morf", "road_lerf", "pointing_game", "relevance_mass")


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(PerturbConfig)}


def _value(flag: str, name: str, text: str):
  """`text` as the type of `PerturbConfig.name`'s default (an int for `noise_chunk`)."""
  if name not in _DEFAULTS:
    raise SystemExit(f"{flag}: {name!r} is not a PerturbConfig field; choose from {sorted(_DEFAULTS)}.")
  default = _DEFAULTS[name]
  kind = str if isinstance(default, str) else int if default is None else type(default)
  try:
    value = kind(text)
    # "3" stays 3, so that settings print as typed ("confidence_weight=3").
    return int(text) if kind is float and text.lstrip("-").isdigit() else value
  except ValueError:
    article = "an" if kind is int else "a"
    raise SystemExit(f"{flag}: {name} must be {article} {kind.__name__}, got {text!r}.") from None


def _parse_assignments(flag: str, items: list[str]) -> dict[tuple[str, ...], list[tuple]]:
  """`FIELD=V1,V2` -> {(FIELD,): [(V1,), (V2,)]}; `F+G=a:b,c:d` varies F and G jointly; each
  value converted to its field's type."""
  parsed = {}
  for item in items:
    names, _, values = item.partition("=")
    fields = tuple(names.split("+"))
    groups = [group.split(":") for group in values.split(",")]
    if not values or any(len(g) != len(fields) for g in groups):
      raise SystemExit(f"{flag}: expected FIELD=V1,V2,... or F+G=A1:B1,A2:B2,... , got {item!r}.")
    parsed[fields] = [tuple(_value(flag, n, v) for n, v in zip(fields, g)) for g in groups]
  return parsed


def _load(args):
  size = args.image_size or models.input_size(args.model)
  if args.images:
    from pfc_jax.commands.evaluate import read_labels
    rows = read_labels(args.labels)[args.offset:args.offset + args.limit]
    images = np.stack([data.load_image(Path(args.images) / f, size) for f, _ in rows])
    return images, None, args.offset
  bench = shapes.generate(args.offset + args.limit, size=size, seed=args.benchmark_seed)
  return bench.images[args.offset:], bench.masks[args.offset:], args.offset


def _coalition_labels(images, keys, indices, config, cache, cache_tag):
  """`[B, H, W] int32` labels as `explain_sweep` computes them (`explain.stage_keys`), read from
  or written to `cache/labels-{tag}-{index}.npz` when `cache` is given."""
  paths = [cache / f"labels-{cache_tag}-{i:08d}.npz" for i in indices] if cache else []
  if paths and all(p.exists() for p in paths):
    return np.stack([np.load(p)["labels"] for p in paths])
  labels = np.asarray(extract_coalitions(images, stage_keys(keys)[0], config.coalitions).labels)
  for path, image_labels in zip(paths, labels):
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, labels=image_labels)
    os.replace(tmp, path)
  return labels


def _cache_tag(config, header, size) -> str:
  """Digest of what the labels depend on: coalition settings, seed, data and image size."""
  keyed = (repr(config.coalitions), header["seed"], header["images"], header["benchmark_seed"],
           tuple(size))
  return hashlib.sha256(repr(keyed).encode()).hexdigest()[:12]


def _scores(classifier, images, saliency, target, masks, road_keys):
  out = {
      "average_drop": metrics.average_drop(classifier, images, saliency, target),
      "increase_in_confidence": metrics.increase_in_confidence(classifier, images, saliency, target),
      "deletion_auc": metrics.deletion_auc(classifier, images, saliency, target),
      "insertion_auc": metrics.insertion_auc(classifier, images, saliency, target),
  }
  if masks is not None:
    out["pointing_game"] = metrics.pointing_game(saliency, masks)
    out["relevance_mass"] = metrics.relevance_mass(saliency, masks)
  if road_keys is not None:
    curves = metrics.road(classifier, images, saliency, target, road_keys)
    out["road_morf"], out["road_lerf"] = curves.morf.mean(axis=1), curves.lerf.mean(axis=1)
  return {k: np.asarray(v) for k, v in out.items()}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--model", required=True, choices=models.MODEL_NAMES)
  parser.add_argument("--weights", help="Weights file (default: the model's default source).")
  parser.add_argument("--images", help="Photo folder (with --labels); default: shapes benchmark.")
  parser.add_argument("--labels", help="Labels CSV of --images.")
  parser.add_argument("--benchmark-seed", type=int, default=0, help="Shapes seed; 0 = tuning.")
  parser.add_argument("--offset", type=int, default=0, help="First image (row) index.")
  parser.add_argument("--limit", "--num-images", type=int, default=16, help="Number of images.")
  parser.add_argument("--image-size", type=int, help="Square input side; default: the model's.")
  parser.add_argument("--preset", default="fast", choices=evaluation.PRESETS,
                      help="Preset (`pfc_jax.evaluation.preset_config`).")
  parser.add_argument("--perturb", nargs="*", default=[],
                      help="FIELD=VALUE edits of the preset's PerturbConfig, e.g. parameterization=region.")
  parser.add_argument("--sweep", nargs="+", required=True,
                      help="FIELD=V1,V2,... ; several are combined as a grid; F+G=A1:B1,A2:B2 "
                           "varies F and G together.")
  parser.add_argument("--num-channels", help="Comma-separated values of l (CoalitionConfig.num_channels).")
  parser.add_argument("--batch-size", type=int, default=4)
  parser.add_argument("--seed", type=int, default=0, help="Image i gets fold_in(key(seed), i).")
  parser.add_argument("--records", required=True, help="JSON-lines file of per-image scores.")
  parser.add_argument("--road", action="store_true", help="Also score ROAD MoRF/LeRF.")
  parser.add_argument("--coalition-cache", help="Folder that keeps coalition labels per image.")
  parser.add_argument("--saliency-sigma",
                      help="Comma-separated saliency readout sigmas (pixels) scored for each setting.")
  args = parser.parse_args(argv)

  base = evaluation.preset_config(args.preset)
  edits = {k[0]: v[0][0] for k, v in _parse_assignments("--perturb", args.perturb).items()}
  swept = _parse_assignments("--sweep", args.sweep)
  fields = [name for group in swept for name in group]
  combos = [sum(parts, ()) for parts in itertools.product(*swept.values())]
  settings = {name: [float(c[i]) for c in combos] for i, name in enumerate(fields)}
  try:
    channel_values = [int(v) for v in args.num_channels.split(",")] if args.num_channels else [None]
  except ValueError:
    raise SystemExit(f"--num-channels must be comma-separated ints, got {args.num_channels!r}.") from None
  readouts = [None]
  if args.saliency_sigma:
    try:
      readouts = [float(v) for v in args.saliency_sigma.split(",")]
    except ValueError:
      readouts = []
    if not readouts or not all(math.isfinite(v) and v >= 0 for v in readouts):
      raise SystemExit(f"--saliency-sigma must be comma-separated numbers >= 0, got {args.saliency_sigma!r}.")
    if "saliency_sigma" in edits:
      raise SystemExit("Give the saliency readout either in --perturb or in --saliency-sigma.")
  try:  # before the records file is started
    sweep_settings(settings)
  except ValueError as e:
    raise SystemExit(f"--sweep: {e}") from e
  most = max([base.coalitions.num_channels] + [v for v in channel_values if v])
  try:
    base = dataclasses.replace(base, perturb=dataclasses.replace(
        base.perturb, **edits, max_coalitions=max(most, base.perturb.max_coalitions)))
  except ValueError as e:
    raise SystemExit(f"--perturb: {e}") from e

  records_path = Path(args.records)
  header = {"model": args.model, "weights": args.weights, "images": args.images,
            "benchmark_seed": None if args.images else args.benchmark_seed, "seed": args.seed,
            "preset": args.preset, "perturb": edits,
            "config_id": evaluation.fingerprint(evaluation.computed_settings(base))}
  if args.road:
    header["road"] = True
  if args.saliency_sigma:
    header["saliency_sigma"] = readouts
  done = {}
  if records_path.exists():
    lines = records_path.read_text().splitlines()
    found = json.loads(lines[0]).get("settings", {})
    if "config_id" not in found:  # Written before the fingerprint: compared without it.
      found = {**found, "config_id": header["config_id"]}
    if found != header:
      raise SystemExit(f"{records_path} was written with other settings: {lines[0]}")
    for line in lines[1:]:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue  # a torn last line
      done[(record["setting"], record["index"])] = record
  else:
    records_path.parent.mkdir(parents=True, exist_ok=True)
    records_path.write_text(json.dumps({"settings": header}) + "\n")

  cache = Path(args.coalition_cache) if args.coalition_cache else None
  if cache:
    cache.mkdir(parents=True, exist_ok=True)
  images, masks, first = _load(args)
  classifier = models.classifier(args.model, weights.load(args.model, source=args.weights))
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(args.seed), i))(
      np.arange(len(images)) + first)
  names = []
  for channels in channel_values:
    config = base if channels is None else dataclasses.replace(
        base, coalitions=dataclasses.replace(base.coalitions, num_channels=channels))
    labels = [",".join(f"{n}={c[i]}" for i, n in enumerate(fields)) for c in combos]
    if channels is not None:
      labels = [f"num_channels={channels}," + label for label in labels]
    readout_labels = [[label if sigma is None else f"{label},saliency_sigma={sigma:g}"
                       for sigma in readouts] for label in labels]
    names += [name for group in readout_labels for name in group]
    for start in range(0, len(images), args.batch_size):
      batch = slice(start, min(start + args.batch_size, len(images)))
      indices = [first + i for i in range(batch.start, batch.stop)]
      if all((name, i) in done for group in readout_labels for name in group for i in indices):
        continue
      labels_batch = _coalition_labels(images[batch], keys[batch], indices, config, cache,
                                       _cache_tag(config, header, images.shape[1:3]))
      result = perturb_sweep(classifier, images[batch], labels_batch,
                             stage_keys(keys[batch])[1],
                             config.perturb, settings)
      road_keys = keys[batch] if args.road else None
      new = []
      for k, group in enumerate(readout_labels):
        for sigma, name in zip(readouts, group):
          saliency = result.saliency[k] if sigma is None else jax.vmap(
              saliency_map, (0, None))(result.w[k], sigma)
          scores = _scores(classifier, images[batch], saliency, result.target[k],
                           None if masks is None else masks[batch], road_keys)
          new += [{"setting": name, "index": index, **{m: float(v[j]) for m, v in scores.items()}}
                  for j, index in enumerate(indices)]
      with open(records_path, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in new)
        f.flush()
        os.fsync(f.fileno())
      done.update({(r["setting"], r["index"]): r for r in new})
      print(f"{len(done)} scores in {records_path}", flush=True)

  present = [m for m in SCORES if any(m in r for r in done.values())]
  print("| setting | " + " | ".join(present) + " |\n|---|" + "---:|" * len(present))
  for label in names:
    rows = [r for (s, _), r in done.items() if s == label]
    values = [100 * np.mean([r[m] for r in rows]) if m in ("average_drop", "increase_in_confidence",
                                                          "pointing_game") else np.mean([r[m] for r in rows])
              for m in present]
    print(f"| {label} ({len(rows)} images) | " + " | ".join(f"{v:.3g}" for v in values) + " |")


if __name__ == "__main__":
  main()
