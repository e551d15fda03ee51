"""Runs `pfc-jax batch` with a slowed-down image reader, for the interruption test.

`python tests/batch_job_main.py SECONDS_PER_IMAGE BATCH_ARGS...`: every image read takes at least
SECONDS_PER_IMAGE, so that a job can be killed between two chunks.
"""

import argparse
import sys
import time

from pfc_jax import sources
from pfc_jax.commands import batch as batch_command


def run_batch_command(argv: list[str]) -> int:
  """`pfc-jax batch ARGV...` through the command's own parser (independent of other commands)."""
  parser = argparse.ArgumentParser(prog="pfc-jax")
  batch_command.add_parser(parser.add_subparsers(dest="command", required=True))
  args = parser.parse_args(["batch", *argv])
  return args.func(args)


def main(delay: float, argv: list[str]) -> int:
  read = sources.ImageFolderSource.read

  def slow_read(self, index):
    time.sleep(delay)
    return read(self, index)

  sources.ImageFolderSource.read = slow_read
  return run_batch_command(argv)


if __name__ == "__main__":
  sys.exit(main(float(sys.argv[1]), sys.argv[2:]))
