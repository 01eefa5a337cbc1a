"""bench/: the peak-memory meter, the results file and the report, against hand-made known quantities."""

import json

import pytest
import torch

from bench import cases, gpu_bench, impls, measure, record, report
from bench.test_bench_trainer import phase_summary

MIB = 2**20


def _touch(n_bytes):
    t = torch.empty(n_bytes // 4, dtype=torch.float32)
    t.fill_(1.0)  # make the pages resident
    return t


@pytest.mark.skipif(not measure.cpu_peak_resettable(), reason="needs Linux /proc/self/clear_refs")
def test_cpu_peak_counts_a_freed_temporary_and_subtracts_outputs():
    def run():
        out = _touch(32 * MIB)  # output: counted in the peak, then subtracted
        tmp = _touch(96 * MIB)  # transient: must show up
        del tmp
        return (out,)

    for _ in range(2):  # the second measurement must not be hidden by memory the first freed
        m = measure.MeasuredRun(run, "cpu", measure_call=0)
        m()
        assert m.peak_bytes / MIB == pytest.approx(128, abs=6)
        assert m.extra_bytes / MIB == pytest.approx(96, abs=6)


@pytest.mark.skipif(not measure.cpu_peak_resettable(), reason="needs Linux /proc/self/clear_refs")
def test_cpu_peak_baseline_excludes_previous_outputs():
    state = {}

    def run():
        state.pop("grad", None)  # like run() setting .grad = None: frees the previous call's output
        tmp = _touch(16 * MIB)
        state["grad"] = _touch(8 * MIB)
        del tmp
        return (state["grad"],)

    run.reset = lambda: state.pop("grad", None)
    run()  # leaves an output alive; MeasuredRun must free it before the baseline
    m = measure.MeasuredRun(run, "cpu", measure_call=0)
    m()
    assert m.peak_bytes / MIB == pytest.approx(24, abs=3)
    assert m.extra_bytes / MIB == pytest.approx(16, abs=3)


def test_tensor_bytes_counts_shared_storage_once():
    a = torch.zeros(1000)
    assert measure.tensor_bytes([a, a[10:], None, torch.zeros(10, dtype=torch.float64)]) == 4000 + 80


def _row(impl, mode, t, mib, device="cpu"):
    case = cases.Case(
        "logprobs" if mode.startswith("fwd") else "loss",
        mode,
        "qwen2.5-0.5b",
        4096 if device == "cpu" else 16_384,
        impl,
        device,
    )
    return record.make_row(case, [t, t * 1.1, t * 0.9], mib * MIB, cpu_times=[2 * t, 2.2 * t])


def test_rows_targets_and_report(tmp_path):
    rows = [
        _row("naive", "fwdbwd", 20.0, 8000.0),
        _row("torch", "fwdbwd", 25.0, 800.0),
        _row("naive", "red", 20.0, 6000.0),
        _row("torch", "red", 26.0, 700.0),
        _row("liger", "grpo", 30.0, 900.0),
        _row("torch", "grpo", 21.0, 700.0),
    ]
    r = rows[1]
    assert r["time_s"]["median"] == 25.0 and r["time_s"]["rounds"] == 3
    assert r["tflops"] == pytest.approx(4 * 2 * 4096 * 896 * 151_936 / 25.0 / 1e12)
    assert r["frac_peak"] is None  # no % of the H100 peak for CPU rows
    got = {(t["label"], t["metric"]): t for t in report.targets(rows)}
    mem = got[("linear_logprobs fwd+bwd, peak extra memory", "extra")]
    assert mem["ratio"] == pytest.approx(0.1) and mem["met"]
    assert got[("linear_logprobs fwd+bwd, time", "time")]["ratio"] == pytest.approx(1.25)
    red = got[("RED loss fwd+bwd, time", "time")]
    assert (
        red["ratio"] == pytest.approx(1.3) and red["met"] is False and red["cpu_ratio"] == pytest.approx(1.3)
    )
    assert got[("GRPO loss fwd+bwd vs Liger GRPO (eager), time", "time")]["ratio"] == pytest.approx(0.7)

    path = record.append_run(tmp_path / "cpu-test.json", {"device": "test cpu", "note": "first"}, rows[:2])
    record.append_run(path, {"device": "test cpu", "note": "second"}, rows)
    data = json.loads(path.read_text())
    assert [run["note"] for run in data["runs"]] == ["first", "second"]
    md = report.write_report(path).read_text()
    assert "| 1.300 | 1.300 | ≤ 1.2 | **no** |" in md  # RED loss time target missed
    assert "| 25000.0 | 52500 | 1.25 | 4 |" in md  # torch fwd+bwd: ms, CPU ms, × naive, GEMMs
    assert path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gpu_bench_runner_records_results_errors_and_budget(tmp_path, monkeypatch):
    """The plain-Python runner (used on the GPU image) on CPU with a tiny shape."""
    monkeypatch.setitem(cases.MODELS, "tiny", (16, 200))
    good = [cases.Case("logprobs", "fwdbwd", "tiny", 64, i) for i in ("naive", "torch")]
    bad = cases.Case("logprobs", "fwd", "tiny", 64, "naive")
    real_build = impls.build

    def build(case, inp):
        if case == bad:
            raise torch.OutOfMemoryError("pretend")
        return real_build(case, inp)

    monkeypatch.setattr(impls, "build", build)
    out = tmp_path / "dev.json"
    rows = gpu_bench.run_cases(good + [bad], out, {"device": "tiny"}, budget_s=60, warmup=1, max_reps=3)
    by_id = {r["id"]: r for r in rows}
    assert all(by_id[c.id]["time_s"]["rounds"] == 3 and by_id[c.id]["error"] is None for c in good)
    assert by_id[bad.id]["error"].startswith("OutOfMemoryError")
    late = gpu_bench.run_cases(good, out, {"device": "tiny"}, budget_s=-1)
    assert all(r["error"] == "not run: time budget spent" for r in late)
    assert [len(run["results"]) for run in json.loads(out.read_text())["runs"]] == [3, 2]


def test_trainer_phase_summary_and_table():
    def step(i, rollout, update, mode="red"):
        return {
            "step": i,
            "mode": mode,
            "time_rollout": rollout,
            "time_reward": 0.01,
            "time_old_pass": 0.2,
            "time_update": update,
            "time_step": rollout + update + 0.21,
            "tokens": 1000,
            "tokens_per_s": 500.0,
        }

    metrics = [
        {"step": 0},
        step(1, 9.0, 9.0),
        step(2, 1.0, 2.0),
        step(3, 3.0, 4.0),
        step(4, 2.0, 3.0),
        {**step(5, 50.0, 50.0), "skipped_update": 1},
    ]
    p = phase_summary(metrics)
    assert (p["time_rollout"], p["time_update"], p["steps"], p["first_step_s"]) == (2.0, 3.0, 3, 18.21)
    md = report.render_rows([{"op": "trainer", "command": "python -m red.train", "phases": p}])
    assert "| `python -m red.train` | red | 2.000 | 0.010 | 0.200 | 3.000 | 5.210 | 1000 | 500 | — |" in md
    assert (
        phase_summary(metrics + [step(6, 1.0, 1.0, "grpo"), step(7, 5.0, 5.0, "grpo")], mode="grpo")[
            "time_rollout"
        ]
        == 5.0
    )  # only the grpo steps, the first of them excluded


def test_peer_ratios_compare_ours_with_each_peer_of_the_same_case():
    def row(impl, ms, cpu_ms, mib, tokens=512):
        case = cases.Case("logprobs", "fwdbwd", "qwen2.5-0.5b", tokens, impl)
        return record.make_row(case, [ms / 1e3], int(mib * MIB), cpu_times=[cpu_ms / 1e3])

    rows = [
        row("torch", 100, 90, 10),
        row("naive", 200, 180, 100),
        row("trl", 400, 450, 50),
        row("liger_flsce", 50, 30, 5),
        row("trl", 1, 1, 1, tokens=1024),
    ]  # another case: not compared
    got = {q["peer"]: (q["time"], q["cpu"], q["extra"]) for q in report.peer_ratios(rows)}
    want = {"naive": (0.5, 0.5, 0.1), "trl": (0.25, 0.2, 0.2), "liger_flsce": (2.0, 3.0, 2.0)}
    assert got.keys() == want.keys()
    for peer, ratios in want.items():
        assert got[peer] == pytest.approx(ratios, rel=1e-9)
    md = report.render_run({"results": rows})
    assert (
        "| fwd+bwd (log p + entropy), qwen2.5-0.5b N=512 | torch | TRL ChunkedLogProbFunction | 100 / 400 | "
        "0.250 | 0.200 | 10 / 50 | 0.200 |" in md
    )
