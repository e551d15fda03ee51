"""Image sources: stable order and ids, bad items named, tfds read offline through `data_source`."""

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
