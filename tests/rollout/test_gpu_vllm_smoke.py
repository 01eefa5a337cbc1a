"""The vLLM stage of bench/gpu_check.sh runs without a GPU as far as it can: --dry-run builds its model and imports
the engine modules; without vLLM it reports SKIPPED and succeeds (only that stage is skipped)."""

import importlib.util
import json

from bench import gpu_vllm_smoke


def test_dry_run_builds_the_model_and_writes_a_report(tmp_path):
    assert gpu_vllm_smoke.main(["--dry-run", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_vllm_smoke.json").read_text())
    check = report["checks"]["dry_run_model_built"]
    assert check["ok"] and check["params"] > 0 and "crashed" not in report["checks"]


def test_without_vllm_the_stage_says_so_and_passes(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a)
    )
    assert gpu_vllm_smoke.main(["--out", str(tmp_path)]) == 0
    assert "SKIPPED: vLLM is not installed" in capsys.readouterr().out
    assert json.loads((tmp_path / "gpu_vllm_smoke.json").read_text())["skipped"] == "vllm not installed"


def test_a_failed_check_fails_the_stage(tmp_path, monkeypatch):
    def crash(smoke, args, tmp):
        smoke.check("something", False, why="test")

    monkeypatch.setattr(gpu_vllm_smoke, "_run", crash)
    assert gpu_vllm_smoke.main(["--dry-run", "--out", str(tmp_path)]) == 1


def test_an_untested_vllm_version_fails_the_stage_but_the_checks_still_run(tmp_path, monkeypatch):
    import red.rollout.vllm_engine as vllm_engine
    import red.rollout.vllm_sync as vllm_sync

    def engine(*args, **kwargs):
        raise RuntimeError("engine reached")

    real_check, real_spec = vllm_sync.check_vllm_version, importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real_spec(name, *a)
    )
    monkeypatch.setattr(vllm_sync, "check_vllm_version", lambda version=None: real_check("0.40.0"))
    monkeypatch.setattr(vllm_engine, "VLLMEngine", engine)
    assert gpu_vllm_smoke.main(["--out", str(tmp_path)]) == 1
    checks = json.loads((tmp_path / "gpu_vllm_smoke.json").read_text())["checks"]
    assert not checks["vllm_version_in_supported_range"]["ok"]
    assert "0.40.0" in checks["vllm_version_in_supported_range"]["error"]
    assert "engine reached" in checks["crashed"]["error"]  # the stage went on to start the engine
