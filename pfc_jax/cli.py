"""The `pfc-jax` command line: parses arguments and hands over to `pfc_jax.commands`."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each command is one module in pfc_jax.commands exposing `add_parser(subparsers)`, which
# registers the sub-command and sets `func(args) -> int` as its default.
COMMANDS = ("convert_weights", "explain", "demo", "evaluate", "batch")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="pfc-jax", description="Perturbation on Feature Coalition saliency maps in JAX.")
  subparsers = parser.add_subparsers(dest="command", required=True)
  for name in COMMANDS:
    importlib.import_module(f"pfc_jax.commands.{name}").add_parser(subparsers)
  return parser


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  return args.func(args)


if __name__ == "__main__":
  sys.exit(main())
