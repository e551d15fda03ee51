"""Coalition maps, heat maps, panels and PNG output."""

import matplotlib
import numpy as np
import pytest
from PIL import Image

from pfc_jax import viz


def _image(size=20, seed=0):
  return np.random.default_rng(seed).uniform(size=(size, size, 3)).astype(np.float32)


def test_coalition_map_gives_each_label_its_own_colour():
  labels = np.arange(20).reshape(4, 5)
  rgb = viz.coalition_map(labels)
  assert rgb.shape == (4, 5, 3) and rgb.dtype == np.uint8
  assert len({tuple(c) for c in rgb.reshape(-1, 3)}) == 20
  same = viz.coalition_map(np.full((2, 2), 7))
  assert (same == rgb[1, 2]).all()
  with pytest.raises(ValueError, match="labels"):
    viz.coalition_map(np.zeros((2, 2), np.float32))


def test_heatmap_spans_the_colormap():
  saliency = np.linspace(-3.0, 5.0, 12).reshape(3, 4)
  rgb = viz.heatmap(saliency)
  jet = matplotlib.colormaps["jet"]
  np.testing.assert_allclose(rgb[0, 0], np.round(np.asarray(jet(0.0)[:3]) * 255), atol=1)
  np.testing.assert_allclose(rgb[-1, -1], np.round(np.asarray(jet(1.0)[:3]) * 255), atol=1)
  assert (viz.heatmap(np.ones((3, 3))) == rgb[0, 0]).all()


def test_overlay_blends_image_and_heat_map():
  image = _image()
  saliency = np.random.default_rng(1).normal(size=(20, 20))
  np.testing.assert_allclose(viz.overlay(image, saliency, alpha=0.0), np.round(image * 255), atol=1)
  np.testing.assert_array_equal(viz.overlay(image, saliency, alpha=1.0), viz.heatmap(saliency))
  with pytest.raises(ValueError, match="saliency"):
    viz.overlay(image, saliency[:10])


def test_panel_layout():
  image, size = _image(), 20
  labels = np.repeat(np.arange(4), 100).reshape(20, 20)
  saliency = np.random.default_rng(2).normal(size=(20, 20))
  titled = viz.panel(image, labels, saliency, "tench 0.95", min_side=1)
  blank = viz.panel(image, labels, saliency, "", min_side=1)
  assert titled.dtype == np.uint8 and titled.shape[1] == 3 * size + 8
  strip = titled.shape[0] - size
  pictures = titled[strip:]
  np.testing.assert_allclose(pictures[:, :size], np.round(image * 255), atol=1)
  np.testing.assert_array_equal(pictures[:, size + 4:2 * size + 4], viz.coalition_map(labels))
  np.testing.assert_array_equal(pictures[:, 2 * size + 8:], viz.overlay(image, saliency))
  assert (blank[:strip] == 255).all() and (titled[:strip] < 128).any()


def test_panel_enlarges_small_images_by_an_integer_factor():
  image = _image()
  labels = np.repeat(np.arange(4), 100).reshape(20, 20)
  saliency = np.random.default_rng(2).normal(size=(20, 20))
  small = viz.panel(image, labels, saliency, min_side=1)
  large = viz.panel(image, labels, saliency, min_side=50)  # factor 3: 60 px tiles
  strip = small.shape[0] - 20
  assert large.shape == (strip + 60, 3 * 60 + 8, 3)
  np.testing.assert_array_equal(large[strip::3, :60:3], small[strip:, :20])
  np.testing.assert_array_equal(large[strip + 2::3, 2:60:3], small[strip:, :20])


def test_save_png_round_trips_and_leaves_no_temporary_files(tmp_path):
  rgb = viz.coalition_map(np.arange(30).reshape(5, 6))
  path = tmp_path / "sub" / "map.png"
  viz.save_png(path, rgb)
  np.testing.assert_array_equal(np.asarray(Image.open(path)), rgb)
  assert [p.name for p in path.parent.iterdir()] == ["map.png"]
  with pytest.raises(ValueError, match="rgb"):
    viz.save_png(tmp_path / "bad.png", rgb.astype(np.float32))
