"""pfc-jax: Perturbation on Feature Coalition (arXiv 2408.13397) saliency maps in JAX/Flax."""

from pfc_jax.classifier import Classifier, IMAGENET_MEAN, IMAGENET_STD

__all__ = ["Classifier", "IMAGENET_MEAN", "IMAGENET_STD"]
__version__ = "0.1.0"
