"""`pfc-jax convert-weights SRC DST --model NAME`: convert pretrained weights to pfc-jax's layout.

Reads any layout `pfc_jax.weights.load` reads (torchvision .pth or .safetensors, timm
.safetensors, Keras .h5, pfc-jax .safetensors or orbax directory) and writes what
`pfc_jax.weights.save` writes: a `.safetensors` file when DST ends so, else an orbax directory.
"""

from __future__ import annotations

import argparse
import sys

import jax
import numpy as np

from pfc_jax import models, weights


def add_parser(subparsers) -> None:
  parser = subparsers.add_parser(
      "convert-weights", help="convert pretrained weights to pfc-jax's layout",
      description=__doc__.split("\n")[0])
  parser.add_argument("src", help="weights file or orbax directory to read")
  parser.add_argument("dst", help="output: a .safetensors file, or else an orbax directory")
  parser.add_argument("--model", default="vgg16", choices=models.MODEL_NAMES,
                      help="model the weights belong to (default: vgg16)")
  parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
  try:
    variables = weights.load(args.model, args.src)
    weights.save(variables, args.dst)
  except (ValueError, ImportError, FileNotFoundError) as e:
    print(f"pfc-jax convert-weights: error: {e}", file=sys.stderr)
    return 1
  count = sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(variables["params"]))
  print(f"Wrote {args.model} weights ({count:,} parameters) to {args.dst}")
  return 0
