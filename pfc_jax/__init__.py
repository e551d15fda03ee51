"""pfc-jax: Perturbation on Feature Coalition (arXiv 2408.13397) saliency maps in JAX/Flax.

The pipeline, one module per stage: `models` and `weights` (classifiers) -> `coalitions`
(step 1) -> `perturbation` (step 2) -> `explain` (both) -> `parallel` / `batch` (devices, hosts,
resumable jobs) -> `metrics` and `baselines` (faithfulness).
"""

from pfc_jax import baselines, data, metrics, models, regions, viz, weights
from pfc_jax.classifier import IMAGENET_MEAN, IMAGENET_STD, Classifier
from pfc_jax.coalitions import CoalitionConfig, Coalitions, extract_coalitions
from pfc_jax.explain import ExplainConfig, Explanation, explain, explain_sweep
from pfc_jax.perturbation import (Hyperparameters, PerturbConfig, Perturbation, objective, perturb,
                                  perturb_sweep)

__all__ = [
    "Classifier",
    "CoalitionConfig",
    "Coalitions",
    "ExplainConfig",
    "Explanation",
    "Hyperparameters",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PerturbConfig",
    "Perturbation",
    "baselines",
    "data",
    "explain",
    "explain_sweep",
    "extract_coalitions",
    "metrics",
    "models",
    "objective",
    "perturb",
    "perturb_sweep",
    "regions",
    "viz",
    "weights",
]
__version__ = "0.2.0"
