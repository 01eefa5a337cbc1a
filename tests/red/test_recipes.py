"""The "how to add a mode" recipe of docs/ARCHITECTURE.md holds: one row in red/modes.py's MODES is a mode the
config accepts, the run plan phases, the loss and the offline weight follow, and the step dispatch picks."""

import pytest

from red import modes, step
from red.config import ConfigError, load_config
from red.modes import Mode


def test_a_mode_is_one_row_of_the_table(monkeypatch):
    with pytest.raises(ConfigError, match="'algorithm.mode': must be one of"):
        load_config(overrides=["algorithm.mode=red_luffy"])
    monkeypatch.setitem(
        modes.MODES, "red_luffy", Mode("rl", teacher=True, shaping="luffy", entropy_coef=0.01)
    )
    cfg = load_config(overrides=["algorithm.mode=red_luffy", "train.steps=5", "rollout.num_offline=2"])
    assert modes.phases(cfg) == (modes.Phase("red_luffy", 5, 2),) and modes.uses_traces(cfg)
    lc = modes.loss_config(cfg, "red_luffy")
    assert lc.offline_shaping == "luffy" and lc.entropy_coef == 0.01
    assert not modes.offline_weight_settings(cfg, "red_luffy", 2)["fixed"]  # algorithm.offline_weight's
    called = []
    monkeypatch.setattr(step, "rl_step", lambda tr, phase: called.append(phase.mode) or {})
    step.run_step(None, modes.phases(cfg)[0])
    assert called == ["red_luffy"]


def test_a_row_naming_an_unknown_shaping_or_weight_fails_when_the_table_is_built():
    with pytest.raises(ValueError, match="Mode.shaping must be one of"):
        Mode("rl", teacher=True, shaping="lufy")
    with pytest.raises(ValueError, match="Mode.offline_weight must be one of"):
        Mode("rl", teacher=True, offline_weight="fix")
