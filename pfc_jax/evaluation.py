"""Runs saliency methods on a set of images, scores them with every metric, and reports the means.

Protocol (Grad-CAM++, RISE): each method explains the class the model predicts on the clean image.
Images go through in batches, each batch through every method; image `i` gets the PRNG key
`fold_in(key(seed), first_index + i)`, so results do not depend on the batch size or on which
slice of a data set is evaluated. With a records file (`RecordLog`), every batch's per-image
scores are appended as soon as they exist, and a rerun skips what the file already holds.

Method names: the baselines' names (`pfc_jax.baselines.METHODS`), and `pfc` followed by optional
`-`-separated modifiers that edit the PFC preset's `ExplainConfig`:

- consistency: `published` | `coalition` | `off` (`PerturbConfig.consistency`);
- coalition network init: `random` | `vgg16init` (`CoalitionConfig.init`; `vgg16init` needs VGG16
  weights);
- preset: `tiny` | `fast` | `paper` (replaces the evaluation's preset for this method).

For example `pfc`, `pfc-coalition`, `pfc-off`, `pfc-vgg16init`, `pfc-coalition-paper`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from pfc_jax import baselines, io, metrics
from pfc_jax._inputs import check_images
from pfc_jax.classifier import Classifier
from pfc_jax.explain import ExplainConfig, explain

DEFAULT_METHODS = ("pfc", "gradcam", "scorecam", "integrated_gradients", "occlusion", "rise")
PFC_MODIFIERS = {
    "published": ("perturb", "consistency", "published"),
    "coalition": ("perturb", "consistency", "coalition"),
    "off": ("perturb", "consistency", "off"),
    "random": ("coalitions", "init", "random"),
    "vgg16init": ("coalitions", "init", "vgg16"),
}
PRESETS = ("tiny", "fast", "paper")  # Those of `ExplainConfig.preset`.
# Baseline configs of the "tiny" preset (tests and smoke runs); other presets use the defaults.
TINY_BASELINES = {
    "integrated_gradients": baselines.IntegratedGradientsConfig(num_steps=4, chunk_size=4),
    "occlusion": baselines.OcclusionConfig(patch_size=16, stride=16),
    "rise": baselines.RISEConfig(num_masks=64, chunk_size=32),
}

# (report key, column title, scale, format) in table order; percentages are scaled by 100.
COLUMNS = (
    ("average_drop", "Avg drop % (lower)", 100.0, ".2f"),
    ("increase_in_confidence", "Incr. conf. % (higher)", 100.0, ".2f"),
    ("deletion_auc", "Deletion AUC (lower)", 1.0, ".3f"),
    ("insertion_auc", "Insertion AUC (higher)", 1.0, ".3f"),
    ("pointing_game", "Pointing game % (higher)", 100.0, ".1f"),
    ("relevance_mass", "Relevance mass (higher)", 1.0, ".3f"),
    ("seconds_per_image", "s / image", 1.0, ".3g"),
)

Method = Callable[[Classifier, jax.Array, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class EvaluationConfig:
  """What `evaluate` runs and how.

  Attributes:
    methods: Method names (see the module docstring); default every baseline and `pfc`.
    preset: `ExplainConfig` preset for the PFC methods: "tiny", "fast" (default) or "paper".
      "tiny" also shrinks the baselines (`TINY_BASELINES`); otherwise they run their defaults.
    batch_size: Images per call of a method and of the metrics; default 4.
    seed: Seed of the per-image PRNG keys; default 0.
    curve_steps: Steps of the deletion and insertion curves; default 32.
    pointing_tolerance: Pointing-game tolerance in pixels; default 15.
  """
  methods: tuple[str, ...] = DEFAULT_METHODS
  preset: str = "fast"
  batch_size: int = 4
  seed: int = 0
  curve_steps: int = metrics.DELETION_STEPS
  pointing_tolerance: float = metrics.POINTING_TOLERANCE

  def __post_init__(self):
    object.__setattr__(self, "methods", tuple(self.methods))
    if self.preset not in PRESETS:
      raise ValueError(f"`preset` must be one of {PRESETS}, got {self.preset!r}.")
    if not self.methods:
      raise ValueError("`methods` must name at least one method.")
    for name in self.methods:
      method_spec(name, self.preset)
    if self.batch_size < 1 or self.curve_steps < 1:
      raise ValueError(
          f"`batch_size` and `curve_steps` must be >= 1, got {self.batch_size} and {self.curve_steps}.")


def method_spec(name: str, preset: str) -> tuple[str, Any]:
  """Parses a method name into `(baseline name, None)` or `("pfc", ExplainConfig)`.

  Raises:
    ValueError: for an unknown method or PFC modifier, or two modifiers of one kind.
  """
  if name in baselines.METHODS:
    return name, None
  head, *modifiers = name.split("-")
  if head != "pfc":
    raise ValueError(
        f"Unknown method {name!r}; choose from pfc[-modifiers] or {sorted(baselines.METHODS)}.")
  presets = [m for m in modifiers if m in PRESETS]
  edits = [m for m in modifiers if m not in PRESETS]
  unknown = [m for m in edits if m not in PFC_MODIFIERS]
  fields = [PFC_MODIFIERS[m][:2] for m in edits if m in PFC_MODIFIERS]
  if unknown or len(presets) > 1 or len(set(fields)) != len(fields):
    raise ValueError(
        f"Bad PFC method {name!r}: modifiers are one preset of {PRESETS} and at most one of each "
        f"kind from {sorted(PFC_MODIFIERS)}.")
  config = ExplainConfig.preset(presets[0] if presets else preset)
  for modifier in edits:
    part, field, value = PFC_MODIFIERS[modifier]
    config = dataclasses.replace(
        config, **{part: dataclasses.replace(getattr(config, part), **{field: value})})
  return "pfc", config


def needs_vgg_params(config: EvaluationConfig) -> bool:
  """Whether a PFC method of `config` initialises its coalition network from VGG16."""
  specs = [method_spec(name, config.preset)[1] for name in config.methods]
  return any(spec is not None and spec.coalitions.init == "vgg16" for spec in specs)


def method_function(name: str, preset: str, vgg_params: Any = None) -> Method:
  """The saliency function `(classifier, images, target, keys) -> [B, H, W]` of method `name`."""
  kind, config = method_spec(name, preset)
  if kind != "pfc":
    return functools.partial(
        baselines.METHODS[kind], config=TINY_BASELINES.get(kind) if preset == "tiny" else None)
  return functools.partial(_pfc_saliency, config=config, vgg_params=vgg_params)


def _pfc_saliency(classifier: Classifier, images: jax.Array, target: jax.Array, key: jax.Array, *,
                  config: Any, vgg_params: Any) -> jax.Array:
  """PFC saliency; PFC explains the predicted class itself, which is `target` by protocol."""
  del target
  return explain(classifier, images, key, config, vgg_params=vgg_params).saliency


def read_records(path: str | os.PathLike) -> tuple[dict[str, Any], dict[tuple[str, int], dict[str, Any]], bool]:
  """Reads a records file (see `RecordLog`).

  Returns:
    `(settings, {(method, index): record}, torn)`, `torn` when the last line was cut off by an
    interrupted write (that line is dropped).

  Raises:
    ValueError: naming `path` when it lacks the settings line or a line before the last is not JSON.
  """
  lines = Path(path).read_text().splitlines()
  try:
    settings = json.loads(lines[0])["settings"]
  except (json.JSONDecodeError, KeyError, TypeError, IndexError) as e:
    raise ValueError(f"Records file {str(path)!r} does not start with a settings line.") from e
  records = {}
  for number, line in enumerate(lines[1:], start=2):
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      if number == len(lines):
        return settings, records, True
      raise ValueError(f"Records file {str(path)!r}: line {number} is not JSON.") from None
    records[(record["method"], record["index"])] = record
  return settings, records, False


class RecordLog:
  """Per-image scores in a JSON-lines file, appended as they are computed.

  Line 1 is `{"settings": {...}}`; each further line is one record `{"method", "index",
  <metric>: float, ..., "seconds"}`, `index` counting from the start of the data set. A truncated
  last line (an interrupted write) is dropped.

  Args:
    path: The file; created with its folder when missing.
    settings: JSON-ready values that determine the scores. An existing file must hold the same.

  Raises:
    ValueError: naming `path` and the differing settings when the file was written with others.
  """

  def __init__(self, path: str | os.PathLike, settings: dict[str, Any]):
    self.path = Path(path)
    settings = json.loads(json.dumps(settings))
    self.records: dict[tuple[str, int], dict[str, Any]] = {}
    if not self.path.exists() or self.path.stat().st_size == 0:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      self._write_lines([{"settings": settings}], mode="w")
      return
    found, self.records, torn = read_records(self.path)
    if found != settings:
      differ = sorted(k for k in set(found) | set(settings) if found.get(k) != settings.get(k))
      raise ValueError(
          f"Records file {str(self.path)!r} was written with other settings ({', '.join(differ)}); "
          "delete it or choose another output.")
    if torn:  # Drop the torn last line (atomically), so that appends start on a fresh line.
      kept = self.path.read_text().splitlines()[:-1]
      io.write_bytes(self.path, "".join(line + "\n" for line in kept).encode())

  def append(self, records: list[dict[str, Any]]) -> None:
    """Adds `records` to the file (flushed to disk) and to `self.records`."""
    self._write_lines(records, mode="a")
    self.records.update({(r["method"], r["index"]): r for r in records})

  def _write_lines(self, objects: list[dict[str, Any]], mode: str) -> None:
    with open(self.path, mode) as f:
      f.writelines(json.dumps(obj) + "\n" for obj in objects)
      f.flush()
      os.fsync(f.fileno())


@jax.jit
def _predictions(classifier: Classifier, images: jax.Array) -> jax.Array:
  return jnp.argmax(classifier.logits(images), axis=-1).astype(jnp.int32)


def _batches(count: int, batch_size: int) -> list[tuple[np.ndarray, int]]:
  """`(indices [min(batch_size, count)], number of real images)` per batch.

  The last batch is padded by repeating the last image, so that every batch has one shape and
  every jitted function compiles once.
  """
  size = min(batch_size, count)
  return [(np.minimum(np.arange(start, start + size), count - 1), min(size, count - start))
          for start in range(0, count, size)]


def _score_batch(classifier: Classifier, images: jax.Array, saliency: jax.Array, target: jax.Array,
                 masks: np.ndarray | None, config: EvaluationConfig) -> dict[str, np.ndarray]:
  scores = {
      "average_drop": metrics.average_drop(classifier, images, saliency, target),
      "increase_in_confidence": metrics.increase_in_confidence(classifier, images, saliency, target),
      "deletion_auc": metrics.deletion_auc(
          classifier, images, saliency, target, num_steps=config.curve_steps),
      "insertion_auc": metrics.insertion_auc(
          classifier, images, saliency, target, num_steps=config.curve_steps),
  }
  if masks is not None:
    scores["pointing_game"] = metrics.pointing_game(saliency, masks, config.pointing_tolerance)
    scores["relevance_mass"] = metrics.relevance_mass(saliency, masks)
  return {k: np.asarray(v) for k, v in scores.items()}


def evaluate(classifier: Classifier, images, config: EvaluationConfig | None = None, *,
             labels=None, masks=None, model: str = "", vgg_params: Any = None,
             first_index: int = 0, records: str | os.PathLike | None = None,
             settings: dict[str, Any] | None = None, progress: bool = True) -> dict[str, Any]:
  """Runs every method of `config` on `images` and averages every metric.

  Args:
    classifier: The classifier to explain.
    images: `[N, H, W, 3] float32` RGB in [0, 1].
    config: What to run; default `EvaluationConfig()`.
    labels: Optional `[N]` true classes; adds `top1_accuracy` (%) to the report.
    masks: Optional `[N, H, W] bool` object masks; adds `pointing_game` (%) and `relevance_mass`.
    model: Model name recorded in the report.
    vgg_params: VGG16 variables for PFC's `vgg16init` variant.
    first_index: Index of `images[0]` in its data set (for the per-image keys and records).
    records: Optional records file (`RecordLog`): per-image scores are appended after each batch,
      and scores already there are reused instead of recomputed.
    settings: What identifies the data (e.g. its path and the weights), stored in the records
      file with `model` and the scoring settings of `config`.
    progress: Show a progress bar on stderr.

  Returns:
    `{"model", "images", "preset", "seed", ["top1_accuracy",] "methods": {name: {"average_drop",
    "increase_in_confidence" (both %), "deletion_auc", "insertion_auc", ["pointing_game" (%),
    "relevance_mass",] "seconds_per_image"}}}`. Seconds per image are wall-clock time of the
    method alone (metrics excluded), compilation included.
  """
  config = EvaluationConfig() if config is None else config
  images = check_images(images)
  count = images.shape[0]
  if masks is not None:
    masks = np.asarray(masks)
    if masks.shape != images.shape[:3] or masks.dtype != bool:
      raise ValueError(
          f"`masks` must be {tuple(images.shape[:3])} bool, got {masks.shape} {masks.dtype}.")
  log = None
  if records is not None:
    log = RecordLog(records, {
        "model": model, "preset": config.preset, "seed": config.seed,
        "curve_steps": config.curve_steps, "pointing_tolerance": config.pointing_tolerance,
        **(settings or {})})
  batches = _batches(count, config.batch_size)
  target = jnp.concatenate([_predictions(classifier, images[b])[:real] for b, real in batches])
  base_key = jax.random.key(config.seed)
  keys = jax.vmap(lambda i: jax.random.fold_in(base_key, i))(jnp.arange(count) + first_index)

  report: dict[str, Any] = {"model": model, "images": count, "preset": config.preset,
                            "seed": config.seed}
  if labels is not None:
    labels = np.asarray(labels)
    if labels.shape != (count,):
      raise ValueError(f"`labels` must have shape ({count},), got {labels.shape}.")
    report["top1_accuracy"] = float(100.0 * np.mean(np.asarray(target) == labels))
  functions = {name: method_function(name, config.preset, vgg_params) for name in config.methods}
  scores: dict[str, list[dict[str, Any]]] = {name: [] for name in config.methods}
  with tqdm.tqdm(total=count * len(config.methods), desc="evaluate", unit="image",
                 disable=not progress) as bar:
    for b, real in batches:
      indices = [first_index + int(i) for i in b[:real]]
      for name, method in functions.items():
        bar.set_postfix_str(name)
        found = [log.records.get((name, i)) for i in indices] if log else [None]
        if all(found):
          scores[name] += found
          bar.update(real)
          continue
        start = time.perf_counter()
        saliency = jax.block_until_ready(method(classifier, images[b], target[b], keys[b]))
        seconds = (time.perf_counter() - start) / len(b)  # Padding shares the time.
        batch_scores = _score_batch(classifier, images[b], saliency, target[b],
                                    None if masks is None else masks[b], config)
        new = [{"method": name, "index": index,
                **{key: float(value[j]) for key, value in batch_scores.items()}, "seconds": seconds}
               for j, index in enumerate(indices)]
        if log:
          log.append(new)
        scores[name] += new
        bar.update(real)
  report["methods"] = {name: _means(method_scores) for name, method_scores in scores.items()}
  return report


def _means(records: list[dict[str, Any]]) -> dict[str, float]:
  """Report entry of one method: the scaled mean of each metric over its per-image records."""
  means = {key: scale * float(np.mean([r[key] for r in records]))
           for key, _, scale, _ in COLUMNS if key in records[0]}
  means["seconds_per_image"] = float(np.mean([r["seconds"] for r in records]))
  return means


def markdown_table(report: dict[str, Any]) -> str:
  """The report's methods as a Markdown table, one row per method."""
  first = next(iter(report["methods"].values()))
  columns = [(key, title, fmt) for key, title, _, fmt in COLUMNS if key in first]
  lines = ["| Method | " + " | ".join(title for _, title, _ in columns) + " |",
           "|---|" + "---:|" * len(columns)]
  for name, values in report["methods"].items():
    lines.append(f"| {name} | " + " | ".join(format(values[key], fmt) for key, _, fmt in columns) + " |")
  return "\n".join(lines)
