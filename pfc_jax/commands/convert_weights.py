"""`pfc-jax convert-weights SRC [DST] --model NAME`: convert pretrained weights to pfc-jax's layout.

Reads any layout `pfc_jax.weights.load` reads (torchvision .pth or .safetensors, timm
.safetensors, Keras .h5, pfc-jax .safetensors or orbax directory) and writes what
`pfc_jax.weights.save` writes: a `.safetensors` file when DST ends so, else an orbax directory.
Without DST: `weights/NAME.safetensors` in the pfc-jax checkout that holds the working
directory, or else `NAME.safetensors` in the cache, where `pfc_jax.weights.load(NAME)` finds it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import numpy as np

from pfc_jax import models, weights


def add_parser(subparsers) -> None:
  parser = subparsers.add_parser(
      "convert-weights", help="convert pretrained weights to pfc-jax's layout",
      description=__doc__.split("\n")[0])
  parser.add_argument("src", help="weights file or orbax directory to read")
  parser.add_argument("dst", nargs="?", default=None,
                      help="output: a .safetensors file, or else an orbax directory (default: "
                      "weights/MODEL.safetensors in a pfc-jax checkout, else "
                      "MODEL.safetensors in the weights cache)")
  parser.add_argument("--model", default="vgg16", choices=models.MODEL_NAMES,
                      help="model the weights belong to")
  parser.set_defaults(func=run)


def default_output(model: str, cwd: str | Path = ".") -> Path:
  """Where weights of `model` go without DST.

  `weights/<model>.safetensors` of the nearest folder at or above `cwd` that is a pfc-jax
  checkout (it holds `pyproject.toml`, `pfc_jax/__init__.py` and `weights/`); outside a
  checkout, `<model>.safetensors` in `weights.cache_dir()`, the file `weights.load(model)` reads.
  """
  for folder in (Path(cwd).resolve(), *Path(cwd).resolve().parents):
    if ((folder / "pyproject.toml").is_file() and (folder / "pfc_jax" / "__init__.py").is_file()
        and (folder / "weights").is_dir()):
      return folder / "weights" / f"{model}.safetensors"
  return weights.cache_dir() / f"{model}.safetensors"


def run(args: argparse.Namespace) -> int:
  """Converts SRC to DST; errors (missing or unreadable SRC, no torch for a .pth) propagate to
  `pfc_jax.cli.main`, which reports them in one line with exit code 2."""
  variables = weights.load(args.model, args.src)
  dst = default_output(args.model) if args.dst is None else args.dst
  weights.save(variables, dst)
  count = sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(variables["params"]))
  print(f"Wrote {args.model} weights ({count:,} parameters) to {dst}")
  return 0
