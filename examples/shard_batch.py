"""Explain a batch sharded over every device from Python, with `parallel.sharded_explain`.

The batch is split over a 1-D mesh of the devices (`jax.shard_map`) and the classifier's
parameters are replicated; image i gets the key `fold_in(key(seed), i)` whatever the device
count, so each result is the one a single device gives. Without several devices, fake them:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/shard_batch.py
"""

import dataclasses

import numpy as np

import pfc_jax
from pfc_jax import metrics, models, parallel, weights
from pfc_jax.benchmarks import shapes

classifier = models.classifier("shapes_cnn", weights.load("shapes_cnn"))
bench = shapes.generate(8, 32, seed=1)  # 32 px keeps the example quick (trained at 64 px).
keys = parallel.image_keys(0, np.arange(len(bench.images)))

# "fast", shortened; inside shard_map both stages loop over each device's images ("map").
config = pfc_jax.ExplainConfig.preset("fast")
config = dataclasses.replace(
    config, coalitions=dataclasses.replace(config.coalitions, max_steps=100, batching="map"),
    perturb=dataclasses.replace(config.perturb, steps=40, batching="map"))
mesh = parallel.data_mesh()
explanation = parallel.sharded_explain(classifier, bench.images, keys, config, mesh)

mass = metrics.relevance_mass(explanation.saliency, bench.masks)
print(f"{len(bench.images)} images on {mesh.size} devices: saliency {explanation.saliency.shape}, "
      f"mean relevance mass {float(mass.mean()):.3f}")
