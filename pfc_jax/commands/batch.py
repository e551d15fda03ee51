"""`pfc-jax batch`: explain a folder, glob or tfds split into a resumable output folder.

Exit codes: 0 when every item is explained; 1 when some or all items could not be read (they
are listed in OUT/failures.jsonl; the others are explained), as `pfc-jax explain` does; 2 for
a usage error, settings or inputs that differ from the job already in --out (an image replaced,
renamed, added or removed since the job started: the message names them), or another job
running on --out; 130 (Ctrl-C, SIGINT) or 143 (SIGTERM) when stopped, after saving every finished image.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import os
import sys
import warnings
from pathlib import Path
from typing import Iterator

import tqdm

from pfc_jax import _loop, batch, io, models, parallel, sources, weights
from pfc_jax.commands._common import load_weights
from pfc_jax.explain import PRESETS, ExplainConfig


def add_parser(subparsers) -> None:
  parser = subparsers.add_parser(
      "batch", help="Explain a whole folder or tfds split, resumably, on every device.",
      description=(
          "Explains every image of a folder, glob or tfds split into --out, saving each "
          "compute batch atomically as soon as it is done. Run the same command again to "
          "resume (with any --chunk-size): saved images are skipped; inputs changed since the "
          "job started are refused, naming them. Ctrl-C or SIGTERM stops "
          "at once and keeps what is saved (exit 130 or 143). Unreadable items go to "
          "OUT/failures.jsonl and the job carries on; the exit code is then 1."))
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--images", help="Folder or glob of image files.")
  source.add_argument("--tfds", help="tfds data set name, e.g. imagenet2012.")
  parser.add_argument("--split", help="tfds split, e.g. 'validation[:10%%]' (with --tfds).")
  parser.add_argument("--data-dir", help="tfds data folder (with --tfds).")
  parser.add_argument("--out", required=True,
                      help="Output folder (manifest, results files, failures); one job at a time.")
  parser.add_argument("--model", required=True, choices=models.MODEL_NAMES, help="Classifier to explain.")
  parser.add_argument("--weights", metavar="FILE",
                      help="Weights file (.safetensors, .pth, .h5) or orbax directory; default: "
                           "the packaged weights of shapes_cnn and shapes_vit, or the cached "
                           "download of the others.")
  parser.add_argument("--preset", default="fast", choices=PRESETS, help="ExplainConfig preset.")
  parser.add_argument("--image-size", type=int,
                      help="Side of the square input in pixels, at least 8; default: the "
                           "model's own.")
  parser.add_argument("--chunk-size", type=int,
                      help="Images explained together over every device, and saved together; "
                           "default: one per device on the CPU (as fast, and each image is saved "
                           "when done), 64 on GPU and TPU. May change between runs.")
  parser.add_argument("--batching", choices=_loop.BATCHINGS,
                      help="Image layout of both stages (CoalitionConfig.batching and "
                           "PerturbConfig.batching): 'dense' explains compute batches of images in "
                           "one classifier batch per step; default: the preset's ('auto': "
                           "sequential on CPU, dense on GPU and TPU). May change between runs.")
  parser.add_argument("--compute-batch", type=int,
                      help="Images per compiled step under the dense layout (both stages); "
                           "lower it when a batch does not fit in device memory; default: the "
                           "largest that fits (see PerturbConfig.compute_batch).")
  parser.add_argument("--seed", type=int, default=0, help="Image i gets fold_in(PRNGKey(seed), i).")
  parser.add_argument("--distributed", action="store_true",
                      help="Multi-host: call jax.distributed.initialize() first (run on every host).")
  parser.add_argument("--coordinator-address",
                      help="host:port of process 0 (with --distributed, where JAX cannot detect it).")
  parser.add_argument("--num-processes", type=int, help="Total processes (with --distributed).")
  parser.add_argument("--process-id", type=int, help="This process's index (with --distributed).")
  parser.add_argument("--no-progress", action="store_true", help="No progress bar.")
  parser.set_defaults(func=run)


def with_execution(config: ExplainConfig, batching: str | None,
                   compute_batch: int | None) -> ExplainConfig:
  """`config` with both stages' `batching` and `compute_batch` set where given (None: kept).

  Raises:
    ValueError: naming `--batching` or `--compute-batch`, for a value the stages refuse.
  """
  changes = {}
  if batching is not None:
    changes["batching"] = batching
  if compute_batch is not None:
    if compute_batch < 1:
      raise ValueError(f"`--compute-batch` must be at least 1, got {compute_batch}.")
    if (batching or config.perturb.batching) not in ("dense", "auto"):
      raise ValueError(f"`--compute-batch` has no effect under `--batching "
                       f"{batching or config.perturb.batching}`; use `--batching dense`.")
    changes["compute_batch"] = compute_batch
  if not changes:
    return config
  return dataclasses.replace(
      config, coalitions=dataclasses.replace(config.coalitions, **changes),
      perturb=dataclasses.replace(config.perturb, **changes))


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


@contextlib.contextmanager
def _one_line_warnings() -> Iterator[None]:
  """Shows warnings as `pfc-jax batch: warning: ...` lines on stderr, on lines of their own
  while the progress bar is shown (`tqdm.write` clears its line and redraws it after)."""
  def show(message, category, filename, lineno, file=None, line=None):  # pylint: disable=unused-argument
    tqdm.tqdm.write(f"pfc-jax batch: warning: {message}", file=sys.stderr)

  with warnings.catch_warnings():
    warnings.simplefilter("always", UserWarning)
    warnings.showwarning = show
    yield


def run(args: argparse.Namespace) -> int:
  """Runs the job; errors a user can cause raise ValueError, which `pfc_jax.cli.main` reports in
  one line with exit code 2. Returns 0 or 1 (see the module docstring)."""
  cluster = (args.coordinator_address, args.num_processes, args.process_id)
  if any(value is not None for value in cluster) and not args.distributed:
    raise ValueError("--coordinator-address, --num-processes and --process-id need --distributed.")
  if args.chunk_size is not None and args.chunk_size < 1:
    raise ValueError(f"`--chunk-size` must be at least 1, got {args.chunk_size}.")
  if args.distributed:
    parallel.initialize_distributed(*cluster)
  if args.image_size is not None and args.image_size < 8:
    raise ValueError(f"`--image-size` must be at least 8 pixels, got {args.image_size}.")
  config = with_execution(ExplainConfig.preset(args.preset), args.batching, args.compute_batch)
  source = sources.from_args(args.images, args.tfds, args.split, args.data_dir,
                             args.image_size or models.input_size(args.model))
  variables = load_weights(args.model, args.weights)
  vgg_params = None
  if config.coalitions.init == "vgg16":
    vgg_params = variables if args.model == "vgg16" else weights.load("vgg16")
  settings = {"model": args.model, "weights": _fingerprint(args.weights), "preset": args.preset}
  try:
    with _one_line_warnings():
      summary = batch.run_job(
          source, models.classifier(args.model, variables), args.out, config=config,
          chunk_size=args.chunk_size, seed=args.seed, settings=settings, vgg_params=vgg_params,
          progress=not args.no_progress, exit_on_signal=True)
  except batch.JobLockedError as e:
    raise ValueError(str(e)) from e
  print(f"{args.out}: {summary.num_items} items, {summary.already_done} done before; "
        f"{summary.explained} explained now, {summary.failed} unreadable now.")
  if summary.total_failed and summary.total_failed == summary.num_items:
    print(f"pfc-jax batch: every item ({summary.num_items}) could not be read; reasons in "
          f"{Path(args.out) / io.FAILURES_NAME}.", file=sys.stderr)
  elif summary.total_failed:
    print(f"pfc-jax batch: {summary.total_failed} of {summary.num_items} items could not be read; "
          f"reasons in {Path(args.out) / io.FAILURES_NAME}.", file=sys.stderr)
  return 1 if summary.total_failed else 0
