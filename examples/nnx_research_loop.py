"""Explain a Flax NNX model while it trains: one jit-compiled PFC call every few steps.

Trains a small NNX CNN on the shapes benchmark and, every `EVERY` steps, explains a fixed
batch of held-out images with a jit-compiled `pfc_jax.explain`, printing the share of each map
that falls on the object (relevance mass; the benchmark knows where the object is). `Classifier.from_nnx` hands the
model's current state to the compiled function; the model's graph does not change while it
trains, so every explanation reuses the first compilation.

Run: python examples/nnx_research_loop.py
"""

import dataclasses
import functools

import jax
import optax
from flax import nnx

import pfc_jax
from pfc_jax import metrics, parallel
from pfc_jax.benchmarks import shapes

SIZE, BATCH, STEPS, EVERY = 32, 32, 150, 50
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


class CNN(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(3, 16, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(16, 32, (3, 3), rngs=rngs)
    self.fc = nnx.Linear(32, len(shapes.CLASS_NAMES), rngs=rngs)

  def __call__(self, x):  # normalised [B, H, W, 3] -> logits [B, 4]
    x = nnx.max_pool(nnx.relu(self.conv1(x)), (2, 2), strides=(2, 2))
    return self.fc(nnx.relu(self.conv2(x)).max(axis=(1, 2)))


@nnx.jit
def train_step(model, optimizer, images01, labels):
  def loss_fn(model):
    logits = model((images01 - 0.5) / 0.25)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


# PFC's "fast" preset, shortened for a monitor run while training, with both stages as compiled
# loops over the batch ("vmap"), so that the whole of `explain` traces into one jit.
config = pfc_jax.ExplainConfig.preset("fast")
config = parallel.traceable_config(dataclasses.replace(
    config, coalitions=dataclasses.replace(config.coalitions, max_steps=100, batching="vmap"),
    perturb=dataclasses.replace(config.perturb, steps=40, batching="vmap")))
explain = jax.jit(functools.partial(pfc_jax.explain, config=config))

train = shapes.generate(16 * BATCH, SIZE, seed=0)
probe = shapes.generate(4, SIZE, seed=1)  # Held-out images, explained every EVERY steps.
model = CNN(nnx.Rngs(0))
optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
for step in range(1, STEPS + 1):
  batch = slice((step - 1) % 16 * BATCH, ((step - 1) % 16 + 1) * BATCH)
  loss = train_step(model, optimizer, train.images[batch], train.labels[batch])
  if step % EVERY == 0:
    classifier = pfc_jax.Classifier.from_nnx(model, mean=MEAN, std=STD)
    explanation = explain(classifier, probe.images, jax.random.key(step))
    correct = int((explanation.target == probe.labels).sum())
    mass = float(metrics.relevance_mass(explanation.saliency, probe.masks).mean())
    print(f"step {step}: loss {float(loss):.3f}, probe {correct}/4 classified correctly, "
          f"relevance mass {mass:.3f}, explain compilations {explain._cache_size()}")  # pylint: disable=protected-access
