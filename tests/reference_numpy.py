"""Independent NCHW forward passes in numpy, on torchvision state dicts.

Written from torchvision's model definitions (`vgg16`, `squeezenet1_1`) and PyTorch's operator
semantics; shares no code with pfc_jax so that parity tests compare two implementations.
"""

from __future__ import annotations

import math

import numpy as np

# torchvision vgg16: `features` indices of the convolutions and their (in, out) channels.
VGG16_CONVS = ((0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256),
               (12, 256, 256), (14, 256, 256), (17, 256, 512), (19, 512, 512), (21, 512, 512),
               (24, 512, 512), (26, 512, 512), (28, 512, 512))
VGG16_POOLS_AFTER = (2, 7, 14, 21, 28)  # Max pools follow these convolutions.
VGG16_LINEARS = ((0, 25088, 4096), (3, 4096, 4096), (6, 4096, 1000))

# torchvision squeezenet1_1: Fire modules (features index, in, squeeze, expand per branch).
SQUEEZENET_FIRES = ((3, 64, 16, 64), (4, 128, 16, 64), (6, 128, 32, 128), (7, 256, 32, 128),
                    (9, 256, 48, 192), (10, 384, 48, 192), (11, 384, 64, 256),
                    (12, 512, 64, 256))
SQUEEZENET_POOLS_BEFORE = (3, 6, 9)


def _he(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
  return rng.standard_normal(shape, np.float32) * np.float32(math.sqrt(2.0 / fan_in))


def _small(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
  return rng.standard_normal(shape, np.float32) * np.float32(0.05)


def vgg16_state_dict(seed: int) -> dict[str, np.ndarray]:
  """Random torchvision-layout VGG16 weights (He-scaled so activations stay near 1)."""
  rng = np.random.default_rng(seed)
  state = {}
  for index, cin, cout in VGG16_CONVS:
    state[f"features.{index}.weight"] = _he(rng, (cout, cin, 3, 3), 9 * cin)
    state[f"features.{index}.bias"] = _small(rng, (cout,))
  for index, fin, fout in VGG16_LINEARS:
    state[f"classifier.{index}.weight"] = _he(rng, (fout, fin), fin)
    state[f"classifier.{index}.bias"] = _small(rng, (fout,))
  return state


def squeezenet1_1_state_dict(seed: int) -> dict[str, np.ndarray]:
  """Random torchvision-layout SqueezeNet 1.1 weights."""
  rng = np.random.default_rng(seed)

  def conv(prefix, cin, cout, k):
    state[f"{prefix}.weight"] = _he(rng, (cout, cin, k, k), cin * k * k)
    state[f"{prefix}.bias"] = _small(rng, (cout,))

  state = {}
  conv("features.0", 3, 64, 3)
  for index, cin, squeeze, expand in SQUEEZENET_FIRES:
    conv(f"features.{index}.squeeze", cin, squeeze, 1)
    conv(f"features.{index}.expand1x1", squeeze, expand, 1)
    conv(f"features.{index}.expand3x3", squeeze, expand, 3)
  conv("classifier.1", 512, 1000, 1)
  return state


def conv2d(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, stride: int = 1,
           padding: int = 0) -> np.ndarray:
  """`torch.nn.functional.conv2d`: x `[N, C, H, W]`, weight `[O, C, kh, kw]` -> `[N, O, h, w]`."""
  n, c, _, _ = x.shape
  out_channels, _, kh, kw = weight.shape
  x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
  windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))
  windows = windows[:, :, ::stride, ::stride]  # [N, C, h, w, kh, kw]
  h, w = windows.shape[2:4]
  columns = windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * h * w, c * kh * kw)
  out = columns @ weight.reshape(out_channels, -1).T + bias
  return out.reshape(n, h, w, out_channels).transpose(0, 3, 1, 2)


def relu(x: np.ndarray) -> np.ndarray:
  return np.maximum(x, 0)


def max_pool2d(x: np.ndarray, kernel: int, stride: int, ceil_mode: bool = False) -> np.ndarray:
  """`torch.nn.functional.max_pool2d` without padding, by explicit windows."""

  def out_size(size):
    out = (math.ceil if ceil_mode else math.floor)((size - kernel) / stride) + 1
    if ceil_mode and (out - 1) * stride >= size:
      out -= 1
    return out

  height, width = x.shape[2:]
  out = np.empty(x.shape[:2] + (out_size(height), out_size(width)), x.dtype)
  for i in range(out.shape[2]):
    for j in range(out.shape[3]):
      window = x[:, :, i * stride:i * stride + kernel, j * stride:j * stride + kernel]
      out[:, :, i, j] = window.max(axis=(2, 3))
  return out


