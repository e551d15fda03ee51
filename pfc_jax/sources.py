"""Indexed image sources for batch jobs: a folder or glob of image files, or a tfds split.

A source has a fixed length and reads item `i` on demand: `read(i) -> (id, image01)`. The index
is stable (sorted paths, the split's record order), so results keyed by index or id do not
depend on how a job is split across chunks, devices or hosts; each host reads only its own
indices. Images are resized and centre-cropped as `pfc_jax.data.load_image` does.

`identity()` says what the items are, cheaply, so that a resumed batch job can tell whether its
inputs changed since it started (`identity_changes` compares two); `item_id(i)` is item i's id
alone, for spot checks against saved results (a tfds source reads the record for it).

tfds splits are read with `tfds.data_source` (ArrayRecord random access, no TensorFlow needed),
or, for data prepared as TFRecord (most existing tfds ImageNet builds), with `tf.data` when
TensorFlow is installed. Index i is the same record either way: tfds stores both formats in the
order of its key hash. To read a TFRecord build without TensorFlow, convert it to ArrayRecord
once, in place, on a machine with `pip install tensorflow-cpu apache-beam mlcroissant` (what
tfds's converter and command line import):
`tfds convert_format --dataset_version_dir=DATA_DIR/NAME/VERSION --out_file_format=array_record`.
"""

from __future__ import annotations

import collections
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pfc_jax import data


class BadItemError(ValueError):
  """An item that cannot be read or decoded; `item_id` names it, the message says why."""

  def __init__(self, item_id: str, reason: str):
    super().__init__(f"{item_id}: {reason}")
    self.item_id = item_id
    self.reason = reason


def _unique_ids(paths: list[Path]) -> list[str]:
  """File stems; stems that occur twice become paths relative to the common folder without
  suffix, and those that still occur twice (`a.png` and `a.jpg` in one folder) keep the suffix."""
  root = Path(os.path.commonpath([str(p.parent) for p in paths]))
  ids = [p.stem for p in paths]
  names = [lambda p: p.relative_to(root).with_suffix("").as_posix(),
           lambda p: p.relative_to(root).as_posix()]  # The last is unique: repeated until it is.
  while len(set(ids)) < len(ids):
    name = names.pop(0) if len(names) > 1 else names[0]
    counts = collections.Counter(ids)
    ids = [i if counts[i] == 1 else name(p) for i, p in zip(ids, paths)]
  return ids


class ImageFolderSource:
  """Image files from a folder or a glob pattern, in sorted path order (`data.list_images`).

  Args:
    dir_or_glob: A folder (its image files, not recursive), or a glob such as `"photos/*/*.jpg"`.
    size: Output side in pixels (resize the short side, centre crop, as `data.load_image`).

  Ids are file stems; files whose stems collide are named by their path relative to the common
  folder, without suffix where that tells them apart, else with it (`y.JPEG` and `y.png`).
  """

  def __init__(self, dir_or_glob: str | os.PathLike, size: int = 224):
    self.spec = str(dir_or_glob)
    self.size = int(size)
    self.paths = sorted(Path(p) for p in data.list_images(dir_or_glob))
    self.ids = _unique_ids(self.paths)
    self.root = Path(os.path.commonpath([str(p.parent) for p in self.paths]))

  def __len__(self) -> int:
    return len(self.paths)

  def describe(self) -> dict[str, Any]:
    """The settings that determine which images this source yields, for a job manifest."""
    return {"kind": "images", "images": self.spec, "count": len(self), "size": self.size}

  def identity(self) -> dict[str, str]:
    """`{name: "SIZE bytes, mtime_ns MTIME"}` per file, names relative to the files' common
    folder.

    File metadata rather than a content hash: one `stat` per file, so checking a folder of 50,000
    photos on resume costs a fraction of a second instead of reading every byte. Replacing,
    rewriting, renaming, adding or removing a file changes it; a rewrite that keeps both the
    size and the modification time to the nanosecond (`touch -r`, or a same-size file copied
    with its times) does not, and copying the folder elsewhere changes every mtime.
    """
    identity = {}
    for path in self.paths:
      stat = path.stat()
      identity[path.relative_to(self.root).as_posix()] = (
          f"{stat.st_size} bytes, mtime_ns {stat.st_mtime_ns}")
    return identity

  def item_id(self, index: int) -> str:
    """Item `index`'s id (its file stem, see the class docstring)."""
    return self.ids[index]

  def read(self, index: int) -> tuple[str, np.ndarray]:
    """Returns `(id, image01)`, `image01` `[size, size, 3] float32` in [0, 1].

    Raises:
      BadItemError: the file cannot be opened or decoded.
    """
    try:
      return self.ids[index], np.asarray(data.load_image(self.paths[index], self.size), np.float32)
    except Exception as e:  # pylint: disable=broad-except  # any failure of one file is that item's
      raise BadItemError(self.ids[index], f"{type(e).__name__}: {e}") from e


