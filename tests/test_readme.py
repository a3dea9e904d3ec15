"""The README as written: its Python blocks run (in order, one namespace, as a reader pastes them), and every
``python -m MODULE`` and console script its shell blocks name exists. A block whose first line is
``# needs: ...`` (real weights, a GPU, the network) is skipped with that reason."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
BLOCKS = re.findall(r"^```(\w+)\n(.*?)^```", README, flags=re.S | re.M)  # [(language, code)]
PYTHON = [code for lang, code in BLOCKS if lang == "python"]


def test_readme_has_python_blocks():
    assert len(PYTHON) >= 2 and any(not c.startswith("# needs:") for c in PYTHON)


def test_python_blocks_run(capsys):
    namespace: dict = {"__name__": "__readme__"}
    skipped = []
    for i, code in enumerate(PYTHON):
        if code.startswith("# needs:"):
            skipped.append(code.splitlines()[0])
            continue
        try:
            exec(compile(code, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as e:  # the block and its error, as the reader would see them
            pytest.fail(f"README python block {i + 1} fails: {type(e).__name__}: {e}\n{code}")
    assert "labels" in namespace and namespace["labels"].shape == (120, 160)  # the segmentation example ran
    assert all(": " in s for s in skipped)


def test_shell_commands_name_existing_modules_and_scripts():
    setup = (REPO / "setup.py").read_text()
    scripts = set(re.findall(r'"([\w-]+)=[\w.]+:\w+"', setup))
    shell = "\n".join(code for lang, code in BLOCKS if lang in ("bash", "sh", "shell"))
    modules = set(re.findall(r"python -m ([\w.]+)", shell))
    assert modules, "no python -m commands found"
    missing = sorted(m for m in modules if importlib.util.find_spec(m) is None)
    assert not missing, f"README runs modules that do not exist: {missing}"
    used = set(re.findall(r"^\s*(groupvit-[\w-]+)", shell, flags=re.M))
    assert used <= scripts, f"README uses console scripts setup.py does not install: {sorted(used - scripts)}"
