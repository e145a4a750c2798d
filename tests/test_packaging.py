"""Packaging: `import fishercore` imports no framework; fishercore.backends is installed."""

import subprocess
import sys


def test_import_fishercore_imports_no_framework(tmp_path):
    code = (
        "import sys, fishercore, fishercore.backends.mlp\n"
        "bad = sorted(m for m in ('torch', 'jax', 'cupy', 'array_api_strict') if m in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.strip() == "", f"import fishercore imported {out.stdout.strip()}"


def test_backends_live_under_fishercore():
    import fishercore.backends
    from fishercore.backends import mlp

    assert mlp.__name__ == "fishercore.backends.mlp"
    assert fishercore.backends.__file__.replace("\\", "/").rsplit("/", 2)[-2] in ("backends",)
