"""Root conftest: the doctests of a framework's modules are collected only where the framework is installed.

(The test suite itself never skips a backend that FISHERCORE_BACKENDS names: see tests/conftest.py.)
"""

import importlib.util
import pathlib

HERE = pathlib.Path(__file__).parent
collect_ignore = [str(path.relative_to(HERE)) for name in ("torch", "jax") if importlib.util.find_spec(name) is None
                  for path in sorted((HERE / "backends").glob(f"*{name}*.py"))]
