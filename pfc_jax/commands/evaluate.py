"""`pfc-jax evaluate`: score saliency methods on labelled photos or on the shapes benchmark."""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

from pfc_jax import data, evaluation, io, models, weights
from pfc_jax.benchmarks import shapes

LABEL_COLUMNS = ("file", "class_index")


def add_parser(subparsers) -> None:
  parser = subparsers.add_parser(
      "evaluate", help="Measure faithfulness of PFC and baselines; write a JSON report.",
      description=(
          "Runs each method on each image (explaining the predicted class), computes the metrics "
          "of --protocols (default: Average Drop, Increase in Confidence, deletion/insertion AUC) "
          "and, on the shapes benchmark, pointing game and relevance mass; writes the means to "
          "--out and prints them as a Markdown table. PFC methods: pfc[-MODIFIER...][-PRESET] with "
          "PRESET one of " + ", ".join(evaluation.PRESETS) + " (default: --preset) and modifiers "
          + ", ".join(f"{name} ({', '.join(f'{field}={value}' for field, value in values.items())})"
                      for name, (_, values) in sorted(evaluation.PFC_MODIFIERS.items()))
          + ", e.g. pfc-region-fast_lowres. A modifier whose values the preset already has "
          "changes nothing (fast and full already blur: pfc-blur is pfc there); blur_fraction is "
          "a fraction of the image's shorter side."))
  parser.add_argument("--model", required=True, choices=models.MODEL_NAMES, help="Classifier to explain.")
  parser.add_argument("--weights", help="Weights file or source (see `pfc_jax.weights.load`).")
  parser.add_argument("--vgg-weights", help="VGG16 weights for `-vgg16init` PFC variants.")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--images", help="Folder of photos named in --labels.")
  source.add_argument("--benchmark", choices=("shapes",), help="Generated ground-truth benchmark.")
  parser.add_argument("--labels", help="CSV with columns file, class_index (with --images).")
  parser.add_argument("--num-images", type=int, default=100, help="Benchmark images to generate.")
  parser.add_argument("--benchmark-seed", type=int, default=1,
                      help="Benchmark seed; 0 is the training set, 1 (default) its held-out test set.")
  parser.add_argument("--methods", default=",".join(evaluation.DEFAULT_METHODS),
                      help="Comma-separated method names.")
  parser.add_argument("--preset", default="fast", choices=evaluation.PRESETS,
                      help="ExplainConfig preset of the PFC methods.")
  parser.add_argument("--offset", type=int, default=0, help="Skip the first N images (a split).")
  parser.add_argument("--limit", type=int, help="Evaluate at most N images after --offset.")
  parser.add_argument("--image-size", type=int, help="Side of the square input; default: the model's.")
  parser.add_argument("--batch-size", type=int, default=4, help="Images per method call.")
  parser.add_argument("--seed", type=int, default=0, help="Image i gets fold_in(key(seed), i).")
  parser.add_argument("--out", required=True, help="Report JSON path.")
  parser.add_argument(
      "--records",
      help="Per-image scores, appended as they are computed; rerunning the same command resumes "
           "from them. Default: --out with the suffix .records.jsonl.")
  parser.add_argument(
      "--protocols", default=",".join(evaluation.DEFAULT_PROTOCOLS),
      help="Comma-separated protocols, of " + ", ".join(evaluation.PROTOCOLS) + " (default: "
           "%(default)s). Protocols added on a rerun are computed from the --maps folder, or by "
           "rerunning the methods without one.")
  parser.add_argument(
      "--randomization", type=int, default=0, metavar="N",
      help="Model-randomisation sanity check on the first N images: each method reruns on the "
           "model with its last layer re-drawn; reports the mean Spearman correlation of the maps "
           "(default: %(default)s, off).")
  parser.add_argument(
      "--maps", help="Folder that keeps every method's maps, so that a rerun with more protocols "
                     "does not rerun the methods (default: none).")
  parser.add_argument("--no-progress", action="store_true", help="No progress bar.")
  parser.set_defaults(func=run)


