"""`pfc-jax explain`: PFC saliency panels and arrays for a few image files.

For each image, written atomically under --out: `<stem>.png` (image | coalitions | saliency over
the image, titled with the class name and probability) and `<stem>.npz` (saliency, w, labels,
target, probs); and `summary.json` with each image's class, probability and seconds and the
settings used (the first image's seconds include compilation). Unreadable images are listed
and skipped; the exit code is then 1. Warnings about an image (transparency, a tiny image
upsampled) are printed and kept in its `summary.json` record.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np
import tqdm

from pfc_jax import data, io, models, parallel, viz, weights
from pfc_jax.classifier import Classifier
from pfc_jax.commands._common import load_weights
from pfc_jax.explain import PRESETS, ExplainConfig, explain


def add_parser(subparsers) -> None:
  parser = subparsers.add_parser(
      "explain", help="Explain a few images: PNG panels, .npz arrays and summary.json.",
      description=(
          "Explains the predicted class of each IMAGE with PFC. Writes OUT/<stem>.png, "
          "OUT/<stem>.npz and OUT/summary.json; unreadable images are skipped and reported, and "
          "the exit code is then 1."))
  parser.add_argument("images", nargs="+", metavar="IMAGE",
                      help="Image files (any format PIL reads).")
  parser.add_argument("--model", required=True, choices=models.MODEL_NAMES,
                      help="Classifier to explain.")
  parser.add_argument("--weights", metavar="FILE",
                      help="Weights file (.safetensors, .pth, .h5) or orbax directory; default: "
                           "the packaged weights of shapes_cnn and shapes_vit, or the cached "
                           "download of the others.")
  parser.add_argument("--preset", default="fast", choices=PRESETS, help="ExplainConfig preset.")
  parser.add_argument("--seed", type=int, default=0,
                      help="Image i (in command-line order) gets fold_in(PRNGKey(seed), i).")
  parser.add_argument("--image-size", type=int,
                      help="Side of the square input in pixels, at least 8; default: the "
                           "model's own.")
  parser.add_argument("--out", required=True, help="Output folder.")
  parser.add_argument("--no-progress", action="store_true", help="No progress bar.")
  parser.set_defaults(func=run)


def load_model(name: str, source: str | None, config: ExplainConfig) -> tuple[Classifier, Any]:
  """The classifier to explain and, if the coalition network copies VGG16, VGG16's variables.

  Raises:
    ValueError: naming `--weights`, the file and what is wrong, when weights cannot be loaded.
  """
  variables = load_weights(name, source)
  vgg_params = None
  if config.coalitions.init == "vgg16":
    vgg_params = variables if name == "vgg16" else weights.load("vgg16")
  return models.classifier(name, variables), vgg_params


def _output_stems(paths: list[str]) -> list[str]:
  """File stems, made unique with a `-<n>` suffix where two inputs share one."""
  stems, seen = [], set()
  for path in paths:
    stem, n = Path(path).stem, 1
    while stem in seen:
      n += 1
      stem = f"{Path(path).stem}-{n}"
    seen.add(stem)
    stems.append(stem)
  return stems


def write_explanation(out: Path, stem: str, image01: np.ndarray, result, index: int,
                      class_names: list[str], title_prefix: str = "", **extra_arrays) -> dict:
  """Writes image `index` of `result` (an `Explanation`) as `<stem>.png` and `<stem>.npz`.

  `image01` `[H, W, 3]` in [0, 1] is the explained image; `extra_arrays` go into the `.npz` too.

  Returns:
    The image's `summary.json` record: files, class, probability, number of coalitions.
  """
  target, prob = int(result.target[index]), float(result.probs[index])
  class_name = class_names[target] if target < len(class_names) else str(target)
  viz.save_png(out / f"{stem}.png", viz.panel(
      image01, result.labels[index], result.saliency[index],
      f"{title_prefix}predicted {class_name} (p = {prob:.2f})"))
  io.write_npz(out / f"{stem}.npz", saliency=result.saliency[index], w=result.w[index],
               labels=result.labels[index], target=np.int32(target), probs=np.float32(prob),
               **extra_arrays)
  return {"png": f"{stem}.png", "npz": f"{stem}.npz", "class_index": target,
          "class_name": class_name, "probability": prob,
          "num_coalitions": int(result.num_coalitions[index])}


def _load_image(path: str, size: int) -> tuple[np.ndarray, list[str]]:
  """The image and the texts of the warnings that loading it raised."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    image = data.load_image(path, size)
  return image, [str(warning.message) for warning in caught]


def run(args: argparse.Namespace) -> int:
  if args.image_size is not None and args.image_size < 8:
    raise ValueError(f"`--image-size` must be at least 8 pixels, got {args.image_size}.")
  config = ExplainConfig.preset(args.preset)
  classifier, vgg_params = load_model(args.model, args.weights, config)
  class_names = models.class_names(args.model)
  size = args.image_size or models.input_size(args.model)
  out = Path(args.out)
  summary = {
      "settings": {"model": args.model, "weights": args.weights, "preset": args.preset,
                   "seed": args.seed, "image_size": size, "config": dataclasses.asdict(config)},
      "images": [], "failed": []}
  stems = _output_stems(args.images)
  for index, (path, stem) in enumerate(
      zip(tqdm.tqdm(args.images, desc="explain", unit="img", disable=args.no_progress), stems)):
    try:
      image, notes = _load_image(path, size)
    except IsADirectoryError as e:
      summary["failed"].append({"image": path, "error": f"{e} For a folder, use `pfc-jax batch "
                                                        "--images DIR`."})
      continue
    except (OSError, ValueError) as e:
      summary["failed"].append({"image": path, "error": str(e)})
      continue
    for note in notes:  # Through the bar, which clears its line, writes this, then redraws.
      tqdm.tqdm.write(f"pfc-jax explain: warning: {note}", file=sys.stderr)
    start = time.perf_counter()
    result = jax.device_get(explain(
        classifier, image[None], parallel.image_keys(args.seed, [index]), config, vgg_params))
    seconds = time.perf_counter() - start
    summary["images"].append({
        "image": path, **write_explanation(out, stem, image, result, 0, class_names),
        "seconds": round(seconds, 3), "warnings": notes})
    io.write_json(out / "summary.json", summary)
  io.write_json(out / "summary.json", summary)
  print(f"{out}: {len(summary['images'])} explained, {len(summary['failed'])} failed.")
  for failure in summary["failed"]:
    print(f"pfc-jax explain: skipped {failure['image']}: {failure['error']}", file=sys.stderr)
  return 1 if summary["failed"] else 0
