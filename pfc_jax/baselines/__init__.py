"""Saliency baselines with one call shape: `method(classifier, images, target, key, config=None)`.

Every method takes RGB images `[B, H, W, 3] float32` in [0, 1], target classes `[B] int32` and a
PRNG key (used by RISE and LIME only), and returns saliency `[B, H, W] float32`, larger = more
important.
`METHODS` maps the names that `pfc-jax evaluate --methods` accepts to the functions. PFC itself
is `pfc_jax.explain`; `pfc_jax.evaluation` adds it and its ablations by name.

Some methods read more of the classifier than its logits (`CLASSIFIER_FIELDS`, checked by
`applicable`): Grad-CAM and Score-CAM its `features_fn`/`head_fn` split, attention rollout the
attention weights of a transformer (`attention_fn`); on a classifier without them they raise
ValueError, and `pfc_jax.evaluation.evaluate` refuses them before running anything.

`xrai`, `lime` and `lime_coalitions` run on optional packages, imported when called: without
them they raise ImportError naming the extra (`pip install 'pfc-jax[xrai]'`, `'pfc-jax[lime]'`).
"""

from pfc_jax.baselines.attention_rollout import AttentionRolloutConfig, attention_rollout
from pfc_jax.baselines.extremal import ExtremalPerturbationConfig, extremal_perturbation
from pfc_jax.baselines.gradcam import GradCAMConfig, gradcam
from pfc_jax.baselines.integrated_gradients import IntegratedGradientsConfig, integrated_gradients
from pfc_jax.baselines.lime import LIMEConfig, QuickshiftConfig, lime, lime_coalitions
from pfc_jax.baselines.occlusion import OcclusionConfig, occlusion
from pfc_jax.baselines.rise import RISEConfig, rise
from pfc_jax.baselines.scorecam import ScoreCAMConfig, scorecam
from pfc_jax.baselines.xrai import XRAIConfig, xrai
from pfc_jax.classifier import Classifier

METHODS = {
    "gradcam": gradcam,
    "scorecam": scorecam,
    "integrated_gradients": integrated_gradients,
    "occlusion": occlusion,
    "rise": rise,
    "xrai": xrai,
    "lime": lime,
    "lime_coalitions": lime_coalitions,
    "extremal_perturbation": extremal_perturbation,
    "attention_rollout": attention_rollout,
}
# The `Classifier` fields each method reads beyond `apply_fn`; methods not named need none.
CLASSIFIER_FIELDS = {
    "gradcam": ("features_fn", "head_fn"),
    "scorecam": ("features_fn", "head_fn"),
    "attention_rollout": ("attention_fn",),
}


def applicable(name: str, classifier: Classifier) -> bool:
  """Whether method `name` (a key of `METHODS`) can explain `classifier`: whether the classifier
  has every field of `CLASSIFIER_FIELDS[name]` (attention rollout needs a transformer's
  `attention_fn`; Grad-CAM and Score-CAM a `features_fn`/`head_fn` split).

  Raises:
    ValueError: for a `name` that is not a key of `METHODS`.
  """
  if name not in METHODS:
    raise ValueError(f"Unknown method `name` {name!r}; choose from {sorted(METHODS)}.")
  return all(getattr(classifier, field) is not None for field in CLASSIFIER_FIELDS.get(name, ()))


__all__ = [
    "METHODS", "CLASSIFIER_FIELDS", "applicable",
    "GradCAMConfig", "gradcam",
    "ScoreCAMConfig", "scorecam",
    "IntegratedGradientsConfig", "integrated_gradients",
    "OcclusionConfig", "occlusion",
    "RISEConfig", "rise",
    "XRAIConfig", "xrai",
    "LIMEConfig", "QuickshiftConfig", "lime", "lime_coalitions",
    "ExtremalPerturbationConfig", "extremal_perturbation",
    "AttentionRolloutConfig", "attention_rollout",
]
