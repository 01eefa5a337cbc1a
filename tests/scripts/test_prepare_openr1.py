"""scripts/prepare_openr1.py on small stand-ins with the columns of the paper's training set (LUFFY's
OpenR1-Math-46k layout, and OpenR1-Math's own): the output is what the paper's config reads."""

import importlib.util
import pathlib

import pyarrow as pa
import pyarrow.parquet as pq

from red.config import load_config
from red.data import load_source

ROOT = pathlib.Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("prepare_openr1", ROOT / "scripts" / "prepare_openr1.py")
prepare_openr1 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prepare_openr1)

SYSTEM = {"role": "system", "content": "Reason step by step."}
LUFFY_46K = [  # data_source, prompt, target, ability, reward_model, extra_info (as in OpenR1-Math-46k-8192)
    {
        "data_source": "openr1",
        "prompt": [SYSTEM, {"role": "user", "content": "Find $x$ if $2x=6$."}],
        "target": [{"role": "assistant", "content": "<think>2x=6</think> x=3, \\boxed{3}"}],
        "ability": "math",
        "reward_model": {"ground_truth": "3", "style": "rule"},
        "extra_info": {"index": 0, "split": "default"},
    },
    {
        "data_source": "openr1",
        "prompt": [SYSTEM, {"role": "user", "content": "What is $1+1$?"}],
        "target": [],  # no trace: skipped
        "ability": "math",
        "reward_model": {"ground_truth": "2", "style": "rule"},
        "extra_info": {"index": 1, "split": "default"},
    },
    {
        "data_source": "openr1",
        "prompt": [SYSTEM, {"role": "user", "content": "Compute $3^2$."}],
        "target": [{"role": "assistant", "content": "9 \\boxed{9}"}],
        "ability": "math",
        "reward_model": {"ground_truth": "", "style": "rule"},  # no gold answer: a bad row, skipped
        "extra_info": {"index": 2, "split": "default"},
    },
]
OPENR1_RAW = [
    {
        "problem": "What is 2+3?",
        "solution": "\\boxed{5}",
        "answer": "5",
        "generations": ["\\boxed{6}", "so \\boxed{5}"],
        "correctness_math_verify": [False, True],
    }
]


def test_luffy_layout_becomes_the_paper_configs_training_file(tmp_path, capsys):
    src, out = tmp_path / "train.parquet", tmp_path / "data" / "openr1_math_46k.parquet"
    pq.write_table(pa.Table.from_pylist(LUFFY_46K), src)
    assert prepare_openr1.main(["--src", str(src), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == (
        f"{out}: 1 problems with a teacher trace (1 bad rows, 1 without a trace skipped)"
    )
    cfg = load_config("qwen2.5-math-1.5b-openr1", [f"data.train={out}"])
    (ex,), skipped = load_source(cfg.data.train, cfg.data)
    assert (ex.problem, ex.answer, ex.traces, ex.source) == (
        "Find $x$ if $2x=6$.",
        "3",
        ["<think>2x=6</think> x=3, \\boxed{3}"],
        "openr1",
    ) and skipped == []


def test_openr1_layout_keeps_the_verified_generation(tmp_path):
    src, out = tmp_path / "raw.jsonl", tmp_path / "out.parquet"
    src.write_text("".join(__import__("json").dumps(r) + "\n" for r in OPENR1_RAW))
    assert prepare_openr1.main(["--src", str(src), "--out", str(out)]) == 0
    assert pq.read_table(out).to_pylist() == [
        {"problem": "What is 2+3?", "answer": "5", "target": "so \\boxed{5}", "data_source": "raw"}
    ]
    assert prepare_openr1.main(["--src", str(tmp_path / "missing.jsonl"), "--out", str(out)]) == 2


def test_benchmark_paths_follow_red_bench_dir_and_none_is_absolute(monkeypatch):
    monkeypatch.setenv("RED_BENCH_DIR", "/elsewhere/bench")
    cfg = load_config("qwen2.5-math-1.5b-openr1")
    assert cfg.data.eval[0] == "/elsewhere/bench/math500.jsonl" and len(cfg.data.eval) == 5
    monkeypatch.delenv("RED_BENCH_DIR")
    assert load_config("qwen2.5-math-1.5b-openr1").data.eval[0] == "../shared/data/math500.jsonl"
    for path in [
        *ROOT.glob("experiments/**/*.py"),
        *ROOT.glob("red/configs/*.yaml"),
        *ROOT.glob("scripts/*"),
    ]:
        assert "/work/shared" not in path.read_text(), path
