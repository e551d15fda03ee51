"""The PFC pipeline: feature coalitions, then coalition-guided perturbation (arXiv 2408.13397).

Example:
  >>> config = ExplainConfig.preset("fast")
  >>> explanation = explain(classifier, images, jax.random.key(0), config)
  >>> explanation.saliency.shape  # [B, H, W]
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple, Sequence

import jax

from pfc_jax import _inputs
from pfc_jax.classifier import Classifier, check_classifier
from pfc_jax.coalitions import CoalitionConfig, extract_coalitions
from pfc_jax.perturbation import PerturbConfig, perturb, perturb_sweep

PRESETS = ("paper", "full", "fast", "tiny")
# Settings of how a config is run, not of what it computes: the same results under any value, up
# to float rounding (`pfc_jax._loop`), so evaluation records and batch jobs stay valid, and
# resume, when they change.
EXECUTION_FIELDS = ("driver", "batching", "compute_batch", "noise_chunk")
# The preset of `explain`, `parallel.sharded_explain` and `batch.run_job` called without a config
# (the command line's default too); `ExplainConfig()` itself is the "paper" preset.
DEFAULT_PRESET = "fast"

# The perturbation of "fast" and "full", chosen on the tuning split (docs/faithfulness.md): w
# smooth inside each coalition (`guided`), a covered pixel blurred (10 px, no noise, so one
# sample per step computes the objective exactly) up to max_w = 1, the target's cross-entropy as
# the confidence term, and the mean of the preservation and the dual game's maps. The objectives
# tried before it are `pfc-jax evaluate` configs (`pfc_jax.evaluation.EARLIER_OBJECTIVES`).
_FAST_PERTURBATION = PerturbConfig(
    parameterization="guided", blur_sigma=10.0, noise_std=0.0, noise_samples=1, max_w=1.0,
    confidence="log_softmax", confidence_weight=3.0, deletion_weight=10.0,
    with_preservation_game=True, steps=80, learning_rate=0.2)


@dataclasses.dataclass(frozen=True)
class ExplainConfig:
  """Settings of both PFC stages. The defaults are the "paper" preset.

  Attributes:
    coalitions: Feature coalition network and its training. Default `CoalitionConfig()`.
    perturb: Perturbation objective and its optimisation; its `max_coalitions` must be at least
      `coalitions.num_channels`. Default `PerturbConfig()`.
  """

  coalitions: CoalitionConfig = CoalitionConfig()
  perturb: PerturbConfig = PerturbConfig()

  def __post_init__(self):
    if not isinstance(self.coalitions, CoalitionConfig):
      raise ValueError(
          f"`coalitions` must be a CoalitionConfig, got {type(self.coalitions).__name__}.")
    if not isinstance(self.perturb, PerturbConfig):
      raise ValueError(f"`perturb` must be a PerturbConfig, got {type(self.perturb).__name__}.")
    if self.perturb.max_coalitions < self.coalitions.num_channels:
      raise ValueError(
          f"`perturb.max_coalitions` ({self.perturb.max_coalitions}) must be at least "
          f"`coalitions.num_channels` ({self.coalitions.num_channels}), the most coalitions an "
          "image can get.")

  @classmethod
  def preset(cls, name: str) -> ExplainConfig:
    """A named configuration.

    Costs are per 224 px photo with SqueezeNet 1.1 (docs/performance.md); what each achieves
    on held-out data is in docs/faithfulness.md.

    - "fast": the recommended preset, and the command line's default. Cheap coalitions
      (`CoalitionConfig.fast()`: frozen random backbone at short side 64, at most 300 steps),
      then two games of 80 Adam steps at learning rate 0.2: w smooth inside each coalition
      (`parameterization="guided"`) blurs what it covers (`blur_sigma=10`, no noise, so one
      sample per step) up to `max_w=1` under the target's cross-entropy (weight 3); the map is
      the mean of the preservation game's and of the dual game's (`deletion_weight=10`,
      `with_preservation_game=True`). About 19 s on 2 idle CPU cores (`python
      scripts/benchmark.py --model squeezenet1_1 --weights W --size 224 --preset fast --images
      DIR`); on 125 held-out photos it beats the gradient, CAM, occlusion and RISE baselines on
      insertion and ROAD.
    - "full": the paper's coalition stage (randomly initialised network, up to 500 steps), then
      the perturbation of "fast" (500 steps, at learning rate 5e-2 or 0.2, were no better on the
      tuning data: docs/faithfulness.md). About 3 h on the CPU, for accelerators.
    - "paper": the literal published method end to end: the coalition stage of "full", then 500
      Adam steps with S = 16 noise samples, per-pixel w up to 1 and the published consistency
      loss (the authors' demo defaults, `PerturbConfig()`). About 3 h on the CPU
      (`scripts/benchmark.py --preset paper --max-steps 3`, scaled); the authors report 90 s +
      97 s per image on one GPU.
    - "tiny": a few steps of a narrow network, for tests and smoke runs; no meaningful maps.

    Raises:
      ValueError: for an unknown name.
    """
    if name == "paper":
      return cls(CoalitionConfig(init="random"), PerturbConfig())
    if name == "full":
      return cls(CoalitionConfig(init="random"), _FAST_PERTURBATION)
    if name == "fast":
      return cls(CoalitionConfig.fast(), _FAST_PERTURBATION)
    if name == "tiny":
      coalitions = CoalitionConfig.tiny()
      return cls(coalitions, PerturbConfig(steps=3, noise_samples=2, learning_rate=0.1,
                                           max_coalitions=coalitions.num_channels))
    raise ValueError(f"Unknown preset `name` {name!r}; choose from {PRESETS}.")


class Explanation(NamedTuple):
  """PFC's explanation of a batch of B images.

  Attributes:
    saliency: `[B, H, W] float32` 1 - mean over channels of w: high where the classifier
      tolerates little noise (not normalised; `pfc_jax.metrics` min-max normalises). With
      `PerturbConfig.with_preservation_game` (the "fast" and "full" presets): the mean of the
      two games' maps, each min-max normalised, in [0, 1].
    labels: `[B, H, W] int32` feature coalition of each pixel, 0..num_coalitions-1.
    num_coalitions: `[B] int32` coalitions per image.
    target: `[B] int32` explained class: the classifier's prediction on the clean image.
    probs: `[B] float32` softmax probability of `target` on the clean image.
    w: `[B, H, W, 3] float32` optimised noise scale in the classifier's input space.
  """

  saliency: jax.Array
  labels: jax.Array
  num_coalitions: jax.Array
  target: jax.Array
  probs: jax.Array
  w: jax.Array


def stage_keys(keys: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-image keys `[B]` -> `(coalition keys [B], perturbation keys [B])`, each image's key
  folded with 0 and with 1, as `explain` and `explain_sweep` use them."""
  return tuple(jax.vmap(jax.random.fold_in, (0, None))(keys, stage) for stage in (0, 1))


def resolve_config(config: ExplainConfig | None) -> ExplainConfig:
  """`config`, or `ExplainConfig.preset(DEFAULT_PRESET)` ("fast") for None.

  Raises:
    ValueError: when `config` is neither None nor an `ExplainConfig`.
  """
  if config is None:
    return ExplainConfig.preset(DEFAULT_PRESET)
  if not isinstance(config, ExplainConfig):
    raise ValueError(f"`config` must be an ExplainConfig, got {type(config).__name__}.")
  return config


def _coalitions_and_perturb_keys(classifier, images, key, config: ExplainConfig, vgg_params: Any):
  config = resolve_config(config)
  images = _inputs.check_images(images)
  check_classifier(classifier, images)  # Before the coalition stage, which does not use it.
  coalition_keys, perturb_keys = stage_keys(_inputs.per_image_keys(key, images.shape[0]))
  return (config, images, extract_coalitions(images, coalition_keys, config.coalitions, vgg_params),
          perturb_keys)


def explain(classifier: Classifier, images, key, config: ExplainConfig | None = None,
            vgg_params: Any = None) -> Explanation:
  """Explains each image's predicted class with PFC.

  Image i's result depends only on image i, its key and `config`, not on the rest of the
  batch. Its key is folded with 0 for the coalition stage and with 1 for the perturbation.

  Args:
    classifier: The model explained.
    images: `[B, H, W, 3] float32` RGB in [0, 1].
    key: One PRNG key (split into B per-image keys) or `[B]` keys.
    config: Both stages' settings; default `ExplainConfig.preset(DEFAULT_PRESET)` ("fast").
    vgg_params: VGG16 variables, needed with `config.coalitions.init == "vgg16"`.

  Returns:
    An `Explanation`.

  Raises:
    ValueError: for malformed images, key, config or vgg_params, or a classifier whose
      `apply_fn` does not return logits `[B, C]` (`pfc_jax.classifier.check_classifier`).
  """
  config, images, coalitions, perturb_keys = _coalitions_and_perturb_keys(
      classifier, images, key, config, vgg_params)
  result = perturb(classifier, images, coalitions.labels, perturb_keys, config.perturb)
  return Explanation(saliency=result.saliency, labels=coalitions.labels,
                     num_coalitions=coalitions.num, target=result.target, probs=result.probs,
                     w=result.w)


def explain_sweep(classifier: Classifier, images, key, config: ExplainConfig,
                  settings: Mapping[str, Sequence[float]], vgg_params: Any = None) -> Explanation:
  """`explain` under K perturbation-objective settings: coalitions once, then one compiled,
  perturbation of K x B problems (`pfc_jax.perturbation.perturb_sweep`).

  Member k equals `explain` with `config.perturb` replaced by setting k (image i keeps its key).

  Args:
    classifier, images, key, config, vgg_params: As for `explain`.
    settings: `{field: [K values]}` for fields in `pfc_jax.perturbation.SWEEPABLE` (loss
      weights, sigma, max_w, learning_rate).

  Returns:
    An `Explanation` whose `saliency [K, B, H, W]` and `w [K, B, H, W, 3]` have a leading
    setting axis; labels, num_coalitions, target and probs are per image as in `explain`.

  Raises:
    ValueError: for malformed inputs, config or settings.
  """
  config, images, coalitions, perturb_keys = _coalitions_and_perturb_keys(
      classifier, images, key, config, vgg_params)
  result = perturb_sweep(classifier, images, coalitions.labels, perturb_keys, config.perturb,
                         settings)
  return Explanation(saliency=result.saliency, labels=coalitions.labels,
                     num_coalitions=coalitions.num, target=result.target[0],
                     probs=result.probs[0], w=result.w)
