"""A batch job's host work overlapped with its computation: reading ahead, writing behind.

While the main thread waits for the device to explain compute batch k, one background thread
reads and decodes batch k + 1 (`read_ahead`) and another writes the results file of batch k - 1
(`WriteBehind`), so the device does not wait on the host as long as reading and writing a batch
take less time than explaining it. Decoding (PIL), compression (zlib) and the wait for the
device all release Python's global lock, so the threads do run alongside.

`Timings` accumulates where a job's time goes: host work on the background threads, and the
main thread's waits for them (non-zero only when the host cannot keep up), next to the time it
spends in the computation itself.

Example:
  >>> timings = Timings()
  >>> with WriteBehind(timings=timings) as writer:
  ...   for batch in read_ahead(read, batches, timings=timings):
  ...     writer.submit(save, compute(batch))
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import threading
import time
from typing import Any, Callable, Iterable, Iterator


@dataclasses.dataclass
class Timings:
  """Seconds a job spent, summed over its compute batches.

  Attributes:
    read: Reading and decoding images, on the reading thread.
    read_wait: The main thread waiting for a batch not yet read (the device idles meanwhile).
    compute: The main thread in the computation: host-to-device transfer, both PFC stages and
      the results' transfer back.
    write: Writing results files, on the writing thread.
    write_wait: The main thread waiting for the writing thread (a write queue full, or the last
      writes at the end of the job).
    batches: Compute batches.
    images: Images in them.
  """

  read: float = 0.0
  read_wait: float = 0.0
  compute: float = 0.0
  write: float = 0.0
  write_wait: float = 0.0
  batches: int = 0
  images: int = 0
  _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False,
                                            compare=False)

  def add(self, name: str, seconds: float) -> None:
    """Adds `seconds` to field `name`; safe from any thread."""
    with self._lock:
      setattr(self, name, getattr(self, name) + seconds)

  def summary(self, wall: float) -> str:
    """One line: images/s over `wall` seconds, and each part's seconds and share of it."""
    parts = ", ".join(f"{name} {getattr(self, name):.2f} s ({getattr(self, name) / wall:.0%})"
                      for name in ("compute", "read", "read_wait", "write", "write_wait"))
    return (f"{self.images} images in {self.batches} batches, {wall:.2f} s wall, "
            f"{self.images / wall:.3g} images/s; {parts} (read and write run on background "
            "threads, beside compute)")


_END = object()


class _Stopwatch:
  """Adds the seconds of a `with` block to `timings.name` (nothing when `timings` is None)."""

  def __init__(self, timings: Timings | None, name: str):
    self.timings, self.name = timings, name

  def __enter__(self):
    self.start = time.perf_counter()

  def __exit__(self, *exc):
    if self.timings is not None:
      self.timings.add(self.name, time.perf_counter() - self.start)


def read_ahead(read: Callable[[Any], Any], items: Iterable[Any], depth: int = 1,
               timings: Timings | None = None) -> Iterator[Any]:
  """Yields `read(item)` for each item in order, reading up to `depth` items ahead on a
  background thread.

  An exception raised by `read` is raised here, at its item. Closing the generator early
  waits for the reads under way and discards them.

  Args:
    read: Reads one item (e.g. decodes one compute batch's images); runs on the thread.
    items: What to read, in order.
    depth: Items read ahead, at least 1.
    timings: Accumulates `read` (on the thread) and `read_wait` (here).

  Raises:
    ValueError: for `depth` < 1.
  """
  if depth < 1:
    raise ValueError(f"`depth` must be at least 1, got {depth}.")

  def timed_read(item):
    with _Stopwatch(timings, "read"):
      return read(item)

  items = iter(items)
  with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pfc-jax-read") as pool:
    pending = collections.deque()

    def refill():  # Keeps `depth` reads under way while the caller computes.
      while len(pending) < depth:
        item = next(items, _END)
        if item is _END:
          return
        pending.append(pool.submit(timed_read, item))

    try:
      refill()
      while pending:
        with _Stopwatch(timings, "read_wait"):
          result = pending.popleft().result()
        refill()
        yield result
    finally:
      for future in pending:
        future.cancel()


class WriteBehind:
  """Runs submitted writes one at a time, in order, on a background thread.

  At most `depth` writes wait or run at once; `submit` blocks while there are more. An
  exception raised by a write is raised by the next `submit` or by `close`; writes submitted
  after it are not run. Use as a context manager: leaving the block waits for every write (and
  raises a write's error), except when the block itself raised, whose error then wins.

  Args:
    depth: Writes queued at most, at least 1.
    timings: Accumulates `write` (on the thread) and `write_wait` (in `submit` and `close`).

  Raises:
    ValueError: for `depth` < 1.
  """

  def __init__(self, depth: int = 1, timings: Timings | None = None):
    if depth < 1:
      raise ValueError(f"`depth` must be at least 1, got {depth}.")
    self.depth, self.timings = depth, timings
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pfc-jax-write")
    self._pending: collections.deque[concurrent.futures.Future] = collections.deque()
    self._error: BaseException | None = None

  def _collect(self, keep: int) -> None:
    """Waits until at most `keep` writes are pending; raises the first write error."""
    with _Stopwatch(self.timings, "write_wait"):
      while len(self._pending) > keep:
        error = self._pending.popleft().exception()
        if error is not None and self._error is None:
          self._error = error
    if self._error is not None:
      raise self._error

  def submit(self, write: Callable[..., Any], *args: Any) -> None:
    """Queues `write(*args)`."""
    self._collect(self.depth - 1)

    def timed_write():
      if self._error is None:
        with _Stopwatch(self.timings, "write"):
          write(*args)

    self._pending.append(self._pool.submit(timed_write))

  def close(self) -> None:
    """Waits for every queued write, then stops the thread; raises a write's error."""
    try:
      self._collect(0)
    finally:
      self._pool.shutdown(wait=True)

  def __enter__(self) -> WriteBehind:
    return self

  def __exit__(self, exc_type, exc, traceback) -> None:
    if exc_type is None:
      self.close()
      return
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass  # The block's own error is the one to report.
