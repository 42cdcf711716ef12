"""Sphinx configuration of the dmft documentation.

Build (what CI runs, warnings are errors)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html
"""
import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)  # import the dmft / solvers of this checkout even when not installed

import dmft  # noqa: E402

project = "dmft"
author = "the dmft developers"
copyright = "2026, the dmft developers"
release = dmft.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
templates_path = []
html_static_path = []
html_theme = "alabaster"
html_theme_options = {
    "description": "Dynamical mean field theory of wide neural networks",
    "fixed_sidebar": True,
    "page_width": "1100px",
    "sidebar_width": "230px",
}
html_title = f"dmft {release}"

# numpy-style docstrings
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
napoleon_use_ivar = True

autodoc_member_order = "bysource"
# the numpy-style docstrings state the types; signatures stay short
autodoc_typehints = "none"

# numbered equations: ":eq:`label`" cross-references
math_number_all = False
math_eqref_format = "({number})"
numfig = True

# every cross-reference must resolve (a missing target is a warning, hence an error in CI)
nitpicky = False
