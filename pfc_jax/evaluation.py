"""Runs saliency methods on a set of images, scores them with every metric, and reports the means.

Protocol (Grad-CAM++, RISE): each method explains the class the model predicts on the clean image.
Images go through in batches, each batch through every method; image `i` gets the PRNG key
`fold_in(key(seed), first_index + i)`, so results do not depend on the batch size or on which
slice of a data set is evaluated. With a records file (`RecordLog`), every batch's per-image
scores are appended as soon as they exist, and a rerun skips what the file already holds. With a
maps folder (`MapStore`), every method's maps are kept too, so that protocols added later are
computed from them without rerunning the methods (a PFC map costs tens of seconds on a CPU, its
metrics about one).

Protocols (`EvaluationConfig.protocols`, `PROTOCOLS`): `drop` (Average Drop and Increase in
Confidence, Grad-CAM++), `drop_mean` and `drop_blur` (the same with masked-out pixels in the
classifier's mean colour or blurred), `drop_raw` (the map as produced instead of min-max
normalised; no score for maps outside [0, 1]), `curves` (deletion and insertion AUC, RISE, 32
steps), `curves_fine` (the same at RISE's 224 pixels per step) and `road` (ROAD, Rong et al.
2022: MoRF and LeRF). Pointing game and relevance mass come with object masks, and the
model-randomisation sanity check (Adebayo et al. 2018) on the first `randomization` images.

Method names: the baselines' names (`pfc_jax.baselines.METHODS`), and `pfc` followed by optional
`-`-separated modifiers that edit the PFC preset's `ExplainConfig`:

- consistency: `published` | `coalition` | `off` (`PerturbConfig.consistency`);
- coalition network init: `random` | `vgg16init` (`CoalitionConfig.init`; `vgg16init` needs VGG16
  weights);
- parameterization of w: `pixel` | `region` | `lowres` | `guided` (`PerturbConfig.parameterization`);
- confidence term: `hinge` | `log_softmax` (`PerturbConfig.confidence`);
- learning-rate schedule: `constant` | `cosine` (`PerturbConfig.schedule`);
- saliency readout: `smooth` (`PerturbConfig.saliency_sigma = 8`, the map smoothed over 8 px);
- perturbation operator: `blur` (`PerturbConfig.blur_sigma = 10`, `blur_fraction = 0`: a
  10 px blur added to the preset's noise, e.g. `pfc-blur-fast_noise`, noise and blur; `fast`
  and `full` already blur so, without noise) | `relative_blur` (`blur_sigma = 0`,
  `blur_fraction = 0.08`: the blur over 8% of the image's shorter side, 17.9 px at 224 px and
  5.1 px at 64 px, instead of 10 px; with the noise of a noise preset, like `blur`);
- ablation: `no_coalitions` (the coalition stage is skipped and the perturbation sees the whole
  image as one coalition: the same objective, mask and steps with the coalitions removed, so
  that its difference from the method without it is what the coalitions add);
- preset: one of `PRESETS`, replacing the evaluation's preset for this method: the names of
  `ExplainConfig.preset` (`paper`, `full`, `fast`, `tiny`) or an objective tried before
  `fast`'s (`EARLIER_OBJECTIVES`: `fast_noise`, `fast_published`, `fast_lowres`), which the
  records of docs/results still name.

For example `pfc`, `pfc-coalition`, `pfc-lowres`, `pfc-fast_published`, `pfc-coalition-paper`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
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
from pfc_jax._inputs import check_images, per_image_keys
from pfc_jax.classifier import Classifier, check_classifier

from pfc_jax.coalitions import CoalitionConfig
from pfc_jax.explain import (EXECUTION_FIELDS, PRESETS as EXPLAIN_PRESETS, ExplainConfig, explain,
                             stage_keys)
from pfc_jax.perturbation import PerturbConfig, perturb

DEFAULT_METHODS = ("pfc", "gradcam", "scorecam", "integrated_gradients", "occlusion", "rise")
# Protocol -> the record keys it computes (see the module docstring).
PROTOCOLS = {
    "drop": ("average_drop", "increase_in_confidence"),
    "drop_mean": ("average_drop_mean", "increase_in_confidence_mean"),
    "drop_blur": ("average_drop_blur", "increase_in_confidence_blur"),
    "drop_raw": ("average_drop_raw", "increase_in_confidence_raw"),
    "curves": ("deletion_auc", "insertion_auc"),
    "curves_fine": ("deletion_auc_fine", "insertion_auc_fine"),
    "road": ("road_morf", "road_lerf", "road_morf_curve", "road_lerf_curve"),
}
DEFAULT_PROTOCOLS = ("drop", "curves")
# Computed when object masks are given, and on the first `randomization` images.
LOCALIZATION = ("pointing_game", "relevance_mass")
RANDOMIZATION = ("randomization_spearman",)
# `metrics.confidences` options of each Average Drop protocol.
_DROP_OPTIONS = {"drop": {}, "drop_mean": {"masked_value": "mean"},
                 "drop_blur": {"masked_value": "blur"}, "drop_raw": {"normalization": "none"}}
# The randomised model's key: fold_in(key(seed), this), an index no image reaches.
_RANDOMIZATION_INDEX = 2 ** 32 - 1
# Modifier name -> (the `ExplainConfig` part it edits, the fields it sets there).
PFC_MODIFIERS = {
    "published": ("perturb", dict(consistency="published")),
    "coalition": ("perturb", dict(consistency="coalition")),
    "off": ("perturb", dict(consistency="off")),
    "random": ("coalitions", dict(init="random")),
    "vgg16init": ("coalitions", dict(init="vgg16")),
    "pixel": ("perturb", dict(parameterization="pixel")),
    "region": ("perturb", dict(parameterization="region")),
    "lowres": ("perturb", dict(parameterization="lowres")),
    "guided": ("perturb", dict(parameterization="guided")),
    "hinge": ("perturb", dict(confidence="hinge")),
    "log_softmax": ("perturb", dict(confidence="log_softmax")),
    "constant": ("perturb", dict(schedule="constant")),
    "cosine": ("perturb", dict(schedule="cosine")),
    "smooth": ("perturb", dict(saliency_sigma=8.0)),
    "blur": ("perturb", dict(blur_sigma=10.0, blur_fraction=0.0)),
    "relative_blur": ("perturb", dict(blur_sigma=0.0, blur_fraction=0.08)),
    "preservation": ("perturb", dict(deletion_weight=0.0, with_preservation_game=False)),
    "dual": ("perturb", dict(deletion_weight=10.0, with_preservation_game=False)),
    "two_games": ("perturb", dict(deletion_weight=10.0, with_preservation_game=True)),
}
# Modifiers that change what runs rather than a config field.
NO_COALITIONS = "no_coalitions"
# The objectives chosen for `fast` before its current one, at its cost (its coalitions, 80 steps,
# S = 8), each the best of its time on the tuning split; docs/faithfulness.md ("History") has
# their held-out figures, and `scripts/benchmark.py --preset` their costs.
EARLIER_OBJECTIVES = {
    # Coalition-guided noise up to max_w = 5 under the target's cross-entropy (before the blur).
    "fast_noise": PerturbConfig(parameterization="guided", confidence="log_softmax",
                                confidence_weight=3.0, max_w=5.0, steps=80, noise_samples=8,
                                learning_rate=0.2),
    # Smooth noise that ignores the coalitions, the paper's hinge (before "guided").
    "fast_lowres": PerturbConfig(parameterization="lowres", max_w=5.0, steps=80,
                                 noise_samples=8, learning_rate=0.2),
    # The published objective (per-pixel noise up to 1) at the fast cost.
    "fast_published": PerturbConfig(steps=80, noise_samples=8, learning_rate=3e-2),
}
PRESETS = EXPLAIN_PRESETS + tuple(EARLIER_OBJECTIVES)


def preset_config(name: str) -> ExplainConfig:
  """The `ExplainConfig` of preset `name` (one of `PRESETS`): `ExplainConfig.preset(name)`, or
  an earlier objective (`EARLIER_OBJECTIVES`) with the coalitions of "fast".

  Raises:
    ValueError: for an unknown name.
  """
  if name in EARLIER_OBJECTIVES:
    return ExplainConfig(CoalitionConfig.fast(), EARLIER_OBJECTIVES[name])
  if name not in EXPLAIN_PRESETS:
    raise ValueError(f"Unknown preset {name!r}; choose from {PRESETS}.")
  return ExplainConfig.preset(name)


# Baseline configs of the "tiny" preset (tests and smoke runs); other presets use the defaults.
TINY_BASELINES = {
    "integrated_gradients": baselines.IntegratedGradientsConfig(num_steps=4, chunk_size=4),
    "occlusion": baselines.OcclusionConfig(patch_size=16, stride=16),
    "rise": baselines.RISEConfig(num_masks=64, chunk_size=32),
    "xrai": baselines.XRAIConfig(steps=4, batch_size=4),
    "lime": baselines.LIMEConfig(num_samples=32, batch_size=32),
    "lime_coalitions": baselines.LIMEConfig(
        num_samples=32, batch_size=32, segmentation=ExplainConfig.preset("tiny").coalitions),
    "extremal_perturbation": baselines.ExtremalPerturbationConfig(max_iter=4),
}

# (report key, column title, scale, format) in table order; percentages are scaled by 100.
COLUMNS = (
    ("average_drop", "Avg drop % (lower)", 100.0, ".2f"),
    ("increase_in_confidence", "Incr. conf. % (higher)", 100.0, ".2f"),
    ("average_drop_mean", "Avg drop %, mean fill (lower)", 100.0, ".2f"),
    ("increase_in_confidence_mean", "Incr. conf. %, mean fill (higher)", 100.0, ".2f"),
    ("average_drop_blur", "Avg drop %, blur fill (lower)", 100.0, ".2f"),
    ("increase_in_confidence_blur", "Incr. conf. %, blur fill (higher)", 100.0, ".2f"),
    ("average_drop_raw", "Avg drop %, map as produced (lower)", 100.0, ".2f"),
    ("increase_in_confidence_raw", "Incr. conf. %, map as produced (higher)", 100.0, ".2f"),
    ("deletion_auc", "Deletion AUC (lower)", 1.0, ".3f"),
    ("insertion_auc", "Insertion AUC (higher)", 1.0, ".3f"),
    ("deletion_auc_fine", "Fine deletion AUC (lower)", 1.0, ".3f"),
    ("insertion_auc_fine", "Fine insertion AUC (higher)", 1.0, ".3f"),
    ("road_morf", "ROAD MoRF (lower)", 1.0, ".3f"),
    ("road_lerf", "ROAD LeRF (higher)", 1.0, ".3f"),
    ("pointing_game", "Pointing game % (higher)", 100.0, ".1f"),
    ("relevance_mass", "Relevance mass (higher)", 1.0, ".3f"),
    ("randomization_spearman", "Randomisation Spearman (lower)", 1.0, ".3f"),
    ("seconds_per_image", "s / image", 1.0, ".3g"),
)
# Per-image lists in the records whose element-wise means the report carries.
CURVES = ("road_morf_curve", "road_lerf_curve")

Method = Callable[[Classifier, jax.Array, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class EvaluationConfig:
  """What `evaluate` runs and how.

  Attributes:
    methods: Method names (see the module docstring); default every baseline and `pfc`.
    preset: Preset of the PFC methods, one of `PRESETS` (`preset_config`); default "fast".
      "tiny" also shrinks the baselines (`TINY_BASELINES`); otherwise they run their defaults.
    batch_size: Images per call of a method and of the metrics; default 4.
    seed: Seed of the per-image PRNG keys; default 0.
    curve_steps: Steps of the deletion and insertion curves; default 32.
    pointing_tolerance: Pointing-game tolerance in pixels; default 15.
    protocols: Which protocols to compute (`PROTOCOLS`); default `("drop", "curves")`.
    fine_curve_pixels: Pixels per step of `curves_fine`; default 224 (RISE's).
    randomization: Run the model-randomisation check (last layer re-drawn) on the first this
      many images of each method; default 0 (none). It reruns each method on them.
  """
  methods: tuple[str, ...] = DEFAULT_METHODS
  preset: str = "fast"
  batch_size: int = 4
  seed: int = 0
  curve_steps: int = metrics.DELETION_STEPS
  pointing_tolerance: float = metrics.POINTING_TOLERANCE
  protocols: tuple[str, ...] = DEFAULT_PROTOCOLS
  fine_curve_pixels: int = metrics.RISE_PIXELS_PER_STEP
  randomization: int = 0

  def __post_init__(self):
    object.__setattr__(self, "methods", tuple(self.methods))
    object.__setattr__(self, "protocols", tuple(self.protocols))
    if self.preset not in PRESETS:
      raise ValueError(f"`preset` must be one of {PRESETS}, got {self.preset!r}.")
    if not self.methods:
      raise ValueError("`methods` must name at least one method.")
    for name in self.methods:
      method_spec(name, self.preset)
    unknown = [p for p in self.protocols if p not in PROTOCOLS]
    if not self.protocols or unknown:
      raise ValueError(
          f"`protocols` must name at least one of {sorted(PROTOCOLS)}, got {list(self.protocols)}.")
    if self.batch_size < 1 or self.curve_steps < 1 or self.fine_curve_pixels < 1:
      raise ValueError(
          "`batch_size`, `curve_steps` and `fine_curve_pixels` must be >= 1, got "
          f"{self.batch_size}, {self.curve_steps} and {self.fine_curve_pixels}.")
    if self.randomization < 0:
      raise ValueError(f"`randomization` must be >= 0, got {self.randomization}.")


def method_spec(name: str, preset: str) -> tuple[str, Any]:
  """Parses a method name into `(baseline name, None)`, `("pfc", ExplainConfig)` or, with the
  `no_coalitions` modifier, `("pfc_no_coalitions", ExplainConfig)`.

  Raises:
    ValueError: for an unknown method or PFC modifier, or two modifiers of one kind.
  """
  if name in baselines.METHODS:
    return name, None
  head, *modifiers = name.split("-")
  ablated = NO_COALITIONS in modifiers
  modifiers = [m for m in modifiers if m != NO_COALITIONS]
  if head != "pfc":
    raise ValueError(
        f"Unknown method {name!r}; choose from pfc[-modifiers] or {sorted(baselines.METHODS)}.")
  presets = [m for m in modifiers if m in PRESETS]
  edits = [m for m in modifiers if m not in PRESETS]
  unknown = [m for m in edits if m not in PFC_MODIFIERS]
  kinds = {}  # (part, fields set) -> the modifiers that set them
  for m in edits:
    if m in PFC_MODIFIERS:
      kinds.setdefault((PFC_MODIFIERS[m][0], *PFC_MODIFIERS[m][1]), []).append(m)
  clashes = [group for group in kinds.values() if len(group) > 1]
  if unknown or len(presets) > 1 or clashes or name.split("-").count(NO_COALITIONS) > 1:
    problems = ([f"unknown modifier(s) {unknown}"] if unknown else []) + (
        [f"several presets {presets}"] if len(presets) > 1 else []) + [
        f"{' and '.join(group)} set the same setting" for group in clashes] + (
        [f"{NO_COALITIONS} given twice"] if name.split("-").count(NO_COALITIONS) > 1 else [])
    raise ValueError(
        f"Bad PFC method {name!r}: {'; '.join(problems)}. Modifiers are one preset of {PRESETS} "
        f"and at most one of each kind from {sorted(PFC_MODIFIERS)}, and {NO_COALITIONS!r}.")
  config = preset_config(presets[0] if presets else preset)
  for modifier in edits:
    part, values = PFC_MODIFIERS[modifier]
    config = dataclasses.replace(
        config, **{part: dataclasses.replace(getattr(config, part), **values)})
  return ("pfc_no_coalitions" if ablated else "pfc"), config


def needs_vgg_params(config: EvaluationConfig) -> bool:
  """Whether a PFC method of `config` initialises its coalition network from VGG16."""
  specs = [method_spec(name, config.preset) for name in config.methods]
  return any(kind == "pfc" and spec.coalitions.init == "vgg16" for kind, spec in specs)


def method_function(name: str, preset: str, vgg_params: Any = None) -> Method:
  """The saliency function `(classifier, images, target, keys) -> [B, H, W]` of method `name`."""
  kind, config = method_spec(name, preset)
  if kind == "pfc_no_coalitions":
    return functools.partial(_pfc_saliency_without_coalitions, config=config)
  if kind != "pfc":
    return functools.partial(
        baselines.METHODS[kind], config=TINY_BASELINES.get(kind) if preset == "tiny" else None)
  return functools.partial(_pfc_saliency, config=config, vgg_params=vgg_params)


def method_settings_id(name: str, preset: str) -> str:
  """A 12-hex-digit fingerprint of everything method `name` computes with under `preset` (its
  `ExplainConfig` but for the `EXECUTION_FIELDS`, or its baseline config): a records file keeps
  it with each score, so that scores computed before a preset or modifier changed meaning are
  not resumed as if current.
  """
  kind, config = method_spec(name, preset)
  if not kind.startswith("pfc"):
    config = TINY_BASELINES.get(kind) if preset == "tiny" else None
  return fingerprint([kind, computed_settings(config) if config is not None else "default"])


def computed_settings(config: Any) -> dict[str, Any]:
  """`dataclasses.asdict(config)` without the `EXECUTION_FIELDS` at any depth: what determines
  the results of a config, for fingerprints of records (`fingerprint`)."""
  def without_execution(value):
    if isinstance(value, dict):
      return {k: without_execution(v) for k, v in value.items() if k not in EXECUTION_FIELDS}
    return value
  return without_execution(dataclasses.asdict(config))


def fingerprint(value: Any) -> str:
  """12 hex digits identifying a JSON-like `value` (dataclasses as dicts, other leaves as text)."""
  text = json.dumps(value, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:12]


def _pfc_saliency(classifier: Classifier, images: jax.Array, target: jax.Array, key: jax.Array, *,
                  config: Any, vgg_params: Any) -> jax.Array:
  """PFC saliency; PFC explains the predicted class itself, which is `target` by protocol."""
  del target
  return explain(classifier, images, key, config, vgg_params=vgg_params).saliency


def _pfc_saliency_without_coalitions(classifier: Classifier, images: jax.Array, target: jax.Array,
                                     key: jax.Array, *, config: Any) -> jax.Array:
  """PFC's perturbation with every pixel in coalition 0 (the `no_coalitions` ablation), with the
  perturbation keys that `explain` would use, so that only the coalitions differ."""
  del target
  images = check_images(images)
  _, perturb_keys = stage_keys(per_image_keys(key, images.shape[0]))
  labels = jnp.zeros(images.shape[:3], jnp.int32)
  return perturb(classifier, images, labels, perturb_keys, config.perturb).saliency


def read_records(path: str | os.PathLike) -> tuple[dict[str, Any], dict[tuple[str, int], dict[str, Any]], bool]:
  """Reads a records file (see `RecordLog`; `scripts/sweep.py` writes the same form, with a
  "setting" in place of the "method").

  Returns:
    `(settings, {(method or setting, index): record}, torn)`, `torn` when the last line was cut off by an
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
    records[(record["method"] if "method" in record else record["setting"], record["index"])] = record
  return settings, records, False


class RecordLog:
  """Per-image scores in a JSON-lines file, appended as they are computed.

  Line 1 is `{"settings": {...}}`; each further line is one record `{"method", "index",
  "settings_id", <metric>: float, ..., "seconds"}`, `index` counting from the start of the data
  set, `settings_id` the method's `method_settings_id` (absent from files written before it); a metric
  that does not apply is `null`, and per-fraction curves are lists. A later line for the same
  method and image replaces an earlier one (protocols added later rewrite the record with more
  keys). A truncated last line (an interrupted write) is dropped.

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


class MapStore:
  """Saliency maps of each method in a folder, kept so that metrics can be recomputed from them.

  `DIR/settings.json` holds what determines the maps (model, weights, data, preset, seed); each
  method call adds `DIR/<method>/maps-FIRST-LAST.npz` (data-set indices of its first and last
  image), written atomically, with `indices [n] int64`, `maps [n, h, w]` (as the method returned
  them: float32, or float16 for half-precision methods), `seconds [n] float64` (the method's
  time per image) and `settings_id` (`method_settings_id` of the method that made them; files
  written before it existed have none).

  Args:
    path: The folder; created when missing.
    settings: JSON-ready values that determine the maps. An existing folder must hold the same.

  Raises:
    ValueError: naming `path` and the differing settings when it was written with others.
  """

  def __init__(self, path: str | os.PathLike, settings: dict[str, Any]):
    self.path = Path(path)
    settings = json.loads(json.dumps(settings))
    settings_path = self.path / "settings.json"
    if settings_path.exists():
      found = json.loads(settings_path.read_text())
      if found != settings:
        differ = sorted(k for k in set(found) | set(settings) if found.get(k) != settings.get(k))
        raise ValueError(
            f"Maps folder {str(self.path)!r} holds maps made with other settings "
            f"({', '.join(differ)}); choose another folder.")
    else:
      io.write_json(settings_path, settings)
    self._maps: dict[str, dict[int, tuple[np.ndarray, float]]] = {}
    self._settings_ids: dict[str, set[str]] = {}

  def _method(self, method: str) -> dict[int, tuple[np.ndarray, float]]:
    if method not in self._maps:
      self._maps[method], self._settings_ids[method] = {}, set()
      for file in sorted((self.path / method).glob("maps-*.npz")):
        with np.load(file) as stored:
          for index, saliency, seconds in zip(stored["indices"], stored["maps"], stored["seconds"]):
            self._maps[method][int(index)] = (saliency, float(seconds))
          if "settings_id" in stored:
            self._settings_ids[method].add(str(stored["settings_id"]))
    return self._maps[method]

  def check_settings(self, method: str, settings_id: str) -> None:
    """Raises ValueError, naming the folder and `method`, when maps of `method` stored there
    were made with another `method_settings_id` (maps stored without one pass)."""
    self._method(method)
    if self._settings_ids[method] - {settings_id}:
      raise ValueError(
          f"Maps folder {str(self.path)!r} holds maps of {method} made with other settings of "
          "that method (its preset or modifiers changed meaning since); choose another folder.")

  def get(self, method: str, indices: list[int]) -> tuple[np.ndarray, list[float]] | None:
    """`(maps [n, h, w], seconds [n])` of `indices`, or None unless all are stored."""
    stored = self._method(method)
    if not all(i in stored for i in indices):
      return None
    return np.stack([stored[i][0] for i in indices]), [stored[i][1] for i in indices]

  def put(self, method: str, indices: list[int], maps: np.ndarray, seconds: list[float],
          settings_id: str) -> None:
    """Stores `maps [n, h, w]` of images `indices`, the method's `seconds` per image and its
    `settings_id`."""
    io.write_npz(self.path / method / f"maps-{indices[0]:08d}-{indices[-1]:08d}.npz",
                 indices=np.asarray(indices, np.int64), maps=np.asarray(maps),
                 seconds=np.asarray(seconds, np.float64), settings_id=np.asarray(settings_id))
    self._method(method).update(
        {i: (m, t) for i, m, t in zip(indices, np.asarray(maps), seconds)})
    self._settings_ids[method].add(settings_id)


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


def protocol_scores(protocol: str, classifier: Classifier, images: jax.Array, saliency: jax.Array,
                     target: jax.Array, keys: jax.Array, config: EvaluationConfig
                     ) -> dict[str, np.ndarray]:
  """Per-image scores of one protocol of `PROTOCOLS` on one batch of maps.

  Args:
    protocol: A key of `PROTOCOLS`.
    classifier: The classifier.
    images: `[B, H, W, 3] float32` RGB in [0, 1].
    saliency: `[B, h, w]` maps.
    target: `[B] int32` explained classes.
    keys: `[B]` PRNG keys (ROAD's imputation noise), one per image.
    config: Curve settings (`curve_steps`, `fine_curve_pixels`).

  Returns:
    `{record key: [B] values}` (`[B, F]` for ROAD's curves); `None` where a metric does not
    apply (`drop_raw` on a map outside [0, 1]).
  """
  names = PROTOCOLS[protocol]
  if protocol in _DROP_OPTIONS:
    options = _DROP_OPTIONS[protocol]
    applies = np.ones(len(saliency), bool)
    if options.get("normalization") == "none":  # Only maps that lie in [0, 1] as produced.
      values = np.asarray(saliency)
      applies = (values.min(axis=(1, 2)) >= 0) & (values.max(axis=(1, 2)) <= 1)
      saliency = jnp.clip(saliency, 0.0, 1.0)
    return {name: np.where(applies, np.asarray(fn(classifier, images, saliency, target, **options)),
                           None)
            for name, fn in zip(names, (metrics.average_drop, metrics.increase_in_confidence))}
  if protocol in ("curves", "curves_fine"):
    steps = config.curve_steps if protocol == "curves" else metrics.rise_steps(
        *images.shape[1:3], config.fine_curve_pixels)
    return {names[0]: metrics.deletion_auc(classifier, images, saliency, target, num_steps=steps),
            names[1]: metrics.insertion_auc(classifier, images, saliency, target, num_steps=steps)}
  curves = metrics.road(classifier, images, saliency, target, keys)
  return dict(zip(names, (curves.morf.mean(axis=1), curves.lerf.mean(axis=1), curves.morf,
                          curves.lerf)))


def _record_value(value: Any) -> Any:
  """A per-image score as JSON: float, list of floats, or None."""
  if value is None:
    return None
  value = np.asarray(value, np.float64)
  return value.tolist() if value.ndim else float(value)


def _record_settings(model: str, config: EvaluationConfig, settings: dict[str, Any] | None
                     ) -> dict[str, Any]:
  """The records file's settings; settings new since the first release only when not default."""
  extra = {}
  if config.fine_curve_pixels != metrics.RISE_PIXELS_PER_STEP:
    extra["fine_curve_pixels"] = config.fine_curve_pixels
  return {"model": model, "preset": config.preset, "seed": config.seed,
          "curve_steps": config.curve_steps, "pointing_tolerance": config.pointing_tolerance,
          **extra, **(settings or {})}


def evaluate(classifier: Classifier, images, config: EvaluationConfig | None = None, *,
             labels=None, masks=None, model: str = "", vgg_params: Any = None,
             first_index: int = 0, records: str | os.PathLike | None = None,
             maps_dir: str | os.PathLike | None = None,
             settings: dict[str, Any] | None = None, progress: bool = True) -> dict[str, Any]:
  """Runs every method of `config` on `images` and averages every metric of its protocols.

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
      and scores already there are reused instead of recomputed; a protocol missing from them is
      computed and the records rewritten with it.
    maps_dir: Optional maps folder (`MapStore`): each method's maps are stored there, and maps
      found there are used instead of running the method again.
    settings: What identifies the data (e.g. its path and the weights), stored in the records
      file with `model` and the scoring settings of `config`, and in the maps folder.
    progress: Show a progress bar over the images on stderr.

  Returns:
    `{"model", "images", "preset", "seed", ["top1_accuracy",] "methods": {name: {<metric>: mean,
    ..., "seconds_per_image"}}}`, with the metrics of `COLUMNS` that were computed (percentages
    scaled to %; `None` when a metric applied to no image) and, with `road`, the mean
    per-fraction curves `road_morf_curve` and `road_lerf_curve`. Seconds per image are
    wall-clock time of the method alone (metrics excluded), compilation included.

  Raises:
    ValueError: on bad inputs (a classifier whose `apply_fn` does not return logits `[B, C]`
      included: `pfc_jax.classifier.check_classifier`), a method that does not apply to the
      classifier (`pfc_jax.baselines.applicable`: attention rollout on a CNN), or a records
      file or maps folder written with other settings.
  """
  config = EvaluationConfig() if config is None else config
  images = check_images(images)
  count = images.shape[0]
  check_classifier(classifier, images[:config.batch_size])  # The shape of a batch.
  kinds = {name: method_spec(name, config.preset)[0] for name in config.methods}
  inapplicable = [name for name, kind in kinds.items()
                  if kind in baselines.METHODS and not baselines.applicable(kind, classifier)]
  if inapplicable:
    raise ValueError(
        f"`classifier` lacks what {', '.join(inapplicable)} read: " + "; ".join(
            f"{name} needs {' and '.join(baselines.CLASSIFIER_FIELDS[kinds[name]])}"
            for name in inapplicable)
        + ". Leave those methods out, or give the classifier those functions (pfc_jax.Classifier's "
        "fields; a transformer's attention_fn comes with models.classifier('shapes_vit', ...)).")
  if masks is not None:
    masks = np.asarray(masks)
    if masks.shape != images.shape[:3] or masks.dtype != bool:
      raise ValueError(
          f"`masks` must be {tuple(images.shape[:3])} bool, got {masks.shape} {masks.dtype}.")
  settings_ids = {name: method_settings_id(name, config.preset) for name in config.methods}
  log = None
  if records is not None:
    log = RecordLog(records, _record_settings(model, config, settings))
    stale = sorted({m for (m, _), r in log.records.items()
                    if m in settings_ids and r.get("settings_id", settings_ids[m]) != settings_ids[m]})
    if stale:
      raise ValueError(
          f"Records file {str(records)!r} holds scores of {', '.join(stale)} computed with other "
          "settings of those methods (their preset or modifiers changed meaning since); choose "
          "another records file.")
  store = None
  if maps_dir is not None:
    store = MapStore(maps_dir, {"model": model, "preset": config.preset, "seed": config.seed,
                                **(settings or {})})
    for name, settings_id in settings_ids.items():
      store.check_settings(name, settings_id)
  batches = _batches(count, config.batch_size)
  target = jnp.concatenate([_predictions(classifier, images[b])[:real] for b, real in batches])
  base_key = jax.random.key(config.seed)
  keys = jax.vmap(lambda i: jax.random.fold_in(base_key, i))(jnp.arange(count) + first_index)
  protocols = config.protocols + (("localization",) if masks is not None else ())

  report: dict[str, Any] = {"model": model, "images": count, "preset": config.preset,
                            "seed": config.seed}
  if labels is not None:
    labels = np.asarray(labels)
    if labels.shape != (count,):
      raise ValueError(f"`labels` must have shape ({count},), got {labels.shape}.")
    report["top1_accuracy"] = float(100.0 * np.mean(np.asarray(target) == labels))
  functions = {name: method_function(name, config.preset, vgg_params) for name in config.methods}
  scores: dict[str, list[dict[str, Any]]] = {name: [] for name in config.methods}
  randomized = None
  with tqdm.tqdm(total=count, desc="evaluate", unit="image", disable=not progress) as bar:
    for b, real in batches:
      indices = [first_index + int(i) for i in b[:real]]
      for name, method in functions.items():
        bar.set_postfix_str(name)
        found = [log.records.get((name, i)) if log else None for i in indices]
        wanted = {p: [True] * real for p in protocols}
        if config.randomization:
          wanted["randomization"] = [i < first_index + config.randomization for i in indices]
        missing = [p for p, needed in wanted.items()
                   if any(need and (old is None or any(k not in old for k in _keys(p)))
                          for need, old in zip(needed, found))]
        if not missing:
          scores[name] += found
          continue
        saliency, seconds = _maps(store, name, settings_ids[name], method, classifier, images[b],
                                  target[b], keys[b], indices)
        batch_scores = {}
        for protocol in missing:
          if protocol == "localization":
            batch_scores["pointing_game"] = metrics.pointing_game(
                saliency, masks[b], config.pointing_tolerance)
            batch_scores["relevance_mass"] = metrics.relevance_mass(saliency, masks[b])
          elif protocol == "randomization":
            if randomized is None:
              randomized = metrics.randomized_classifier(
                  classifier, jax.random.fold_in(base_key, _RANDOMIZATION_INDEX), images[:1])
            after = method(randomized, images[b], target[b], keys[b])
            correlation = np.asarray(metrics.spearman(saliency, after))
            batch_scores["randomization_spearman"] = np.where(
                wanted["randomization"] + [False] * (len(b) - real), correlation, None)
          else:
            batch_scores.update(protocol_scores(
                protocol, classifier, images[b], saliency, target[b], keys[b], config))
        new = []
        for j, (index, old) in enumerate(zip(indices, found)):
          # Images past the first `randomization` get no randomisation key (a larger count later
          # computes it), whereas None elsewhere records a metric that does not apply.
          record = {"method": name, "index": index, **(old or {}),
                    **{key: _record_value(value[j]) for key, value in batch_scores.items()
                       if not (key in RANDOMIZATION and value[j] is None)}}
          record["seconds"] = old["seconds"] if old else seconds[j]
          if old is None:  # Rows kept from files older than the fingerprint stay without one.
            record["settings_id"] = settings_ids[name]
          new.append(record)
        if log:
          log.append(new)
        scores[name] += new
      bar.update(real)
  report["methods"] = {name: _means(method_scores) for name, method_scores in scores.items()}
  return report


def _keys(protocol: str) -> tuple[str, ...]:
  """The record keys of `protocol`, including the implicit `localization` and `randomization`."""
  return {"localization": LOCALIZATION, "randomization": RANDOMIZATION}.get(
      protocol, PROTOCOLS.get(protocol, ()))


def _maps(store: MapStore | None, name: str, settings_id: str, method: Method,
          classifier: Classifier, images: jax.Array, target: jax.Array, keys: jax.Array,
          indices: list[int]) -> tuple[jax.Array, list[float]]:
  """Maps `[B, h, w]` of a batch and the method's seconds per real image: stored or computed."""
  stored = store.get(name, indices) if store else None
  if stored is not None:
    maps, seconds = stored
    padding = len(images) - len(indices)  # The padded batch repeats its last image.
    return jnp.asarray(np.concatenate([maps, np.repeat(maps[-1:], padding, axis=0)])), seconds
  start = time.perf_counter()
  saliency = jax.block_until_ready(method(classifier, images, target, keys))
  seconds = [(time.perf_counter() - start) / len(images)] * len(indices)  # Padding shares it.
  if store:
    store.put(name, indices, np.asarray(saliency[:len(indices)]), seconds, settings_id)
  return saliency, seconds


def _means(records: list[dict[str, Any]]) -> dict[str, Any]:
  """Report entry of one method: the scaled mean of each metric over the records that have it."""
  means: dict[str, Any] = {}
  for key, _, scale, _ in COLUMNS:
    if any(key in r for r in records):
      values = [r[key] for r in records if r.get(key) is not None]
      means[key] = scale * float(np.mean(values)) if values else None
  for key in CURVES:
    values = [r[key] for r in records if r.get(key) is not None]
    if values:
      means[key] = np.mean(values, axis=0).tolist()
  means["seconds_per_image"] = float(np.mean([r["seconds"] for r in records]))
  return means


def markdown_table(report: dict[str, Any]) -> str:
  """The report's methods as a Markdown table, one row per method ("n/a": no image scored)."""
  present = {key for values in report["methods"].values() for key in values}
  columns = [(key, title, fmt) for key, title, _, fmt in COLUMNS if key in present]
  lines = ["| Method | " + " | ".join(title for _, title, _ in columns) + " |",
           "|---|" + "---:|" * len(columns)]
  for name, values in report["methods"].items():
    cells = ["n/a" if values.get(key) is None else format(values[key], fmt)
             for key, _, fmt in columns]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)
