"""scripts/install.sh's idempotence check, run hermetically on a copy of the script: a second run must only
check (the stamp, the imports and the editable location of `red`), and `--check` never installs."""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HASHED = ("pyproject.toml", "constraints.txt", "constraints-vllm-cpu.txt")


@pytest.fixture
def root(tmp_path):
    """A repo-shaped directory: the script, the hashed files, a .venv whose python is this interpreter, and a
    stand-in `red` package under the root (so `red.__file__` lies inside it, as after an editable install)."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "install.sh", tmp_path / "scripts")
    for name in HASHED:
        shutil.copy(REPO / name, tmp_path / name)
    py = tmp_path / ".venv" / "bin" / "python"
    py.parent.mkdir(parents=True)
    py.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    py.chmod(0o755)
    (tmp_path / "red").mkdir()
    (tmp_path / "red" / "__init__.py").write_text("")
    digest = hashlib.sha256(b"".join((tmp_path / n).read_bytes() for n in HASHED)).hexdigest()
    (tmp_path / ".venv" / ".red-kernels-install").write_text(f"{digest} vllm=0\n")
    return tmp_path


def check(root, pythonpath):
    env = {**os.environ, "RED_SKIP_VLLM": "0", "PYTHONPATH": str(pythonpath)}
    return subprocess.run(
        ["bash", str(root / "scripts" / "install.sh"), "--check"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_complete_install_is_only_checked(root):
    out = check(root, root)
    assert out.returncode == 0, out.stderr
    assert "already installed in .venv (checked)" in out.stdout


def test_changed_constraints_are_not_current(root):
    (root / "constraints.txt").write_text((root / "constraints.txt").read_text() + "\n# changed\n")
    stamp = (root / ".venv" / ".red-kernels-install").read_text()
    out = check(root, root)
    assert out.returncode == 1 and "run bash scripts/install.sh" in out.stderr
    assert (root / ".venv" / ".red-kernels-install").read_text() == stamp  # --check installed nothing


def test_red_imported_from_elsewhere_is_not_this_install(root, tmp_path_factory):
    other = tmp_path_factory.mktemp("other")
    (other / "red").mkdir()
    (other / "red" / "__init__.py").write_text("")
    assert check(root, other).returncode == 1