def read_labels(path: str | Path) -> list[tuple[str, int]]:
  """`(file, class_index)` rows of a labels CSV (columns `file`, `class_index`, others ignored).

  Raises:
    ValueError: naming `path` when it lacks a column or a class index is not an integer.
  """
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    missing = [c for c in LABEL_COLUMNS if c not in (reader.fieldnames or ())]
    if missing:
      raise ValueError(f"Labels file {str(path)!r} lacks column(s) {missing}.")
    rows = list(reader)
  try:
    return [(row["file"], int(row["class_index"])) for row in rows]
  except ValueError as e:
    raise ValueError(f"Labels file {str(path)!r}: class_index must be an integer ({e}).") from e


def _window(count: int, offset: int, limit: int | None) -> slice:
  if offset < 0 or (limit is not None and limit < 1):
    raise ValueError(f"`--offset` must be >= 0 and `--limit` >= 1, got {offset} and {limit}.")
  if offset >= count:
    raise ValueError(f"`--offset` {offset} leaves no images (there are {count}).")
  return slice(offset, count if limit is None else min(count, offset + limit))


def _load(args: argparse.Namespace, size: int):
  """`(images [N, S, S, 3], labels [N], masks [N, S, S] or None)` selected by the arguments."""
  if args.benchmark == "shapes":
    window = _window(args.num_images, args.offset, args.limit)
    bench = shapes.generate(window.stop, size=size, seed=args.benchmark_seed)
    return bench.images[window], bench.labels[window], bench.masks[window]
  if not args.labels:
    raise ValueError("`--labels` is required with `--images`.")
  rows = read_labels(args.labels)
  if not rows:
    raise ValueError(f"Labels file {args.labels!r} lists no images.")
  rows = rows[_window(len(rows), args.offset, args.limit)]
  images = np.stack([data.load_image(Path(args.images) / file, size) for file, _ in rows])
  return images, np.array([label for _, label in rows], np.int32), None


def _data_settings(args: argparse.Namespace, size: int) -> dict[str, object]:
  """What identifies the images and weights, for the records file."""
  if args.benchmark:
    data_source = {"benchmark": args.benchmark, "benchmark_seed": args.benchmark_seed}
  else:
    data_source = {"images": args.images, "labels": args.labels}  # As given, like --weights.
  return {**data_source, "image_size": size, "weights": args.weights,
          "vgg_weights": args.vgg_weights}


def run(args: argparse.Namespace) -> int:
  try:
    config = evaluation.EvaluationConfig(
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()), preset=args.preset,
        batch_size=args.batch_size, seed=args.seed,
        protocols=tuple(p.strip() for p in args.protocols.split(",") if p.strip()),
        randomization=args.randomization)
    size = args.image_size or models.input_size(args.model)
    records = args.records or Path(args.out).with_suffix(".records.jsonl")
    images, labels, masks = _load(args, size)
    variables = weights.load(args.model, source=args.weights)
    vgg_params = None
    if evaluation.needs_vgg_params(config):
      vgg_params = variables if args.model == "vgg16" else weights.load("vgg16", source=args.vgg_weights)
    report = evaluation.evaluate(
        models.classifier(args.model, variables), images, config, labels=labels, masks=masks,
        model=args.model, vgg_params=vgg_params, first_index=args.offset,
        records=records, maps_dir=args.maps, settings=_data_settings(args, size),
        progress=not args.no_progress)
  except (ValueError, FileNotFoundError) as e:
    print(f"pfc-jax evaluate: error: {e}", file=sys.stderr)
    return 2
  io.write_json(args.out, report)
  accuracy = f", top-1 {report['top1_accuracy']:.1f}%" if "top1_accuracy" in report else ""
  print(f"{args.model} on {report['images']} images{accuracy}, preset {args.preset} "
        f"(per-image scores in {records}):\n")
  print(evaluation.markdown_table(report))
  return 0
