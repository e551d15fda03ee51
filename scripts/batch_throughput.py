"""End-to-end throughput of a batch job (`pfc_jax.batch.run_job`, what `pfc-jax batch` runs):
images/s including decoding, host-to-device transfer and writing, and where the time goes.

  python scripts/batch_throughput.py --count 1024 --model squeezenet1_1 --preset fast \
      --weights W --photos DIR --chunk-size 64
  python scripts/batch_throughput.py --smoke     # seconds: 16 copies at 32 px, shapes_cnn

The source is `--count` copies (symbolic links) of the photos in `--photos` (default: the
packaged sample photo), so the files are decoded and resized as a real shard's are. One chunk
runs first into a scratch folder, so that the timed job finds its programs compiled; the timed
job then explains every copy into a fresh folder, and its `pfc_jax.prefetch.Timings` say how
long the main thread computed (transfers included) and how long reading and writing took on
their background threads, and whether the computation ever waited for them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from pfc_jax import batch, data, models, parallel, prefetch, sources, weights
from pfc_jax.explain import PRESETS, ExplainConfig

_SAMPLE = Path(__file__).parents[1] / "pfc_jax" / "assets" / "grace_hopper.jpg"


def make_copies(photos: list[Path], count: int, folder: Path) -> Path:
  """`count` links named `copy00000_NAME...` to `photos` in turn, in `folder`."""
  folder.mkdir(parents=True, exist_ok=True)
  for i in range(count):
    photo = photos[i % len(photos)]
    (folder / f"copy{i:05d}_{photo.name}").symlink_to(photo.resolve())
  return folder


def run(args: argparse.Namespace) -> dict:
  base = ExplainConfig.preset(args.preset)
  config = ExplainConfig(
      dataclasses.replace(base.coalitions, batching=args.batching, **_steps(args, "max_steps")),
      dataclasses.replace(base.perturb, batching=args.batching, **_steps(args, "steps")))
  if args.weights:
    variables = weights.load(args.model, source=args.weights)
  else:
    module = models.module(args.model)
    variables = jax.jit(module.init)(jax.random.key(0),
                                     np.zeros((1, args.size, args.size, 3), np.float32))
  classifier = models.classifier(args.model, variables)
  photos = sorted(Path(p) for p in data.list_images(args.photos)) if args.photos else [_SAMPLE]
  chunk_size = args.chunk_size or batch.default_chunk_size(parallel.data_mesh())
  with tempfile.TemporaryDirectory() as scratch:
    scratch = Path(scratch)
    warmup = sources.ImageFolderSource(make_copies(photos, chunk_size, scratch / "warmup"),
                                       args.size)
    start = time.perf_counter()
    batch.run_job(warmup, classifier, scratch / "warmup_out", config=config,
                  chunk_size=chunk_size, progress=False)
    compile_s = time.perf_counter() - start
    source = sources.ImageFolderSource(make_copies(photos, args.count, scratch / "images"),
                                       args.size)
    timings = prefetch.Timings()
    start = time.perf_counter()
    batch.run_job(source, classifier, scratch / "out", config=config, chunk_size=chunk_size,
                  progress=False, timings=timings)
    wall = time.perf_counter() - start
  result = {"model": args.model, "preset": args.preset, "batching": args.batching,
            "layouts": [config.coalitions.layout(), config.perturb.layout()],
            "size": args.size, "count": args.count, "chunk_size": chunk_size,
            "device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
            "warmup_s": compile_s, "wall_s": wall, "images_per_s": args.count / wall,
            "timings": {name: getattr(timings, name) for name in
                        ("compute", "read", "read_wait", "write", "write_wait", "batches")}}
  print(f"{args.model} {args.preset} ({'+'.join(result['layouts'])}), {args.size} px, "
        f"chunk {chunk_size} on {result['device']}: first chunk (compiling) {compile_s:.1f} s; "
        + timings.summary(wall), flush=True)
  return result


def _steps(args: argparse.Namespace, field: str) -> dict:
  return {field: args.max_steps} if args.max_steps else {}


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--count", type=int, default=1024, help="Images in the job.")
  parser.add_argument("--photos", help="Folder or glob of photos to copy (default: one sample).")
  parser.add_argument("--model", default="squeezenet1_1", choices=models.MODEL_NAMES)
  parser.add_argument("--weights", help="Weights file; default: random weights.")
  parser.add_argument("--preset", default="fast", choices=PRESETS)
  parser.add_argument("--batching", default="auto")
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--chunk-size", type=int, help="Default: the job's own default.")
  parser.add_argument("--max-steps", type=int, help="Cap both stages' steps (smoke runs).")
  parser.add_argument("--json", help="Also write the result to this JSON file.")
  parser.add_argument("--smoke", action="store_true",
                      help="16 copies, shapes_cnn, 32 px, 'tiny', chunks of 4.")
  args = parser.parse_args(argv)
  if args.smoke:
    args.count, args.model, args.size = 16, "shapes_cnn", 32
    args.preset, args.chunk_size = "tiny", 4
  result = run(args)
  if args.json:
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
  return result


if __name__ == "__main__":
  main()
