"""Sphinx configuration: MyST markdown pages, API reference from the numpydoc docstrings."""

project = "fishercore"
author = "fishercore developers"
release = "0.1.0"
extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax",
              "sphinx.ext.viewcode"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build", "examples/*.py"]
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3
napoleon_numpy_docstring = True
napoleon_google_docstring = False
autodoc_member_order = "bysource"
autodoc_typehints = "none"
# The adapters' frameworks need not be installed to document them.
autodoc_mock_imports = ["torch", "jax"]
html_theme = "alabaster"
html_static_path = []
suppress_warnings = ["myst.header"]
