"""Image sources: order, ids, bad items; tfds via `data_source`, or `tf.data` for TFRecord."""

import sys

import numpy as np
import pytest
from PIL import Image

from pfc_jax import data, sources


def _write_image(path, seed, size=(20, 14)):
  pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(path)


def test_folder_source_reads_like_load_image_in_sorted_order(tmp_path):
  for name, seed in (("b.png", 1), ("a.jpg", 2), ("c.png", 3)):
    _write_image(tmp_path / name, seed)
  source = sources.ImageFolderSource(tmp_path, size=16)
  assert len(source) == 3
  assert [source.read(i)[0] for i in range(3)] == ["a", "b", "c"]
  item_id, image = source.read(1)
  assert image.shape == (16, 16, 3) and image.dtype == np.float32
  np.testing.assert_array_equal(image, data.load_image(tmp_path / "b.png", 16))


def test_duplicate_stems_are_named_by_relative_path(tmp_path):
  for folder in ("x", "y"):
    (tmp_path / folder).mkdir()
    _write_image(tmp_path / folder / "cat.png", 0)
  _write_image(tmp_path / "x" / "dog.png", 1)
  source = sources.ImageFolderSource(str(tmp_path / "*" / "*.png"), size=16)
  assert sorted(source.ids) == ["dog", "x/cat", "y/cat"]


def test_ids_are_unique_when_stems_differ_only_in_suffix(tmp_path):
  for name in ("y.JPEG", "y.png", "y.png.jpg", "z.png"):
    _write_image(tmp_path / name, 0)
  source = sources.ImageFolderSource(tmp_path, size=16)
  assert source.ids == ["y.JPEG", "y.png", "y.png.jpg", "z"]
  assert [source.read(i)[0] for i in range(4)] == source.ids


def test_corrupt_file_raises_bad_item_error_naming_it(tmp_path):
  _write_image(tmp_path / "good.png", 0)
  (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
  source = sources.ImageFolderSource(tmp_path, size=16)
  with pytest.raises(sources.BadItemError) as error:
    source.read(source.ids.index("broken"))
  assert error.value.item_id == "broken" and error.value.reason
  assert source.read(source.ids.index("good"))[1].shape == (16, 16, 3)


def test_empty_folder_is_refused(tmp_path):
  with pytest.raises(ValueError, match="dir_or_glob"):
    sources.ImageFolderSource(tmp_path, size=16)


def test_tfds_source_reads_mock_data_offline(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=3, data_dir=str(tmp_path)):
    source = sources.TfdsSource("mnist", "test", data_dir=tmp_path, size=16)
    records = tfds.data_source("mnist", split="test", data_dir=str(tmp_path), download=False)
    assert len(source) == len(records) == 3
    item_id, image = source.read(2)
    expected = data.preprocess(Image.fromarray(records[2]["image"][..., 0]).convert("RGB"), 16)
  assert item_id == "test:2"
  assert image.shape == (16, 16, 3)
  np.testing.assert_allclose(image, expected)
  assert source.describe()["tfds"] == "mnist"


def test_tfds_source_uses_file_name_as_id(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=2, data_dir=str(tmp_path)):
    source = sources.TfdsSource("imagenet2012", "validation", data_dir=tmp_path, size=16)
    records = tfds.data_source("imagenet2012", split="validation", data_dir=str(tmp_path))
    assert source.read(1)[0] == records[1]["file_name"]


def test_unknown_tfds_name_is_a_value_error(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(ValueError, match="no_such_dataset_xyz"):
    sources.TfdsSource("no_such_dataset_xyz", "test", data_dir=tmp_path, size=16)


def test_from_args_needs_exactly_one_input():
  with pytest.raises(ValueError, match="exactly one"):
    sources.from_args(None, None, None, None, 16)
  with pytest.raises(ValueError, match="split"):
    sources.from_args(None, "mnist", None, None, 16)


def test_from_args_names_the_images_flag_and_what_is_wrong(tmp_path):
  with pytest.raises(ValueError, match=r"^`--images` '.*nowhere' does not exist\.$"):
    sources.from_args(str(tmp_path / "nowhere"), None, None, None, 16)
  with pytest.raises(ValueError, match=r"^`--images` '.*\*\.png' matches no file"):
    sources.from_args(str(tmp_path / "*.png"), None, None, None, 16)


def _tiny_photos_build(data_dir, pixels: list[np.ndarray], file_format: str):
  """Prepares a tfds data set `pfc_tiny_photos` in `data_dir` as `file_format` shards.

  Image i is `pixels[i]`, with file name `photo_{i}.JPEG`. The builder is not registered, so
  readers find the data set from its files alone, as they find an ImageNet build prepared
  elsewhere.
  """
  tfds = pytest.importorskip("tensorflow_datasets")

  class PfcTinyPhotos(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3)),
          "file_name": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"validation": self._generate_examples()}

    def _generate_examples(self):
      for i, image in enumerate(pixels):
        yield i, {"image": image, "file_name": f"photo_{i}.JPEG"}

  PfcTinyPhotos(data_dir=str(data_dir), file_format=file_format).download_and_prepare()


