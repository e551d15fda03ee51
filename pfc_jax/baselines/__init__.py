"""Saliency baselines with one call shape: `method(classifier, images, target, key, config=None)`.

Every method takes RGB images `[B, H, W, 3] float32` in [0, 1], target classes `[B] int32` and a
PRNG key (used by RISE and LIME only), and returns saliency `[B, H, W] float32`, larger = more
important.
`METHODS` maps the names that `pfc-jax evaluate --methods` accepts to the functions. PFC itself
is `pfc_jax.explain`; `pfc_jax.evaluation` adds it and its ablations by name.

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
}

__all__ = [
    "METHODS",
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
