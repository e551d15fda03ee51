"""Image loading: torchvision's resize and crop, EXIF, colour modes, bad files, listing."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pfc_jax import data


def _gradient(width: int, height: int) -> Image.Image:
  """An RGB image with distinct values everywhere, so any offset or scale error shows."""
  yy, xx = np.mgrid[:height, :width]
  rgb = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1),
                  (xx * 7 + yy * 13) % 256], axis=-1)
  return Image.fromarray(rgb.astype(np.uint8))


# (width, height, size) -> torchvision's Resize(round(size * 256 / 224)) output (width, height)
# and CenterCrop(size) offsets (left, top), worked out by hand from torchvision's rules: the long
# side is int(long * short_new / short), the offsets round((side - size) / 2) (half to even).
@pytest.mark.parametrize("width, height, size, resized, offsets", [
    (300, 200, 224, (384, 256), (80, 16)),
    (150, 101, 100, (169, 114), (34, 7)),  # short_new = round(114.29); round(34.5) = 34.
    (101, 150, 100, (114, 169), (7, 34)),
    (64, 64, 56, (64, 64), (4, 4)),  # Already at the resize target: only the crop.
])
def test_preprocess_matches_torchvision_rules(width, height, size, resized, offsets):
  image = _gradient(width, height)
  left, top = offsets
  expected = image.resize(resized, Image.BILINEAR).crop((left, top, left + size, top + size))
  out = data.preprocess(image, size)
  assert out.shape == (size, size, 3) and out.dtype == np.float32
  np.testing.assert_array_equal(out, np.asarray(expected, np.float32) / 255.0)


def test_preprocess_matches_torchvision_when_installed():
  transforms = pytest.importorskip("torchvision.transforms")
  image = _gradient(173, 121)
  expected = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224),
                                 transforms.ToTensor()])(image).numpy().transpose(1, 2, 0)
  np.testing.assert_allclose(data.preprocess(image, 224), expected, atol=1e-6)


def test_load_image_reads_png_exactly(tmp_path):
  image = _gradient(40, 30)
  image.save(tmp_path / "a.png")
  np.testing.assert_array_equal(data.load_image(tmp_path / "a.png", 24),
                                data.preprocess(image, 24))


def test_exif_orientation_is_honoured(tmp_path):
  stored = np.zeros((40, 60, 3), np.uint8)
  stored[:, :30, 0] = 255  # Left half red, right half blue, as stored.
  stored[:, 30:, 2] = 255
  exif = Image.Exif()
  exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display.
  Image.fromarray(stored).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
  Image.fromarray(stored).save(tmp_path / "plain.jpg", quality=95)
  rotated = data.load_image(tmp_path / "rotated.jpg", 32)
  plain = data.load_image(tmp_path / "plain.jpg", 32)
  assert rotated[:8, :, 0].mean() > 0.9 and rotated[-8:, :, 2].mean() > 0.9  # Red on top.
  assert plain[:, :8, 0].mean() > 0.9 and plain[:, -8:, 2].mean() > 0.9  # Red on the left.


def _palette_with_transparency() -> Image.Image:
  image = Image.new("P", (20, 20))
  image.putpalette([10, 20, 30] * 256)
  image.info["transparency"] = b"\x00" * 256
  return image


@pytest.mark.parametrize("image, rgb255", [
    (Image.new("L", (20, 20), 128), (128, 128, 128)),
    (Image.new("1", (20, 20), 1), (255, 255, 255)),
    (Image.new("RGBA", (20, 20), (10, 200, 30, 255)), (10, 200, 30)),  # Opaque: as stored.
    (Image.new("CMYK", (20, 20), (0, 0, 0, 0)), (255, 255, 255)),
    (Image.new("CMYK", (20, 20), (255, 0, 0, 0)), (0, 255, 255)),
    (Image.fromarray(np.full((20, 20), 128 * 257, np.uint16)), (128, 128, 128)),  # 16-bit.
])
def test_colour_modes_become_rgb(image, rgb255, tmp_path, recwarn):
  path = tmp_path / ("image.tiff" if image.mode == "CMYK" else "image.png")
  image.save(path)
  out = data.load_image(path, 16)
  assert out.shape == (16, 16, 3) and out.dtype == np.float32
  np.testing.assert_allclose(out, np.broadcast_to(np.array(rgb255) / 255.0, out.shape), atol=2e-2)
  assert not recwarn.list


def _composited(rgb, alpha):
  """Colour over white with opacity `alpha` in [0, 255]: rgb a + 255 (1 - a)."""
  return tuple(c * alpha / 255 + 255 * (1 - alpha / 255) for c in rgb)


@pytest.mark.parametrize("image, rgb255", [
    (Image.new("RGBA", (20, 20), (10, 200, 30, 0)), (255, 255, 255)),  # Hidden colour ignored.
    (Image.new("RGBA", (20, 20), (10, 200, 30, 128)), _composited((10, 200, 30), 128)),
    (Image.new("LA", (20, 20), (64, 0)), (255, 255, 255)),
    (Image.new("LA", (20, 20), (64, 200)), _composited((64, 64, 64), 200)),
    (_palette_with_transparency(), (255, 255, 255)),
])
def test_transparent_pixels_are_composited_onto_white_with_a_warning(image, rgb255, tmp_path):
  image.save(tmp_path / "cutout.png")
  with pytest.warns(UserWarning, match=r"cutout\.png.* transparent pixels; .* onto white") as caught:
    out = data.load_image(tmp_path / "cutout.png", 16)
  assert len(caught) == 1
  np.testing.assert_allclose(out, np.broadcast_to(np.array(rgb255) / 255.0, out.shape), atol=2e-2)


def test_tiny_images_warn(tmp_path, recwarn):
  Image.new("RGB", (1, 1), (200, 10, 10)).save(tmp_path / "dot.png")
  message = r"dot\.png' is only 1x1 pixels, far below the 224-pixel input: it is upsampled 256x"
  with pytest.warns(UserWarning, match=message):
    out = data.load_image(tmp_path / "dot.png", 224)
  np.testing.assert_allclose(out, np.broadcast_to(np.array([200, 10, 10]) / 255.0, out.shape),
                             atol=1e-6)
  _gradient(64, 80).save(tmp_path / "small.png")  # Upsampled exactly 4x: no warning.
  data.load_image(tmp_path / "small.png", 224)
  assert not recwarn.list


def test_sixteen_bit_png_keeps_its_range(tmp_path):
  values = np.linspace(0, 65535, 20 * 20).reshape(20, 20).astype(np.uint16)
  Image.fromarray(values).save(tmp_path / "deep.png")
  out = data.load_image(tmp_path / "deep.png", 16)
  assert out.min() < 0.2 and out.max() > 0.8


def _truncated_jpeg(tmp_path):
  _gradient(64, 64).save(tmp_path / "full.jpg")
  content = (tmp_path / "full.jpg").read_bytes()
  return content[:len(content) // 2]


@pytest.mark.parametrize("name, content", [
    ("empty.jpg", lambda tmp: b""),
    ("notes.png", lambda tmp: b"just some text, no pixels"),
    ("corrupt.jpg", lambda tmp: b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4),
    ("truncated.jpg", _truncated_jpeg),
])
def test_bad_files_raise_naming_the_file(name, content, tmp_path):
  path = tmp_path / name
  path.write_bytes(content(tmp_path))
  with pytest.raises(ValueError, match=name):
    data.load_image(path)


def test_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="absent.jpg"):
    data.load_image(tmp_path / "absent.jpg")


def test_a_directory_is_reported_as_a_directory(tmp_path):
  (tmp_path / "photos.jpg").mkdir()
  with pytest.raises(IsADirectoryError, match=r"photos\.jpg' is a directory, not an image file"):
    data.load_image(tmp_path / "photos.jpg")


def test_normalize():
  mean, std = np.array(data.IMAGENET_MEAN), np.array(data.IMAGENET_STD)
  images = np.stack([np.broadcast_to(mean, (4, 4, 3)), np.broadcast_to(mean + std, (4, 4, 3))])
  out = np.asarray(data.normalize(images.astype(np.float32)))
  np.testing.assert_allclose(out[0], 0.0, atol=1e-6)
  np.testing.assert_allclose(out[1], 1.0, atol=1e-5)
  np.testing.assert_allclose(data.normalize(np.ones((1, 3), np.float32), (0.5,) * 3, (0.25,) * 3),
                             [[2.0, 2.0, 2.0]])


def test_list_images(tmp_path):
  for name in ("b.JPG", "a.png", "notes.txt"):
    (tmp_path / name).write_bytes(b"")
  (tmp_path / "sub.png").mkdir()
  assert data.list_images(tmp_path) == [tmp_path / "a.png", tmp_path / "b.JPG"]
  assert data.list_images(tmp_path / "*.png") == [tmp_path / "a.png"]
  assert data.list_images(tmp_path / "b.JPG") == [tmp_path / "b.JPG"]
  with pytest.raises(ValueError, match="dir_or_glob.*matches no file .the pattern is case-sensitive"):
    data.list_images(tmp_path / "*.gif")
  with pytest.raises(ValueError, match="b.JPG' differs from it only in case"):
    data.list_images(tmp_path / "*.jpg")
  with pytest.raises(ValueError, match="dir_or_glob.*does not exist"):
    data.list_images(tmp_path / "missing")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="dir_or_glob.*is a folder without image files"):
    data.list_images(tmp_path / "empty")
