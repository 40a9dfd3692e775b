"""Sphinx configuration for the jax_sparseconv documentation (Sphinx + MyST).

Build with ``docs/build.sh`` (HTML with warnings as errors, then the doctest builder).
"""

from __future__ import annotations

import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the editable install makes this redundant; harmless otherwise
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # examples run on the CPU, in seconds

project = "jax_sparseconv"
author = "jax_sparseconv contributors"
copyright = "2026, jax_sparseconv contributors"

extensions = [
    "myst_parser",            # pages in Markdown (MyST)
    "sphinx.ext.autodoc",     # the API reference from the docstrings
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",    # Google-style docstrings (Args:, Returns:, Attributes:)
    "sphinx.ext.doctest",     # `sphinx-build -b doctest` runs every {doctest} block
    "sphinx.ext.viewcode",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "README.md", "build.sh", "Thumbs.db", ".DS_Store"]

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

# --- autodoc -----------------------------------------------------------------------------
autodoc_default_options = {
    "member-order": "bysource",
    # Flax Linen modules are dataclasses: these fields are described in each class's
    # "Attributes:" section, and autodoc would otherwise list the defaults' own docstrings
    # (``jnp.float32``'s, an initializer's) as if they were members.
    "exclude-members": "dtype, param_dtype, kernel_init, bias_init, scale_init, parent",
}
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# "Attributes:" of a Flax module (a dataclass) as a field list: with `.. attribute::`
# entries they would clash with the fields autodoc finds itself.
napoleon_use_ivar = True

# --- doctest -----------------------------------------------------------------------------
# The docstrings' own `>>>` examples run under `pytest --doctest-modules jax_sparseconv`
# (the README's test command); here only the pages' {doctest} blocks run.
doctest_test_doctest_blocks = ""
doctest_global_setup = """
import numpy as np
import jax
import jax.numpy as jnp
import jax_sparseconv as sc
"""

# --- HTML --------------------------------------------------------------------------------
html_theme = "furo"
html_title = "jax_sparseconv"
