"""The `pfc-jax` command line: parses arguments and hands over to `pfc_jax.commands`.

Errors a user can cause (bad arguments, missing or unreadable files, missing optional
packages) end the command with one line on stderr, `pfc-jax COMMAND: error: ...`, and exit code
2, as argparse's own usage errors do; a command whose inputs partly failed exits 1; Ctrl-C
exits 130.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import sys

from pfc_jax import compilation_cache

# Each command is one module in pfc_jax.commands exposing `add_parser(subparsers)`, which
# registers the sub-command and sets `func(args) -> int` as its default.
COMMANDS = ("convert_weights", "explain", "demo", "evaluate", "batch")
USAGE_ERROR = 2
INTERRUPTED = 130  # 128 + SIGINT, the shell's convention.


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
  """Appends `(default: X)` to each optional flag's help, unless the help states its default."""

  def _get_help_string(self, action: argparse.Action) -> str | None:
    if action.required or "default" in (action.help or "").lower():
      return action.help
    return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="pfc-jax", description="Perturbation on Feature Coalition saliency maps in JAX.")
  subparsers = parser.add_subparsers(
      dest="command", required=True,
      parser_class=functools.partial(argparse.ArgumentParser, formatter_class=HelpFormatter))
  for name in COMMANDS:
    importlib.import_module(f"pfc_jax.commands.{name}").add_parser(subparsers)
  return parser


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  prog = f"pfc-jax {args.command}"
  try:
    compilation_cache.enable()  # In $PFC_JAX_CACHE, when set.
    return args.func(args)
  except (ValueError, OSError, ImportError) as e:
    message = " ".join(str(e).split())  # One line, whatever the exception's text holds.
    print(f"{prog}: error: {message}", file=sys.stderr)
    return USAGE_ERROR
  except KeyboardInterrupt:
    print(f"{prog}: interrupted.", file=sys.stderr)
    return INTERRUPTED


if __name__ == "__main__":
  sys.exit(main())
