"""What the commands share: loading weights with errors that name the command-line flag."""

from __future__ import annotations

from typing import Any

from pfc_jax import weights


def load_weights(model: str, path: str | None, flag: str = "--weights") -> Any:
  """`pfc_jax.weights.load(model, path)` for a command whose `flag` gave `path`.

  Raises:
    ValueError: when the weights cannot be found or read: `flag`, the file and what is wrong,
      in one message (a missing optional package included).
  """
  try:
    return weights.load(model, path)
  except (OSError, ValueError, ImportError) as e:
    if path is None:
      raise ValueError(f"`{flag}` not given: {e} Pass the file with `{flag} FILE`.") from e
    raise ValueError(f"`{flag}`: {e}") from e
