"""The persistent compilation cache in $PFC_JAX_CACHE: a second process loads, not compiles."""

import os
import subprocess
import sys

import jax
import pytest

from pfc_jax import compilation_cache

_PROGRAM = """
import jax, jax.numpy as jnp
from pfc_jax import compilation_cache
hits = []
jax.monitoring.register_event_listener(
    lambda event, **kwargs: hits.append(event) if event.endswith("cache_hits") else None)
print(compilation_cache.enable())
jax.block_until_ready(jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((8, 8))))
print(len(hits))
"""


def _run(env_value: str) -> list[str]:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", compilation_cache.ENV_VAR: env_value}
  result = subprocess.run([sys.executable, "-c", _PROGRAM], env=env, check=True, timeout=120,
                          capture_output=True, text=True)
  return result.stdout.split()


def test_second_process_hits_the_cache(tmp_path):
  folder = tmp_path / "cache"
  cold = _run(str(folder))
  assert cold == [str(folder), "0"] and any(folder.iterdir())
  warm = _run(str(folder))
  assert warm[0] == str(folder) and int(warm[1]) >= 1


def test_unset_changes_nothing(monkeypatch):
  monkeypatch.delenv(compilation_cache.ENV_VAR, raising=False)
  before = jax.config.jax_compilation_cache_dir
  assert compilation_cache.enable() is None
  assert jax.config.jax_compilation_cache_dir == before


def test_a_file_in_the_way_is_a_clear_error(tmp_path, monkeypatch):
  blocker = tmp_path / "file"
  blocker.write_text("")
  monkeypatch.setenv(compilation_cache.ENV_VAR, str(blocker / "cache"))
  with pytest.raises(ValueError, match="PFC_JAX_CACHE"):
    compilation_cache.enable()
