"""A contrastive PFC objective, built from pfc_jax's public pieces without editing the package.

PFC's objective asks which pixels the predicted class needs. This one asks which pixels tell
the predicted class t from the runner-up c: its confidence term is the two-class
cross-entropy -log p(t) / (p(t) + p(c)) on the perturbed images, so the perturbation may
cover whatever the two classes share. The rest is PFC's: the coalitions
(`extract_coalitions`), the coalition-guided parameterization (`perturbation.noise_scale`),
the blur operator (`perturbation.perturbed_images`), and the mask and consistency terms
(`perturbation.objective`), all with the "fast" preset's settings, optimised with optax's Adam.

Run: python examples/custom_objective.py
"""

import jax
import jax.numpy as jnp
import optax

import pfc_jax
from pfc_jax import metrics, models, perturbation, weights
from pfc_jax.benchmarks import shapes

classifier = models.classifier("shapes_cnn", weights.load("shapes_cnn"))
bench = shapes.generate(2, 64, seed=1)
config = pfc_jax.ExplainConfig.preset("fast")
settings = config.perturb  # Guided w, 10 px blur and no noise, max_w 1, 80 steps at rate 0.2.


def loss(theta, x, labels, target, contrast, key):
  """The contrastive objective of one image: `theta` parameterizes w, `x [H, W, 3]` is the
  normalised image, `labels [H, W]` its coalitions."""
  w = perturbation.noise_scale(settings, theta, x.shape[:2], labels=labels)
  noise = perturbation.sample_noise(settings, key, x.shape)
  perturbed = perturbation.perturbed_images(x, noise, w, settings.max_w,
                                            settings.blur_pixels(*x.shape[:2]))
  pair = jax.nn.log_softmax(classifier(perturbed))[:, jnp.stack([target, contrast])]  # [S, 2]
  contrastive = -jax.nn.log_softmax(pair, axis=-1)[:, 0].mean()
  _, terms = perturbation.objective(w, x, noise, labels, target, classifier, settings)
  return (settings.mask_weight * terms["mask"] + settings.consistency_weight * terms["consistency"]
          + settings.confidence_weight * contrastive)


optimizer = optax.adam(settings.learning_rate)


@jax.jit
def step(theta, opt_state, x, labels, target, contrast, keys):
  values, grads = jax.vmap(jax.value_and_grad(loss))(theta, x, labels, target, contrast, keys)
  updates, opt_state = optimizer.update(grads, opt_state)
  return jnp.clip(optax.apply_updates(theta, updates), 0.0, settings.max_w), opt_state, values


coalitions = pfc_jax.extract_coalitions(bench.images, jax.random.key(0), config.coalitions)
x = classifier.normalize(bench.images)
target, contrast = jnp.argsort(classifier(x), axis=-1)[:, ::-1][:, :2].T  # Top two classes.
theta = jnp.zeros((len(x), *perturbation.parameter_shape(settings, *x.shape[1:3])))
opt_state, keys = optimizer.init(theta), jax.random.split(jax.random.key(1), len(x))
objectives = []
for i in range(settings.steps):
  theta, opt_state, values = step(theta, opt_state, x, coalitions.labels, target, contrast,
                                  jax.vmap(jax.random.fold_in, (0, None))(keys, i))
  objectives.append(values)

w = jax.vmap(lambda t, l: perturbation.noise_scale(settings, t, x.shape[1:3], labels=l))(
    theta, coalitions.labels)
saliency = jax.vmap(perturbation.saliency_map)(w)
mass = metrics.relevance_mass(saliency, bench.masks)
names = models.class_names("shapes_cnn")
for i in range(len(x)):
  print(f"image {i}: {names[target[i]]} rather than {names[contrast[i]]}: objective "
        f"{float(objectives[0][i]):.3f} -> {float(objectives[-1][i]):.3f}, relevance mass "
        f"{float(mass[i]):.3f}")
