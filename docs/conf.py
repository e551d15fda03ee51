"""Sphinx configuration: the API reference from the docstrings, and the Markdown pages of docs/.

Build (warnings are errors, so a broken docstring fails the build):
  pip install -e ".[docs]" && python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "pfc-jax"
author = "pfc-jax authors"
copyright = "pfc-jax authors"  # pylint: disable=redefined-builtin

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.viewcode", "myst_parser"]

source_suffix = {".md": "markdown"}
exclude_patterns = ["_build", "results/gpu_check"]
# Single backticks in docstrings mean code, as in the Markdown pages.
default_role = "code"

napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# `PerturbConfig`'s fields, documented in the groups a reader thinks in.
napoleon_custom_sections = [(name, "params_style") for name in (
    "Perturbation operator", "Mask", "Objective", "Optimiser", "Execution")]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
# Defaults as written in the source (`PerturbConfig()`), not their expanded repr.
autodoc_preserve_defaults = True
autodoc_default_options = {"members": True, "show-inheritance": False}

myst_heading_anchors = 4
html_theme = "alabaster"


def _skip_namedtuple_fields(app, what, name, obj, skip, options):
  """Leave out NamedTuple fields ("Alias for field number N"): their `Attributes:` section
  documents them."""
  del app, what, name, options
  if (getattr(obj, "__doc__", None) or "").startswith("Alias for field number"):
    return True
  return skip


def setup(app):
  app.connect("autodoc-skip-member", _skip_namedtuple_fields)
