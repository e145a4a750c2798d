"""Documentation that runs: the README example prints what the README shows; docs/examples run."""

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# the sharded examples start processes or devices and are run, with their output checked, by test_sharded.py
EXAMPLES = sorted(p for p in (ROOT / "docs" / "examples").glob("*.py") if not p.name.startswith("sharded_"))


def _readme_example():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Example", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    printed = re.search(r"prints\s*\n+```text\n(.*?)```", section, re.S).group(1)
    return code, printed


def test_readme_example_runs_as_printed(tmp_path):
    code, printed = _readme_example()
    # run from an empty folder, as a user would: the repo root would shadow the installed package
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.strip() == printed.strip()


def test_readme_starts_with_install_and_test_commands():
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S)
    assert blocks[0].strip().startswith("python3 -m pip install")
    assert blocks[1].strip() == "python3 -m pip install tox && python3 -m tox -p auto"
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "README.md" in ci  # .ci/run takes the test command from the README itself


def _framework(path):
    """The framework a page or example needs: named in its file name (``ewc_torch.py``, ``backends/jax.md``), or
    for a page without one, the framework its code imports (``docs/models.md``)."""
    named = next((name for name in ("torch", "jax") if name in path.stem.split("_")), None)
    if named or path.suffix != ".md":
        return named
    code = "".join(re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), re.S))
    return next((name for name in ("torch", "jax") if re.search(rf"^import {name}\b", code, re.M)), None)


def _params(paths):
    """One parameter per file, marked with the backend it exercises (it runs where that backend is named)."""
    return [pytest.param(p, id=str(p.relative_to(ROOT) if p.suffix == ".md" else p.name),
                         marks=[pytest.mark.backends(_framework(p))] if _framework(p) else []) for p in paths]


@pytest.mark.parametrize("script", _params(EXAMPLES))
def test_docs_examples_run(script, tmp_path):
    """Every example script runs (one named after a framework needs that framework selected)."""
    from helpers import require_framework

    if _framework(script):
        require_framework(_framework(script))
    subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True, cwd=tmp_path)


PAGES = sorted(p for p in (ROOT / "docs").rglob("*.md") if "```python" in p.read_text(encoding="utf-8"))


@pytest.mark.parametrize("page", _params(PAGES))
def test_docs_pages_run(page, tmp_path):
    """Every ```python block of a docs page runs (pages of a framework need it selected)."""
    from helpers import require_framework

    if _framework(page):
        require_framework(_framework(page))
    code = "\n".join(re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), re.S))
    subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
