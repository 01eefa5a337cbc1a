"""Numeric guards (issue 24, case 4): a non-finite loss or gradient skips the update and is counted in the
metrics; N in a row stop the run with the last good checkpoint intact; weights that went non-finite
(optim.lr=inf) stop the run before anything is saved, and checkpoint.save refuses non-finite weights."""

import math
import os
import shutil

import pytest
import torch
from conftest import tiny_args
from safetensors.torch import load_file

import red.train as train_mod
from red import checkpoint, synthetic
from red.checkpoint import NonFiniteError
from red.config import load_config
from red.metrics import read_metrics
from red.run_dir import RunDir


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("numerics") / "run")
    assert train_mod.main(tiny_args(out, 4)) == 0
    return out


def _all_finite(out):
    return all(
        bool(torch.isfinite(t).all())
        for d in os.listdir(out)
        if d.startswith("step_")
        for t in load_file(os.path.join(out, d, "model.safetensors")).values()
    )


def test_lr_inf_stops_before_saving_non_finite_weights(base_run, tmp_path, capsys):
    out = str(tmp_path / "run")
    shutil.copytree(base_run, out)
    with open(os.path.join(out, "latest"), "w") as fh:
        fh.write("step_2\n")
    step4 = open(os.path.join(out, "step_4", "model.safetensors"), "rb").read()
    cfg = load_config(None, tiny_args(out, 4, "checkpoint.allow_changes=[optim.lr]"))
    cfg.optim.lr = math.inf  # refused at load (test_bad_inputs); forced here to reach the guard
    with pytest.raises(NonFiniteError, match=r"step 3: the optimizer step made the weights non-finite"):
        train_mod.train(cfg)
    assert open(os.path.join(out, "latest")).read().strip() == "step_2"
    assert open(os.path.join(out, "step_4", "model.safetensors"), "rb").read() == step4
    assert _all_finite(out)
    assert not os.path.exists(os.path.join(out, "run.lock"))  # released on the way out


def _nan_norm_from(monkeypatch, steps: set):
    """clip_grad_norm_ reports NaN on the given (1-based) calls, as a NaN gradient would."""
    real, calls = torch.nn.utils.clip_grad_norm_, []

    def fake(params, max_norm, *a, **k):
        calls.append(1)
        norm = real(params, max_norm, *a, **k)
        return torch.full_like(norm, math.nan) if len(calls) in steps else norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", fake)
    opt_steps = []
    real_step = torch.optim.AdamW.step

    def counted(self, *a, **k):
        opt_steps.append(1)
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", counted)
    return opt_steps


def test_one_non_finite_step_is_skipped_counted_and_training_goes_on(tmp_path, monkeypatch, caplog):
    out = str(tmp_path / "run")
    opt_steps = _nan_norm_from(monkeypatch, {3})
    assert train_mod.main(tiny_args(out, 4)) == 0
    rows = {r["step"]: r for r in read_metrics(os.path.join(out, "metrics.jsonl"))}
    assert [rows[s]["update_skipped_nonfinite"] for s in (1, 2, 3, 4)] == [0, 0, 1, 0]
    assert rows[4]["updates_skipped_total"] == 1 and rows[3]["grad_norm"] is None  # NaN -> null in JSON
    assert len(opt_steps) == 3  # the optimizer never stepped on the NaN gradient
    assert any(
        "step 3: non-finite loss or gradient norm, update skipped" in r.getMessage() for r in caplog.records
    )
    assert _all_finite(out)


def test_n_non_finite_steps_in_a_row_stop_the_run_with_the_last_checkpoint_intact(
    tmp_path, monkeypatch, capsys
):
    out = str(tmp_path / "run")
    _nan_norm_from(monkeypatch, {3, 4, 5, 6})
    assert train_mod.main(tiny_args(out, 6, "train.max_nonfinite_steps=2")) == 3
    err = capsys.readouterr().err
    assert (
        "steps 3..4: a non-finite loss or gradient in 2 steps in a row" in err and "step_2) is intact" in err
    )
    assert "Traceback" not in err
    assert RunDir(out).latest().endswith("step_2") and sorted(
        d for d in os.listdir(out) if d.startswith("step_")
    ) == ["step_2"]
    assert [r["step"] for r in read_metrics(os.path.join(out, "metrics.jsonl"))] == [0, 1, 2, 3, 4]


def test_checkpoint_save_refuses_non_finite_weights(tmp_path):
    tok = synthetic.build_tokenizer()
    model = synthetic.build_model(
        tok,
        {
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
        },
        seed=0,
    )
    with torch.no_grad():
        next(model.parameters())[0, 0] = math.inf
    opt = torch.optim.AdamW(model.parameters())
    run = RunDir(str(tmp_path))
    with pytest.raises(
        NonFiniteError, match=r"step 1: \d weight tensors are not finite \(e.g. model.embed_tokens.weight\)"
    ):
        checkpoint.save(run, 1, model, tok, torch.float32, opt, {"trainer": {}}, keep=2)
    assert os.listdir(tmp_path) == []