def test_tfrecord_build_is_read_through_tf_data(tmp_path):
  pytest.importorskip("tensorflow")  # tfds needs it to write, and pfc-jax to read, TFRecord.
  rng = np.random.default_rng(0)
  pixels = [rng.integers(0, 256, (12 + i, 10, 3), dtype=np.uint8) for i in range(5)]
  _tiny_photos_build(tmp_path / "tfrecord", pixels, "tfrecord")
  assert list((tmp_path / "tfrecord" / "pfc_tiny_photos" / "1.0.0").glob("*.tfrecord-*"))
  source = sources.TfdsSource("pfc_tiny_photos", "validation", data_dir=tmp_path / "tfrecord",
                              size=8)
  assert isinstance(source._records, sources._TfDataRecords)  # pylint: disable=protected-access
  assert len(source) == 5 and source.describe()["count"] == 5
  in_order = [source.read(i) for i in range(5)]  # One record per read.
  ids = [item_id for item_id, _ in in_order]
  assert sorted(ids) == [f"photo_{i}" for i in range(5)]
  for item_id, image in in_order:
    expected = data.preprocess(Image.fromarray(pixels[int(item_id.split("_")[1])]), 8)
    np.testing.assert_allclose(image, expected)
  for index in (3, 1, 4, 4, 0):  # Backwards, repeated and skipping: the pipeline restarts.
    item_id, image = source.read(index)
    assert item_id == ids[index]
    np.testing.assert_array_equal(image, in_order[index][1])
  # Index i is the same record as in an ArrayRecord build of the same data (tfds stores both
  # in the order of its key hash), so a job can move between the two formats.
  _tiny_photos_build(tmp_path / "array_record", pixels, "array_record")
  random_access = sources.TfdsSource("pfc_tiny_photos", "validation",
                                     data_dir=tmp_path / "array_record", size=8)
  assert [random_access.read(i)[0] for i in range(5)] == ids


def test_tfrecord_build_converted_with_tfds_convert_format_reads_without_tf_data(tmp_path):
  pytest.importorskip("tensorflow")
  pytest.importorskip("apache_beam")  # tfds's convert_format module imports it.
  from etils import epath  # pylint: disable=g-import-not-at-top  # a tensorflow_datasets dependency
  from tensorflow_datasets.scripts.cli import convert_format_utils  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  _tiny_photos_build(tmp_path, [rng.integers(0, 256, (9, 11, 3), dtype=np.uint8) for _ in range(4)],
                     "tfrecord")
  tfrecord = sources.TfdsSource("pfc_tiny_photos", "validation", data_dir=tmp_path, size=8)
  expected = [tfrecord.read(i) for i in range(4)]
  # What `tfds convert_format --dataset_version_dir=DIR --out_file_format=array_record` runs.
  convert_format_utils.convert_dataset(
      out_dir=None, out_file_format="array_record", root_data_dir=None, dataset_dir=None,
      dataset_version_dir=[epath.Path(tmp_path / "pfc_tiny_photos" / "1.0.0")], overwrite=False,
      use_beam=False, num_workers=1)
  converted = sources.TfdsSource("pfc_tiny_photos", "validation", data_dir=tmp_path, size=8)
  assert not isinstance(converted._records, sources._TfDataRecords)  # pylint: disable=protected-access
  for index, (item_id, image) in enumerate(expected):
    read_id, read_image = converted.read(index)
    assert read_id == item_id
    np.testing.assert_array_equal(read_image, image)


def test_tfrecord_build_without_tensorflow_names_both_ways_out(tmp_path, monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")

  def tfrecord_only(name, **kwargs):  # What tfds.data_source raises for a TFRecord build.
    raise NotImplementedError(f"Random access data source for {name} in TFRecord is not supported.")

  monkeypatch.setattr(tfds, "data_source", tfrecord_only)
  monkeypatch.setitem(sys.modules, "tensorflow", None)  # `import tensorflow` fails.
  with pytest.raises(ValueError, match="imagenet2012.*tensorflow-cpu.*tfds convert_format"):
    sources.TfdsSource("imagenet2012", "validation", data_dir=tmp_path, size=8)


def test_identity_changes_name_changed_removed_and_added_items():
  stored = {f"{i:02d}.png": "1 bytes" for i in range(14)}
  current = {**{name: value for name, value in stored.items() if name != "03.png"},
             "00.png": "2 bytes", "x.png": "1 bytes"}
  assert sources.identity_changes(stored, current) == [
      "changed 00.png ('1 bytes' there, '2 bytes' now)", "removed 03.png", "added x.png"]
  assert sources.identity_changes(stored, {}, limit=3)[-1] == "11 more removed"
  assert sources.identity_changes(stored, dict(stored)) == []


def test_folder_identity_is_relative_name_size_and_mtime(tmp_path):
  for folder in ("x", "y"):
    (tmp_path / folder).mkdir()
    _write_image(tmp_path / folder / "cat.png", 0)
  source = sources.ImageFolderSource(str(tmp_path / "*" / "*.png"), size=16)
  stat = (tmp_path / "y" / "cat.png").stat()
  assert source.identity() == {
      "x/cat.png": f"{(tmp_path / 'x' / 'cat.png').stat().st_size} bytes, mtime_ns "
                   f"{(tmp_path / 'x' / 'cat.png').stat().st_mtime_ns}",
      "y/cat.png": f"{stat.st_size} bytes, mtime_ns {stat.st_mtime_ns}"}
  assert [source.item_id(i) for i in range(2)] == source.ids