class TfdsSource:
  """One split of a tfds image-classification data set, read record by record.

  Args:
    name: tfds name, e.g. `"imagenet2012"` or `"imagenette/320px-v2"`.
    split: Split with optional slicing, e.g. `"validation[:10%]"`.
    data_dir: tfds data folder; default tfds's (`~/tensorflow_datasets` or `$TFDS_DATA_DIR`).
    size: Output side in pixels, as `data.load_image`.
    image_key: The image feature's name.
    download: Let tfds download and prepare the data if it is missing.

  Ids are the example's `file_name` stem when the data set has one (ImageNet does), otherwise
  `"{split}:{index}"`.

  Raises:
    ValueError: the data set is unknown, not prepared, or has no `image_key` feature.
  """

  def __init__(self, name: str, split: str, data_dir: str | os.PathLike | None = None, size: int = 224,
               image_key: str = "image", download: bool = False):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  # optional dependency
    self.name, self.split, self.size, self.image_key = name, split, int(size), image_key
    self.data_dir = None if data_dir is None else str(data_dir)
    try:
      self._records = tfds.data_source(name, split=split, data_dir=self.data_dir, download=download)
    except NotImplementedError:  # prepared as TFRecord: no random access without TensorFlow
      self._records = _TfDataRecords(name, split, self.data_dir)
    except Exception as e:  # pylint: disable=broad-except  # tfds raises many types for missing data
      raise ValueError(f"Cannot open tfds data set `{name}` split `{split}` "
                       f"(data_dir={self.data_dir}): {type(e).__name__}: {e}") from e

  def __len__(self) -> int:
    return len(self._records)

  def describe(self) -> dict[str, Any]:
    """The settings that determine which images this source yields, for a job manifest."""
    return {"kind": "tfds", "tfds": self.name, "split": self.split, "data_dir": self.data_dir,
            "count": len(self), "size": self.size}

  def identity(self) -> dict[str, Any]:
    """The prepared data's version and, where tfds recorded them, the split's bytes and shard
    lengths, from its `dataset_info` (no record is read).

    A tfds version is fixed data in a fixed order (its records are stored in the order of a
    hash of their keys), so the version identifies every record; preparing it again from other
    source files changes the split's size. A batch job also checks the ids of a few saved items
    against the records (`item_id`). The file format (TFRecord or ArrayRecord) is not part of
    it: index i is the same record in both.
    """
    info = getattr(self._records, "dataset_info", None) or self._records.info
    identity: dict[str, Any] = {"version": str(info.version)}
    try:
      split = info.splits[self.split.split("[")[0]]
      identity.update(split_bytes=int(split.num_bytes),
                      shard_lengths=[int(n) for n in split.shard_lengths])
    except (KeyError, TypeError, AttributeError):  # Not recorded (mock or hand-made builds).
      pass
    return identity

  def _item_id(self, index: int, record: Any) -> str:
    if record is not None and "file_name" in record:
      return Path(_text(record["file_name"])).stem
    return f"{self.split}:{index}"

  def item_id(self, index: int) -> str:
    """Record `index`'s id (see the class docstring); `"{split}:{index}"` if it cannot be read."""
    try:
      record = self._records[index]
    except Exception:  # pylint: disable=broad-except  # as `read`, which reports it
      record = None
    return self._item_id(index, record)

  def read(self, index: int) -> tuple[str, np.ndarray]:
    """Returns `(id, image01)`, `image01` `[size, size, 3] float32` in [0, 1].

    Raises:
      BadItemError: the record cannot be read or decoded, or has no image.
    """
    item_id = self._item_id(index, None)
    try:
      record = self._records[index]
      item_id = self._item_id(index, record)
      pixels = np.asarray(record[self.image_key])
      image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).convert("RGB")
      return item_id, np.asarray(data.preprocess(image, self.size), np.float32)
    except Exception as e:  # pylint: disable=broad-except  # any failure of one record is that item's
      raise BadItemError(item_id, f"{type(e).__name__}: {e}") from e


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def identity_changes(stored: dict[str, Any], current: dict[str, Any], limit: int = 10) -> list[str]:
  """What differs between two `identity()`s: `"changed NAME (A there, B now)"`, `"removed
  NAME"`, `"added NAME"`, in name order, at most `limit` of each kind (then how many more)."""
  kinds = {
      "changed": [f"{name} ({stored[name]!r} there, {current[name]!r} now)"
                  for name in sorted(set(stored) & set(current)) if stored[name] != current[name]],
      "removed": sorted(set(stored) - set(current)),
      "added": sorted(set(current) - set(stored)),
  }
  changes = []
  for kind, names in kinds.items():
    changes += [f"{kind} {name}" for name in names[:limit]]
    if len(names) > limit:
      changes.append(f"{len(names) - limit} more {kind}")
  return changes


