"""log.report_to: [wandb] beside metrics.jsonl: every numeric metric at its step, the config and the dynamics
plot go to W&B (a recording stand-in here; a real offline run where wandb is installed); unknown trackers and a
missing wandb are one-line errors."""

import importlib.machinery
import json
import sys
import types

import pytest

from red.config import ConfigError, load_config
from red.train import main
from tests.e2e.test_train_e2e import TINY


class FakeWandb(types.ModuleType):
    def __init__(self):
        super().__init__("wandb")
        self.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
        self.calls = []
        fake = self

        class Run:
            def log(self, data, step=None):
                fake.calls.append(("log", data, step))

            def finish(self):
                fake.calls.append(("finish",))

        self._run = Run()

    def init(self, **kw):
        self.calls.append(("init", kw))
        return self._run

    def Image(self, path):  # noqa: N802 (wandb's name)
        return ("image", path)


def test_wandb_gets_the_config_every_metric_and_the_plot(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = tmp_path / "run"
    args = [f"output_dir={out}", "train.steps=2", "log.report_to=[wandb]", *TINY, "log.plot=true"]
    assert main(args) == 0
    (init,) = [c[1] for c in fake.calls if c[0] == "init"]
    assert init["dir"] == str(out) and init["config"]["log"]["report_to"] == ["wandb"]
    assert init["config"]["rollout"]["n"] == 4
    logged = {}
    for call in fake.calls:
        if call[0] == "log" and call[2] is not None:
            logged.setdefault(call[2], {}).update(call[1])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        numbers.pop("step")
        assert {k: logged[row["step"]][k] for k in numbers} == numbers
    assert ("log", {"dynamics": ("image", str(out / "dynamics.png"))}, None) in fake.calls
    assert fake.calls[-1] == ("finish",)


def test_unknown_tracker_and_missing_wandb_are_errors(tmp_path, monkeypatch, capsys):
    with pytest.raises(ConfigError, match=r"log.report_to.*tensorboard and/or wandb, got 'mlflow'"):
        load_config(None, ["log.report_to=[mlflow]"])
    monkeypatch.setitem(sys.modules, "wandb", None)
    assert main([f"output_dir={tmp_path}/r", "log.report_to=[wandb]", "train.steps=1", *TINY]) == 2
    assert "pip install 'red-kernels[tracking]'" in capsys.readouterr().err


def test_real_wandb_offline_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")  # installed by the [tracking] extra
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    assert main([f"output_dir={out}", "train.steps=1", "log.report_to=[wandb, tensorboard]", *TINY]) == 0
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    assert list(run_dir.glob("*.wandb")) and list((out / "tb").iterdir())