def adaptive_avg_pool2d(x: np.ndarray, size: int) -> np.ndarray:
  """`torch.nn.functional.adaptive_avg_pool2d` to `size x size`, by explicit bins."""
  height, width = x.shape[2:]
  out = np.empty(x.shape[:2] + (size, size), x.dtype)
  for i in range(size):
    top, bottom = math.floor(i * height / size), math.ceil((i + 1) * height / size)
    for j in range(size):
      left, right = math.floor(j * width / size), math.ceil((j + 1) * width / size)
      out[:, :, i, j] = x[:, :, top:bottom, left:right].mean(axis=(2, 3))
  return out


def vgg16(state: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
  """torchvision `vgg16` in eval mode: normalised `[N, 3, H, W]` -> logits `[N, 1000]`."""
  for index, _, _ in VGG16_CONVS:
    x = relu(conv2d(x, state[f"features.{index}.weight"], state[f"features.{index}.bias"],
                    padding=1))
    if index in VGG16_POOLS_AFTER:
      x = max_pool2d(x, 2, 2)
  x = adaptive_avg_pool2d(x, 7).reshape(x.shape[0], -1)
  for index, _, _ in VGG16_LINEARS:
    x = x @ state[f"classifier.{index}.weight"].T + state[f"classifier.{index}.bias"]
    if index != VGG16_LINEARS[-1][0]:
      x = relu(x)
  return x


def squeezenet1_1(state: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
  """torchvision `squeezenet1_1` in eval mode: normalised `[N, 3, H, W]` -> `[N, 1000]`."""

  def conv(prefix, x, padding=0, stride=1):
    return relu(conv2d(x, state[f"{prefix}.weight"], state[f"{prefix}.bias"], stride, padding))

  x = conv("features.0", x, stride=2)
  for index, _, _, _ in SQUEEZENET_FIRES:
    if index in SQUEEZENET_POOLS_BEFORE:
      x = max_pool2d(x, 3, 2, ceil_mode=True)
    s = conv(f"features.{index}.squeeze", x)
    x = np.concatenate([conv(f"features.{index}.expand1x1", s),
                        conv(f"features.{index}.expand3x3", s, padding=1)], axis=1)
  x = conv("classifier.1", x)
  return x.mean(axis=(2, 3))


def relative_difference(actual: np.ndarray, reference: np.ndarray) -> float:
  """max |actual - reference| / max |reference|."""
  return float(np.max(np.abs(actual - reference)) / np.max(np.abs(reference)))


# ROAD's noisy linear imputation (Rong et al., ICML 2022; `NoisyLinearImputer` of their code):
# neighbour offsets and weights, 1/6 direct and 1/12 diagonal.
ROAD_NEIGHBOURS = (((1, 1), 1 / 12), ((0, 1), 1 / 6), ((-1, 1), 1 / 12), ((1, -1), 1 / 12),
                   ((0, -1), 1 / 6), ((-1, -1), 1 / 12), ((1, 0), 1 / 6), ((-1, 0), 1 / 6))


def road_linear_imputation(image: np.ndarray, removed: np.ndarray) -> np.ndarray:
  """Noise-free ROAD imputation of `image [H, W, C]` where `removed [H, W]`, by `spsolve`.

  The reference code's sparse system: for removed pixel i,
  `sum_j w_ij (x_j - x_i) = 0` over its in-bounds neighbours j, kept x_j taken from the image.
  """
  import scipy.sparse  # pylint: disable=import-outside-toplevel
  import scipy.sparse.linalg  # pylint: disable=import-outside-toplevel

  height, width, channels = image.shape
  unknown = np.flatnonzero(removed.ravel())
  variable = np.full(height * width, -1)
  variable[unknown] = np.arange(len(unknown))
  flat = image.reshape(-1, channels).astype(np.float64)
  matrix = scipy.sparse.lil_matrix((len(unknown), len(unknown)))
  rhs = np.zeros((len(unknown), channels))
  for row, index in enumerate(unknown):
    y, x = divmod(index, width)
    total = 0.0
    for (dy, dx), weight in ROAD_NEIGHBOURS:
      if not (0 <= y + dy < height and 0 <= x + dx < width):
        continue
      total += weight
      neighbour = (y + dy) * width + x + dx
      if variable[neighbour] >= 0:
        matrix[row, variable[neighbour]] = weight
      else:
        rhs[row] -= weight * flat[neighbour]
    matrix[row, row] = -total
  out = flat.copy()
  out[unknown] = scipy.sparse.linalg.spsolve(matrix.tocsc(), rhs).reshape(len(unknown), channels)
  return out.reshape(height, width, channels)
