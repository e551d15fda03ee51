"""`pfc-jax demo`: explain generated benchmark images with the packaged classifier, offline.

Needs nothing but the installed package: the images come from the synthetic shapes benchmark
(`pfc_jax.benchmarks.shapes`), the classifier is `shapes_cnn` (or, with `--model`,
`shapes_vit`) with the weights shipped in `pfc_jax/assets`. Writes one panel (image |
coalitions | saliency), one `.npz` per image and `summary.json`, which also scores each map
against the known object mask.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import jax
import numpy as np

from pfc_jax import io, metrics, models, weights
from pfc_jax.benchmarks import shapes
from pfc_jax.commands import explain as explain_command
from pfc_jax.explain import PRESETS, ExplainConfig, explain

MODEL = "shapes_cnn"  # The default of --model, one of `weights.PACKAGED`.
DEMO_PRESET = "fast"


def demo_config(preset: str = DEMO_PRESET) -> ExplainConfig:
  """The explanation settings of the demo: `ExplainConfig.preset(preset)` ("fast" by default,
  whose coalitions shape the map), always with a randomly initialised coalition network: the
  demo runs offline, without VGG16 weights, so `init="vgg16"` is replaced by the authors'
  `"random"`.

  Raises:
    ValueError: for an unknown preset name.
  """
  config = ExplainConfig.preset(preset)
  return dataclasses.replace(
      config, coalitions=dataclasses.replace(config.coalitions, init="random"))


def add_parser(subparsers) -> None:
  parser = subparsers.add_parser(
      "demo", help="Explain generated shapes-benchmark images offline (no downloads).",
      description=(
          "Generates images of the synthetic shapes benchmark, classifies them with a packaged "
          "classifier (--model), explains them with PFC and writes a panel (image | coalitions "
          "| saliency) and an .npz per image, and summary.json, under --out."))
  parser.add_argument("--out", required=True, help="Output folder.")
  parser.add_argument("--model", default=MODEL, choices=tuple(weights.PACKAGED),
                      help=f"Packaged classifier, a CNN or a Vision Transformer; default {MODEL}.")
  parser.add_argument("--num-images", type=int, default=4, help="Images to generate; default 4.")
  parser.add_argument("--preset", default=DEMO_PRESET, choices=PRESETS,
                      help=f"Explanation settings (see `demo_config`); default {DEMO_PRESET}.")
  parser.add_argument("--seed", type=int, default=0,
                      help="Benchmark seed and PRNG seed of the explanation; default 0.")
  parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
  try:
    if args.num_images < 1:
      raise ValueError(f"`--num-images` must be at least 1, got {args.num_images}.")
    if args.seed < 0:
      raise ValueError(f"`--seed` must be at least 0 (it seeds the benchmark), got {args.seed}.")
    config = demo_config(args.preset)
    bench = shapes.generate(args.num_images, size=models.input_size(args.model), seed=args.seed)
  except ValueError as e:
    print(f"pfc-jax demo: error: {e}", file=sys.stderr)
    return 2
  out = Path(args.out)
  classifier = models.classifier(args.model, weights.load(args.model))
  class_names = models.class_names(args.model)

  print(f"Explaining {args.num_images} generated images with {MODEL} and preset {args.preset} "
        "(the first call compiles)...", flush=True)
  start = time.perf_counter()
  result = jax.device_get(explain(classifier, bench.images, jax.random.key(args.seed), config))
  seconds = time.perf_counter() - start
  saliency = result.saliency
  hits = np.asarray(metrics.pointing_game(saliency, bench.masks))
  mass = np.asarray(metrics.relevance_mass(saliency, bench.masks))

  records = []
  for i, image in enumerate(bench.images):
    stem = f"shape-{i:04d}"
    label = class_names[bench.labels[i]]
    records.append({
        "label": label,
        **explain_command.write_explanation(out, stem, image, result, i, class_names,
                                            f"true {label}, ", image=image,
                                            mask=bench.masks[i]),
        "pointing_hit": bool(hits[i]), "relevance_mass": float(mass[i])})
  io.write_json(out / "summary.json", {
      "settings": {"model": args.model, "preset": args.preset, "seed": args.seed,
                   "image_size": int(bench.images.shape[1]), "config": dataclasses.asdict(config)},
      "seconds": round(seconds, 3), "images": records})
  print(f"{out}: {len(records)} generated images explained in {seconds:.1f} s "
        "(panels *.png, arrays *.npz, summary.json).")
  return 0
