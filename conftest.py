"""Root conftest: doctests of a framework adapter are collected only where that framework is installed.

(The test suite itself never skips a backend that FISHERCORE_BACKENDS names: see tests/conftest.py.)
"""

import importlib.util

collect_ignore = [f"backends/{name}.py" for name in ("torch", "jax") if importlib.util.find_spec(name) is None]