class _TfDataRecords:
  """Sequential `tf.data` reading of a TFRecord-prepared split behind an index interface.

  Reading index `i` right after `i - 1` costs one record; any other index restarts the pipeline
  with `skip(i)`. Batch jobs read in order, so this is linear overall.
  """

  def __init__(self, name: str, split: str, data_dir: str | None):
    try:
      import tensorflow  # pylint: disable=g-import-not-at-top,unused-import  # optional dependency
    except ImportError as e:
      raise ValueError(
          f"tfds data set `{name}` is prepared as TFRecord, which needs TensorFlow to read: install "
          "tensorflow-cpu, or convert the build to ArrayRecord once, with tensorflow-cpu, "
          "apache-beam and mlcroissant installed: `tfds convert_format --dataset_version_dir="
          f"DATA_DIR/{name}/VERSION --out_file_format=array_record`.") from e
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self._builder = tfds.builder(name, data_dir=data_dir)
    self.info = self._builder.info
    self._split = split
    self._length = self._builder.info.splits[split].num_examples
    self._iterator, self._next_index = None, None

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> dict[str, Any]:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    if index != self._next_index:
      dataset = self._builder.as_dataset(split=self._split, shuffle_files=False).skip(index)
      self._iterator = iter(tfds.as_numpy(dataset))
    record = next(self._iterator)
    self._next_index = index + 1
    return record


def from_args(images: str | None, tfds_name: str | None, split: str | None, data_dir: str | None,
              size: int):
  """The source a command line names: `--images DIR|GLOB`, or `--tfds NAME --split S`."""
  if (images is None) == (tfds_name is None):
    raise ValueError("Give exactly one input: `--images DIR|GLOB` or `--tfds NAME --split SPLIT`.")
  if images is not None:
    try:
      return ImageFolderSource(images, size)
    except ValueError as e:
      raise ValueError(str(e).replace("`dir_or_glob`", "`--images`", 1)) from e
  if not split:
    raise ValueError("`--split` is required with `--tfds` (e.g. `validation[:10%]`).")
  return TfdsSource(tfds_name, split, data_dir, size)
