"""Reading ahead and writing behind (`pfc_jax.prefetch`), and the batch job's use of them."""

import threading

import numpy as np
import pytest
from PIL import Image

from pfc_jax import batch, models, prefetch, sources, weights
from pfc_jax.explain import ExplainConfig

_WAIT = 30.0  # Seconds an event may take on a loaded machine before the test fails.


def test_read_ahead_reads_the_next_item_while_the_caller_works():
  read_started = {i: threading.Event() for i in range(4)}

  def read(item):
    read_started[item].set()
    return item * 10

  timings = prefetch.Timings()
  results = []
  for result in prefetch.read_ahead(read, range(4), timings=timings):
    if result // 10 < 3:  # The caller is busy with this item: the next one is read meanwhile.
      assert read_started[result // 10 + 1].wait(_WAIT)
    results.append(result)
  assert results == [0, 10, 20, 30]
  assert timings.read >= 0 and timings.read_wait >= 0


def test_read_ahead_raises_at_the_failing_item():
  def read(item):
    if item == 2:
      raise OSError("unreadable")
    return item

  seen = []
  with pytest.raises(OSError, match="unreadable"):
    for item in prefetch.read_ahead(read, range(5), depth=2):
      seen.append(item)
  assert seen == [0, 1]
  with pytest.raises(ValueError, match="depth"):
    list(prefetch.read_ahead(read, range(2), depth=0))


def test_write_behind_returns_before_the_write_and_keeps_the_order():
  release, written = threading.Event(), []

  def write(value):
    assert release.wait(_WAIT)
    written.append(value)

  timings = prefetch.Timings()
  with prefetch.WriteBehind(depth=2, timings=timings) as writer:
    writer.submit(write, 1)  # Returns although the write waits for `release`.
    writer.submit(write, 2)
    release.set()
    writer.submit(write, 3)
  assert written == [1, 2, 3]  # Leaving the block waited for every write.
  assert timings.write > 0


def test_write_behind_raises_a_write_error_and_runs_no_later_write():
  written = []

  def write(value):
    if value == 1:
      raise OSError("disk full")
    written.append(value)

  writer = prefetch.WriteBehind()
  writer.submit(write, 1)
  with pytest.raises(OSError, match="disk full"):
    writer.submit(write, 2)
  with pytest.raises(OSError, match="disk full"):
    writer.close()
  assert written == []


def test_batch_job_records_where_the_time_goes(tmp_path):
  rng = np.random.default_rng(0)
  (tmp_path / "in").mkdir()
  for i in range(5):
    Image.fromarray(rng.integers(0, 256, (20, 18, 3), dtype=np.uint8)).save(
        tmp_path / "in" / f"img{i}.png")
  timings = prefetch.Timings()
  summary = batch.run_job(
      sources.ImageFolderSource(tmp_path / "in", 16),
      models.classifier("shapes_cnn", weights.load("shapes_cnn")), tmp_path / "out",
      config=ExplainConfig.preset("tiny"), chunk_size=2, progress=False, timings=timings)
  assert summary.explained == 5
  assert (timings.batches, timings.images) == (3, 5)
  assert timings.compute > 0 and timings.read > 0 and timings.write > 0
  assert len(list((tmp_path / "out").glob("results-*.npz"))) == 3
  assert "5 images in 3 batches" in timings.summary(1.0)
