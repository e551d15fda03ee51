"""Image loading with torchvision's ImageNet evaluation preprocessing.

`load_image` = PIL decode, EXIF orientation, conversion to 8-bit RGB (transparent pixels
composited onto white), torchvision's `Resize(round(size * 256 / 224))` (bilinear, antialiased,
as PIL's `resize` does) and `CenterCrop(size)`, scaled to [0, 1]. `normalize` then applies the
ImageNet mean and std. Transparency and images far smaller than `size` are reported with a
`UserWarning` naming the image.
"""

from __future__ import annotations

import glob
import os
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pfc_jax.classifier import IMAGENET_MEAN, IMAGENET_STD

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm")
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_BACKGROUND = (255, 255, 255)  # What transparent pixels are composited onto: white.
MAX_UPSAMPLING = 4.0  # A larger upsampling of the short side is reported with a warning.

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTENSIONS", "MAX_UPSAMPLING",
           "list_images", "load_image", "normalize", "preprocess", "to_rgb"]


def normalize(images01: jax.Array, mean: tuple[float, ...] = IMAGENET_MEAN,
              std: tuple[float, ...] = IMAGENET_STD) -> jax.Array:
  """`(images01 - mean) / std` per channel: `[..., 3]` in [0, 1] -> `[..., 3] float32`."""
  images01 = jnp.asarray(images01, jnp.float32)
  return (images01 - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def to_rgb(image: Image.Image, name: str = "image") -> Image.Image:
  """8-bit RGB version of a decoded image of any mode.

  Grey, palette, CMYK and the like convert as PIL's `convert("RGB")` does; 16-bit grey is
  scaled to 8 bits first. Transparency (an alpha channel, or a palette or tRNS transparent
  colour) is composited onto white (as most viewers show it), so that the model
  sees what a viewer sees rather than the colours stored under transparent pixels; a
  `UserWarning` naming `name` says so when some pixel is not fully opaque.
  """
  if image.mode in _SIXTEEN_BIT_MODES:
    values = np.asarray(image, np.float64)
    image = Image.fromarray(np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8), "L")
  if image.mode in _ALPHA_MODES or "transparency" in image.info:
    image = image.convert("RGBA")
    if image.getextrema()[3][0] < 255:
      warnings.warn(f"{name} has transparent pixels; they are composited onto white.",
                    UserWarning, stacklevel=2)
    image = Image.alpha_composite(Image.new("RGBA", image.size, (*_BACKGROUND, 255)), image)
  return image.convert("RGB") if image.mode != "RGB" else image


def preprocess(image: Image.Image, size: int = 224, name: str = "image") -> np.ndarray:
  """torchvision's resize-and-centre-crop of a decoded image: `[size, size, 3] float32` in [0, 1].

  The short side is resized to `round(size * 256 / 224)` and the long side to
  `int(long * short_new / short)` with PIL's antialiased bilinear filter (torchvision's
  `Resize` on PIL images), then the centre `size x size` is cropped with torchvision's
  `CenterCrop` offsets `round((side - size) / 2)`. EXIF orientation is not applied here
  (`load_image` does it).

  Args:
    image: A decoded PIL image, any mode (converted by `to_rgb`).
    size: Side of the output crop, at least 1.
    name: How warnings name the image.

  Warns:
    UserWarning: transparent pixels (see `to_rgb`), or a short side upsampled more than
      `MAX_UPSAMPLING` times, whose explanation can show little but interpolation.
  """
  if size < 1:
    raise ValueError(f"`size` must be a positive number of pixels, got {size}.")
  image = to_rgb(image, name)
  width, height = image.size
  short_new = round(size * 256 / 224)
  if short_new > MAX_UPSAMPLING * min(width, height):
    warnings.warn(
        f"{name} is only {width}x{height} pixels, far below the {size}-pixel input: it is "
        f"upsampled {short_new / min(width, height):.0f}x.", UserWarning, stacklevel=2)
  if width <= height:
    new_size = (short_new, int(short_new * height / width))
  else:
    new_size = (int(short_new * width / height), short_new)
  image = image.resize(new_size, Image.BILINEAR)
  left = int(round((new_size[0] - size) / 2.0))
  top = int(round((new_size[1] - size) / 2.0))
  image = image.crop((left, top, left + size, top + size))
  return np.asarray(image, np.float32) / 255.0


def load_image(path: str | os.PathLike, size: int = 224) -> np.ndarray:
  """Reads an image file as torchvision's ImageNet evaluation transform sees it.

  Args:
    path: Any format PIL reads (JPEG, PNG, ...); EXIF orientation is honoured.
    size: Side of the square output.

  Returns:
    `[size, size, 3] float32` RGB in [0, 1].

  Raises:
    FileNotFoundError: `path` does not exist.
    IsADirectoryError: `path` is a directory.
    ValueError: naming `path`, when it is empty, corrupt, truncated or not an image.

  Warns:
    UserWarning: naming `path`, for transparency or a tiny image (see `preprocess`).
  """
  path = Path(path)
  if path.is_dir():
    raise IsADirectoryError(f"Image {str(path)!r} is a directory, not an image file.")
  if not path.is_file():
    raise FileNotFoundError(f"Image file {str(path)!r} does not exist.")
  try:
    with Image.open(path) as image:
      image.load()
      image = ImageOps.exif_transpose(image)
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
    raise ValueError(f"Cannot read image {str(path)!r}: {e}") from e
  return preprocess(image, size, f"Image {str(path)!r}")


def list_images(dir_or_glob: str | os.PathLike) -> list[Path]:
  """Sorted image paths from a directory (its files with `IMAGE_EXTENSIONS`, not recursive),
  a glob pattern, or a single file.

  Raises:
    ValueError: naming `dir_or_glob` when nothing matches, and saying whether it does not exist,
      is a folder without image files, or a glob (case-sensitive) that matches no file.
  """
  pattern = str(dir_or_glob)
  if os.path.isdir(pattern):
    paths = [p for p in Path(pattern).iterdir()
             if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if not paths:
      raise ValueError(f"`dir_or_glob` {pattern!r} is a folder without image files (none with "
                       f"the extensions {', '.join(IMAGE_EXTENSIONS)}).")
    return sorted(paths)
  paths = [Path(p) for p in glob.glob(pattern) if os.path.isfile(p)]
  if paths:
    return sorted(paths)
  if not glob.has_magic(pattern):
    raise ValueError(f"`dir_or_glob` {pattern!r} does not exist.")
  hint = " (the pattern is case-sensitive)"
  if "[" not in pattern:  # Would the pattern match, case aside? ("*.jpg" against "x.JPEG" does not.)
    folded = "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in pattern)
    matches = sorted(p for p in glob.glob(folded) if os.path.isfile(p))
    if matches:
      hint = f"; the pattern is case-sensitive, and {matches[0]!r} differs from it only in case"
  raise ValueError(f"`dir_or_glob` {pattern!r} matches no file{hint}.")
