"""Each baseline against its paper's equation, computed independently in float64 numpy.

The test classifier is small enough to differentiate by hand: a 1x1 convolution with ReLU, 2x2
average pooling (the features A [h, w, K], half the image size), and a head whose logits are
`mean_ij(A_k(i, j)^2) @ W2 + b`, so that the gradient of a logit varies over space.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pfc_jax import Classifier, baselines
from pfc_jax.baselines.rise import random_masks

SIZE, POOL, CHANNELS, CLASSES = 12, 2, 4, 3
MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def _params(seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {"w1": rng.normal(size=(3, CHANNELS)).astype(np.float32),
          "w2": rng.normal(size=(CHANNELS, CLASSES)).astype(np.float32),
          "b": rng.normal(size=CLASSES).astype(np.float32)}


def _features(params, x):
  pre = jax.nn.relu(x @ params["w1"])
  batch, height, width, channels = pre.shape
  return pre.reshape(batch, height // POOL, POOL, width // POOL, POOL, channels).mean(axis=(2, 4))


def _head(params, features):
  return (features**2).mean(axis=(1, 2)) @ params["w2"] + params["b"]


def _apply(params, x):
  return _head(params, _features(params, x))


def _classifier(params) -> Classifier:
  return Classifier(_apply, jax.tree.map(jnp.asarray, params), mean=MEAN, std=STD,
                    features_fn=_features, head_fn=_head)


def _images(count: int = 2, seed: int = 1) -> np.ndarray:
  return np.random.default_rng(seed).uniform(size=(count, SIZE, SIZE, 3)).astype(np.float32)


# --- The same network in float64 numpy, with its gradients by hand ---------------------------


def _np_normalize(images01):
  return (images01.astype(np.float64) - np.array(MEAN)) / np.array(STD)


def _np_pre(params, x):
  return x @ params["w1"].astype(np.float64)  # [H, W, K] before the ReLU.


def _np_features(params, x):
  """`[h, w, K]` pooled activations of one normalised image `x [H, W, 3]`."""
  relu = np.maximum(_np_pre(params, x), 0.0)
  height, width, channels = relu.shape
  return relu.reshape(height // POOL, POOL, width // POOL, POOL, channels).mean(axis=(1, 3))


def _np_logits(params, x):
  return (_np_features(params, x)**2).mean(axis=(0, 1)) @ params["w2"] + params["b"]


def _np_softmax(logits):
  e = np.exp(logits - logits.max())
  return e / e.sum()


def _np_feature_gradient(params, features, target):
  """d logit_target / d A: `2 A_k W2[k, t] / (h w)`."""
  height, width, _ = features.shape
  return 2.0 * features * params["w2"][:, target] / (height * width)


def _np_input_gradient(params, image01, target):
  """d logit_target / d image01 `[H, W, 3]` (chain rule through pooling, ReLU, normalisation)."""
  x = _np_normalize(image01)
  d_features = _np_feature_gradient(params, _np_features(params, x), target)
  d_relu = np.repeat(np.repeat(d_features, POOL, axis=0), POOL, axis=1) / POOL**2
  d_pre = d_relu * (_np_pre(params, x) > 0)
  return (d_pre @ params["w1"].T.astype(np.float64)) / np.array(STD)


def _np_upsample(maps, size):
  """Bilinear upsampling of `[h, w, ...]` to `size`, half-pixel centres, edges clamped."""
  for axis, out in enumerate(size):
    n = maps.shape[axis]
    coords = np.clip((np.arange(out) + 0.5) * n / out - 0.5, 0, n - 1)
    low = np.floor(coords).astype(int)
    high = np.minimum(low + 1, n - 1)
    shape = [1] * maps.ndim
    shape[axis] = out
    frac = (coords - low).reshape(shape)
    maps = np.take(maps, low, axis=axis) * (1 - frac) + np.take(maps, high, axis=axis) * frac
  return maps


# --- The tests ---------------------------------------------------------------------------------


def test_gradcam_matches_its_equation():
  """Selvaraju et al. eqs. 1-2: ReLU(sum_k alpha_k A_k), alpha_k the spatial mean of the gradient."""
  params, images, target = _params(), _images(), np.array([0, 2], np.int32)
  saliency = np.asarray(baselines.gradcam(_classifier(params), images, target))
  for i in range(len(images)):
    features = _np_features(params, _np_normalize(images[i]))
    alpha = _np_feature_gradient(params, features, target[i]).mean(axis=(0, 1))
    expected = _np_upsample(np.maximum(features @ alpha, 0.0), (SIZE, SIZE))
    np.testing.assert_allclose(saliency[i], expected, rtol=1e-4, atol=1e-6)


def test_integrated_gradients_matches_its_equation():
  """Sundararajan et al.: (x - x') * mean_k grad(x' + a_k (x - x')), a midpoint Riemann sum."""
  params, images, target = _params(), _images(), np.array([1, 0], np.int32)
  config = baselines.IntegratedGradientsConfig(num_steps=5, baseline=0.25, chunk_size=2)
  saliency = np.asarray(
      baselines.integrated_gradients(_classifier(params), images, target, None, config))
  alphas = (np.arange(5) + 0.5) / 5
  for i in range(len(images)):
    x = images[i].astype(np.float64)
    grads = [_np_input_gradient(params, 0.25 + a * (x - 0.25), target[i]) for a in alphas]
    expected = np.abs((x - 0.25) * np.mean(grads, axis=0)).sum(axis=-1)
    np.testing.assert_allclose(saliency[i], expected, rtol=1e-4, atol=1e-6)


def test_occlusion_matches_its_definition():
  """Zeiler and Fergus: the mean target-probability drop over the grey patches covering a pixel."""
  params, images, target = _params(), _images(), np.array([2, 1], np.int32)
  config = baselines.OcclusionConfig(patch_size=6, stride=4, fill=0.3, chunk_size=4)
  saliency = np.asarray(baselines.occlusion(_classifier(params), images, target, None, config))
  starts = [0, 4, SIZE - 6]  # Stride 4 from 0, then the last patch flush with the far edge.
  for i in range(len(images)):
    clean = _np_softmax(_np_logits(params, _np_normalize(images[i])))[target[i]]
    drops, counts = np.zeros((SIZE, SIZE)), np.zeros((SIZE, SIZE))
    for y in starts:
      for x in starts:
        occluded = images[i].astype(np.float64).copy()
        occluded[y:y + 6, x:x + 6] = 0.3
        probs = _np_softmax(_np_logits(params, _np_normalize(occluded)))
        drops[y:y + 6, x:x + 6] += clean - probs[target[i]]
        counts[y:y + 6, x:x + 6] += 1
    np.testing.assert_allclose(saliency[i], drops / counts, rtol=1e-4, atol=1e-6)


def test_rise_matches_its_equation():
  """Petsiuk et al.'s Monte Carlo estimate: sum_i f(x * M_i) M_i / (N p), over each image's masks."""
  params, images, target = _params(), _images(), np.array([0, 1], np.int32)
  config = baselines.RISEConfig(num_masks=10, cells=3, keep_probability=0.4, chunk_size=4)
  key = jax.random.key(5)
  saliency = np.asarray(baselines.rise(_classifier(params), images, target, key, config))
  draw = jax.jit(random_masks, static_argnums=(0, 2, 3, 4))
  for i, image_key in enumerate(jax.random.split(key, len(images))):
    # Image i's mask n comes from fold_in(key_i, n), whichever chunk draws it.
    masks = np.asarray(draw(config, image_key, 10, SIZE, SIZE)).astype(np.float64)
    scores = [_np_softmax(_np_logits(params, _np_normalize(images[i] * m[..., None])))[target[i]]
              for m in masks]
    expected = np.einsum("n,nhw->hw", scores, masks) / (10 * 0.4)
    np.testing.assert_allclose(saliency[i], expected, rtol=1e-4, atol=1e-6)


def test_scorecam_matches_its_equation():
  """Wang et al. eq. 2: ReLU(sum_k s_k Up(A_k)), s_k the target's softmax score on the input
  masked by the min-max normalised Up(A_k)."""
  params, images, target = _params(), _images(), np.array([1, 2], np.int32)
  saliency = np.asarray(baselines.scorecam(_classifier(params), images, target, None,
                                           baselines.ScoreCAMConfig(chunk_size=3)))
  for i in range(len(images)):
    x = _np_normalize(images[i])
    upsampled = _np_upsample(_np_features(params, x), (SIZE, SIZE))  # [H, W, K]
    total = np.zeros((SIZE, SIZE))
    for k in range(CHANNELS):
      span = upsampled[..., k].max() - upsampled[..., k].min()
      if span == 0:
        continue
      mask = (upsampled[..., k] - upsampled[..., k].min()) / span
      score = _np_softmax(_np_logits(params, x * mask[..., None]))[target[i]]
      total += score * upsampled[..., k]
    np.testing.assert_allclose(saliency[i], np.maximum(total, 0.0), rtol=1e-4, atol=1e-6)


def _ramp_features(params, x):
  """Channel 0: the red channel; channel 1: the green channel times `params["scale"]`."""
  return jnp.stack([x[..., 0], params["scale"] * x[..., 1]], axis=-1)


def _ramp_head(params, features):
  return features.mean(axis=(1, 2)) @ params["w"]


def _ramp_apply(params, x):
  return _ramp_head(params, _ramp_features(params, x))


@pytest.mark.parametrize("scale", [0.01, 1.0])
def test_scorecam_weights_raw_activations(scale):
  """8x8 image, identity normalisation, two channels: a horizontal ramp and a vertical ramp
  times `scale`. The paper's map is s_0 * ramp + s_1 * scale * ramp: rescaling a channel
  changes it (a sum of min-max normalised masks would not)."""
  ramp = np.arange(8, dtype=np.float32) / 7
  image = np.zeros((1, 8, 8, 3), np.float32)
  image[0, :, :, 0] = ramp[None, :]
  image[0, :, :, 1] = ramp[:, None]
  weights = np.array([[4.0, -4.0], [-2.0, 2.0]], np.float32)
  params = {"scale": jnp.float32(scale), "w": jnp.asarray(weights)}
  classifier = Classifier(_ramp_apply, params, mean=(0, 0, 0), std=(1, 1, 1),
                          features_fn=_ramp_features, head_fn=_ramp_head)
  saliency = np.asarray(baselines.scorecam(classifier, image, np.array([0], np.int32)))[0]

  channels = [np.broadcast_to(ramp[None, :], (8, 8)), scale * np.broadcast_to(ramp[:, None], (8, 8))]
  scores = []
  for k, mask in enumerate([channels[0], channels[1] / scale]):  # Min-max normalised maps.
    masked = image[0].astype(np.float64) * mask[..., None]
    features = np.stack([masked[..., 0], scale * masked[..., 1]], axis=-1)
    scores.append(_np_softmax(features.mean(axis=(0, 1)) @ weights)[0])
  expected = np.maximum(scores[0] * channels[0] + scores[1] * channels[1], 0.0)
  np.testing.assert_allclose(saliency, expected, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(saliency[0], scores[0] * ramp, rtol=1e-5, atol=1e-7)  # First row.
  np.testing.assert_allclose(saliency[:, 0], scores[1] * scale * ramp, rtol=1e-5, atol=1e-7)
