"""`pfc-jax batch`: explain a folder, glob or tfds split into a resumable output folder."""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

from pfc_jax import batch, models, parallel, sources, weights
from pfc_jax.explain import ExplainConfig


def add_parser(subparsers) -> None:
  parser = subparsers.add_parser(
      "batch", help="Explain a whole folder or tfds split, resumably, on every device.",
      description=(
          "Explains every image of a folder, glob or tfds split in chunks written atomically "
          "under --out. Run the same command again to resume: finished chunks are skipped. "
          "Unreadable items go to OUT/failures.jsonl and the job carries on."))
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--images", help="Folder or glob of image files.")
  source.add_argument("--tfds", help="tfds data set name, e.g. imagenet2012.")
  parser.add_argument("--split", help="tfds split, e.g. 'validation[:10%%]' (with --tfds).")
  parser.add_argument("--data-dir", help="tfds data folder (with --tfds).")
  parser.add_argument("--out", required=True, help="Output folder (manifest, chunk files, failures).")
  parser.add_argument("--model", required=True, choices=models.MODEL_NAMES, help="Classifier to explain.")
  parser.add_argument("--weights", help="Weights file or source (see `pfc_jax.weights.load`).")
  parser.add_argument("--preset", default="fast", help="ExplainConfig preset: paper, fast or tiny.")
  parser.add_argument("--image-size", type=int, default=224, help="Side of the square input, pixels.")
  parser.add_argument("--chunk-size", type=int, default=64, help="Images per chunk file and per batch.")
  parser.add_argument("--seed", type=int, default=0, help="Image i gets fold_in(PRNGKey(seed), i).")
  parser.add_argument("--distributed", action="store_true",
                      help="Multi-host: call jax.distributed.initialize() first (run on every host).")
  parser.add_argument("--coordinator-address",
                      help="host:port of process 0 (with --distributed, where JAX cannot detect it).")
  parser.add_argument("--num-processes", type=int, help="Total processes (with --distributed).")
  parser.add_argument("--process-id", type=int, help="This process's index (with --distributed).")
  parser.add_argument("--no-progress", action="store_true", help="No progress bar.")
  parser.set_defaults(func=run)


def _fingerprint(weights_source: str | None) -> dict | str | None:
  """Absolute path, size and SHA-256 of a weights file; other sources as given."""
  if weights_source is None or not Path(weights_source).is_file():
    return weights_source
  file = Path(weights_source)
  digest = hashlib.sha256()
  with open(file, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      digest.update(block)
  return {"path": os.path.abspath(file), "size": file.stat().st_size, "sha256": digest.hexdigest()}


def run(args: argparse.Namespace) -> int:
  cluster = (args.coordinator_address, args.num_processes, args.process_id)
  if any(value is not None for value in cluster) and not args.distributed:
    print("pfc-jax batch: error: --coordinator-address, --num-processes and --process-id need "
          "--distributed.", file=sys.stderr)
    return 2
  if args.distributed:
    parallel.initialize_distributed(*cluster)
  try:
    config = ExplainConfig.preset(args.preset)
    source = sources.from_args(args.images, args.tfds, args.split, args.data_dir, args.image_size)
    variables = weights.load(args.model, source=args.weights)
    vgg_params = None
    if config.coalitions.init == "vgg16":
      vgg_params = variables if args.model == "vgg16" else weights.load("vgg16")
    settings = {"model": args.model, "weights": _fingerprint(args.weights), "preset": args.preset}
    summary = batch.run_job(
        source, models.classifier(args.model, variables), args.out, config=config,
        chunk_size=args.chunk_size, seed=args.seed, settings=settings, vgg_params=vgg_params,
        progress=not args.no_progress)
  except ValueError as e:
    print(f"pfc-jax batch: error: {e}", file=sys.stderr)
    return 2
  print(f"{args.out}: {summary.num_chunks} chunks ({summary.skipped_chunks} already done), "
        f"{summary.explained} images explained, {summary.failed} unreadable.")
  return 0
