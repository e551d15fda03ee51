"""Counting XLA compilations, to assert that a call compiles nothing new."""

import contextlib
from typing import Iterator

import jax
from jax._src import dispatch


@contextlib.contextmanager
def count_compilations() -> Iterator[list[str]]:
  """Within the block, appends one entry per backend compilation to the yielded list.

  A persistent-cache hit compiles nothing and is not counted; the suite runs without one.
  """
  compiled: list[str] = []

  def listener(event: str, duration: float, **kwargs) -> None:  # pylint: disable=unused-argument
    if event == dispatch.BACKEND_COMPILE_EVENT:
      compiled.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield compiled
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
