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


def _panel_inputs(size=20):
  labels = np.repeat(np.arange(4), size * size // 4).reshape(size, size)
  return _image(size), labels, np.random.default_rng(2).normal(size=(size, size))


# The panel layout's sizes in pixels: title strip, caption strip, colour bar.
# pylint: disable-next=protected-access
_TITLE, _CAPTIONS, _BAR = viz._TITLE_HEIGHT, viz._CAPTION_HEIGHT, viz._BAR_WIDTH
_TOP = _TITLE + _CAPTIONS  # Where the pictures start.


def test_panel_layout():
  (image, labels, saliency), size = _panel_inputs(), 20
  titled = viz.panel(image, labels, saliency, "tench  p = 0.95", min_side=1)
  blank = viz.panel(image, labels, saliency, "", min_side=1)
  bar = viz.colour_bar(saliency.min(), saliency.max(), size)
  assert titled.dtype == np.uint8
  assert titled.shape == (_TOP + size, 3 * size + 2 * 4 + 8 + bar.shape[1], 3)
  pictures = titled[_TOP:]
  np.testing.assert_allclose(pictures[:, :size], np.round(image * 255), atol=1)
  np.testing.assert_array_equal(pictures[:, size + 4:2 * size + 4], viz.coalition_map(labels))
  np.testing.assert_array_equal(pictures[:, 2 * size + 8:3 * size + 8],
                                viz.overlay(image, saliency))
  np.testing.assert_array_equal(pictures[:, 3 * size + 16:], bar)
  assert (blank[:_TITLE] == 255).all() and (titled[:_TITLE] < 128).any()
  np.testing.assert_array_equal(blank[_TITLE:], titled[_TITLE:])


def test_panel_caption_counts_the_coalitions():
  image, labels, saliency = _panel_inputs(40)
  captions = lambda rgb: rgb[_TITLE:_TOP]
  four = captions(viz.panel(image, labels, saliency, min_side=1))
  renumbered = captions(viz.panel(image, 3 * labels + 7, saliency, min_side=1))
  one = captions(viz.panel(image, np.zeros_like(labels), saliency, min_side=1))
  np.testing.assert_array_equal(four, renumbered)  # The count, not the label values.
  image_caption, coalition_caption = slice(0, 40), slice(44, 84)
  np.testing.assert_array_equal(four[:, image_caption], one[:, image_caption])
  assert (four[:, coalition_caption] < 128).any()
  assert not np.array_equal(four[:, coalition_caption], one[:, coalition_caption])


def test_colour_bar_runs_from_the_highest_colour_down_with_value_labels():
  bar = viz.colour_bar(0.25, 0.75, 50)
  jet = matplotlib.colormaps["jet"]
  colours = bar[:, :_BAR]
  assert (colours == colours[:, :1]).all()  # Each row one colour.
  np.testing.assert_allclose(colours[0, 0], np.round(np.asarray(jet(1.0)[:3]) * 255), atol=1)
  np.testing.assert_allclose(colours[-1, 0], np.round(np.asarray(jet(0.0)[:3]) * 255), atol=1)
  np.testing.assert_allclose(colours[25, 0], np.round(np.asarray(jet(24 / 49)[:3]) * 255), atol=1)
  labels = bar[:, _BAR:]
  assert (labels < 128).any()
  other = viz.colour_bar(0.25, 0.5, 50)
  np.testing.assert_array_equal(other[:, :_BAR], colours)
  assert not np.array_equal(other[:, _BAR:], labels)
  narrow = viz.colour_bar(0.7, 0.70005, 50)  # Long labels: the bar widens to fit them.
  assert narrow.shape[1] > bar.shape[1] and (narrow[:, -2:] == 255).all()
  with pytest.raises(ValueError, match="height"):
    viz.colour_bar(0.0, 1.0, 1)


def test_tick_labels_tell_narrow_ranges_apart():
  assert viz.tick_labels(0.0, 1.0) == ["1.0", "0.5", "0.0"]
  assert viz.tick_labels(0.7, 0.7012) == ["0.7012", "0.7006", "0.7000"]
  assert viz.tick_labels(-3.0, 5.0) == ["5.0", "1.0", "-3.0"]
  assert viz.tick_labels(0.25, 0.25) == ["0.25", "0.25", "0.25"]


def test_panel_enlarges_small_images_by_an_integer_factor():
  image, labels, saliency = _panel_inputs()
  small = viz.panel(image, labels, saliency, min_side=1)
  large = viz.panel(image, labels, saliency, min_side=50)  # factor 3: 60 px tiles
  assert large.shape[0] == _TOP + 60
  np.testing.assert_array_equal(large[_TOP::3, :60:3], small[_TOP:, :20])
  np.testing.assert_array_equal(large[_TOP + 2::3, 2:60:3], small[_TOP:, :20])
  default = viz.panel(image, labels, saliency)  # 20 px -> factor 12, 240 px tiles.
  assert default.shape[0] - _TOP == 240 >= viz.PANEL_MIN_SIDE


def test_save_png_round_trips_and_leaves_no_temporary_files(tmp_path):
  rgb = viz.coalition_map(np.arange(30).reshape(5, 6))
  path = tmp_path / "sub" / "map.png"
  viz.save_png(path, rgb)
  np.testing.assert_array_equal(np.asarray(Image.open(path)), rgb)
  assert [p.name for p in path.parent.iterdir()] == ["map.png"]
  with pytest.raises(ValueError, match="rgb"):
    viz.save_png(tmp_path / "bad.png", rgb.astype(np.float32))
