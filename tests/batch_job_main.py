"""Runs `pfc-jax batch` with a slowed-down job, for the interruption tests.

`python tests/batch_job_main.py [--stall SECONDS] [--slow-write SECONDS] BATCH_ARGS...`:

- `--stall`: every compute batch after the first starts with a computation that holds the main
  thread inside XLA for SECONDS (a host callback that sleeps), as a long compute batch does;
  Python's own signal handlers cannot run meanwhile.
- `--slow-write`: results files are written in two halves, SECONDS apart, so that a kill can land
  in the middle of a write.
"""

import argparse
import sys
import time

import jax
import numpy as np

from pfc_jax import cli, io, parallel


def run_batch_command(argv: list[str]) -> int:
  """`pfc-jax batch ARGV...` as the command line runs it (errors reported, exit code returned)."""
  return cli.main(["batch", *argv])


def _stall(seconds: float) -> None:
  def sleep(x):
    time.sleep(seconds)
    return x

  blocking = jax.jit(lambda x: jax.pure_callback(sleep, jax.ShapeDtypeStruct((), np.float32), x))
  jax.block_until_ready(blocking(np.float32(0)))


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument("--stall", type=float, default=0.0)
  parser.add_argument("--slow-write", type=float, default=0.0)
  options, batch_argv = parser.parse_known_args(argv)
  explain, write_bytes = parallel.sharded_explain, io.write_bytes
  batches = []

  def stalled_explain(*args, **kwargs):
    if batches:
      _stall(options.stall)
    batches.append(None)
    return explain(*args, **kwargs)

  def slow_write_bytes(path, data):
    if not str(path).endswith(".npz"):
      return write_bytes(path, data)
    with io.atomic_path(path) as tmp, open(tmp, "wb") as f:
      f.write(data[:len(data) // 2])
      f.flush()
      time.sleep(options.slow_write)
      f.write(data[len(data) // 2:])

  if options.stall:
    parallel.sharded_explain = stalled_explain
  if options.slow_write:
    io.write_bytes = slow_write_bytes
  return run_batch_command(batch_argv)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
