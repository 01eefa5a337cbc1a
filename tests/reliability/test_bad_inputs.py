"""Every bad input gets one clear line and exit status 2, no traceback (issue 24, cases 5-8 and 10): each case
runs `python -m red.train` or `python -m red.eval` as a subprocess and fails before any model loads. The cases
run four at a time (each is mostly the interpreter's imports)."""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import TINY

from red.config import ConfigError, load_config


def _jsonl(tmp, name, data: bytes):
    p = tmp / name
    p.write_bytes(data)
    return str(p)


def _parquet_binary(tmp):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp / "binary.parquet"
    pq.write_table(
        pa.table(
            {"problem": ["1+1?", "2+2?"], "answer": ["2", "4"], "trace": [b"\\boxed{2}", b"\\boxed{4}"]}
        ),
        p,
    )
    return str(p)


def _no_tokenizer(tmp):
    d = tmp / "model_without_tokenizer"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    return str(d)


def _bad_yaml(tmp):
    p = tmp / "bad.yaml"
    p.write_text("train:\n  steps: 4\n  prompts_per_step: [1, 2\nseed: 1\n")
    return str(p)


def _file(tmp):
    p = tmp / "a_file"
    p.write_text("x")
    return str(p)


LATIN1 = '{"problem": "caf\u00e9", "answer": "1"}\n'.encode("latin-1")  # byte 16 is not UTF-8
TRAIN = ("red.train",)
EVAL = ("red.eval",)
# id -> (module, arguments given the tmp folder, what stderr must say)
CASES = {
    "data not utf-8": (
        TRAIN,
        lambda t: [f"data.train={_jsonl(t, 'latin1.jsonl', LATIN1)}"],
        r"latin1.jsonl row 1: not UTF-8 text (byte 16 of the line); re-encode the file as UTF-8",
    ),
    "data is a directory": (
        TRAIN,
        lambda t: [f"data.train={t}"],
        "is a directory: give a .jsonl, .json or .parquet",
    ),
    "jsonl row not an object": (
        TRAIN,
        lambda t: [f"data.train={_jsonl(t, 'list.jsonl', b'[1, 2]' + bytes([10]))}"],
        "list.jsonl row 1: expected a JSON object",
    ),
    "parquet binary text column": (
        TRAIN,
        lambda t: [f"data.train={_parquet_binary(t)}"],
        "binary.parquet row 1, column 'trace': expected text, got binary data (9 bytes)",
    ),
    "yaml syntax error": (
        TRAIN,
        lambda t: ["--config", _bad_yaml(t)],
        "bad.yaml: not valid YAML at line 4, column 5 (did not find expected ',' or ']', while parsing a flow sequence at line 3)",
    ),
    "config path missing": (
        TRAIN,
        lambda t: ["--config", str(t / "configs" / "default.yaml")],
        "default.yaml' does not exist",
    ),
    "output folder not writable": (
        TRAIN,
        lambda t: [f"output_dir={_file(t)}/run"],
        "a_file/run: Not a directory (ENOTDIR); output_dir must be a writable folder",
    ),
    "eval temperature negative": (
        TRAIN,
        lambda t: ["eval.temperature=-1"],
        "config key 'eval.temperature': must be >= 0, got -1.0",
    ),
    "rl temperature zero": (
        TRAIN,
        lambda t: ["rollout.temperature=0"],
        "config key 'rollout.temperature': mode red samples rollout.n answers per prompt; at temperature 0",
    ),
    "eval model path missing": (
        EVAL,
        lambda t: ["--model", str(t / "no_such_model"), "--data", "synthetic:chains"],
        "no_such_model: no such directory",
    ),
    "eval model without tokenizer": (
        EVAL,
        lambda t: ["--model", _no_tokenizer(t), "--data", "synthetic:chains"],
        "model_without_tokenizer: no tokenizer (tokenizer.json, tokenizer_config.json)",
    ),
    "eval max new tokens zero": (
        EVAL,
        lambda t: ["--model", str(t), "--data", "synthetic:chains", "--max-new-tokens", "0"],
        "--max-new-tokens: must be >= 1, got 0",
    ),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """{case id: (return code, stderr)}, all cases run as subprocesses, four at a time."""

    def run(item):
        name, (module, args, _) = item
        tmp = tmp_path_factory.mktemp(name.replace(" ", "_"))
        argv = [sys.executable, "-m", *module, *args(tmp)]
        if module == TRAIN:
            argv += [
                a for a in (f"output_dir={tmp / 'run'}", *TINY) if a.split("=")[0] not in " ".join(args(tmp))
            ]
        res = subprocess.run(argv, capture_output=True, text=True, cwd=tmp, timeout=300)
        return name, (res.returncode, res.stderr)

    with ThreadPoolExecutor(4) as pool:
        return dict(pool.map(run, CASES.items()))


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_clear_line_and_status_2(results, case):
    rc, err = results[case]
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert rc == 2 and "Traceback" not in err, err[-3000:]
    assert len(lines) == 1 and CASES[case][2] in lines[0], err[-3000:]


@pytest.mark.parametrize(
    "override, message",
    [
        ("eval.temperature=-1", "'eval.temperature': must be >= 0, got -1.0"),
        ("optim.warmup_steps=-5", "'optim.warmup_steps': must be >= 0, got -5"),
        ("reward.timeout_s=-1", "'reward.timeout_s': must be > 0, got -1.0"),
        ("warmup.batch_size=0", "'warmup.batch_size': must be >= 1, got 0"),
        ("eval.max_new_tokens=0", "'eval.max_new_tokens': must be >= 1, got 0"),
        ("optim.lr=inf", "'optim.lr': must be > 0, got inf"),
        ("loss.kl_coef=nan", "'loss.kl_coef': must be >= 0, got nan"),
        ("rollout.top_p=0", "'rollout.top_p': must be in (0, 1], got 0.0"),
        ("log.truncation_warn=2", "'log.truncation_warn': must be in [0, 1], got 2.0"),
        ("rollout.temperature=0", "'rollout.temperature': mode red samples rollout.n answers"),
        ("algorithm.mode=grpo rollout.temperature=0", "'rollout.temperature': mode grpo samples"),
    ],
)
def test_out_of_range_values_are_refused_at_load(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, override.split())
    assert message in str(e.value)


def test_sft_at_temperature_zero_is_fine_and_every_numeric_key_has_a_range():
    import dataclasses

    from red.config import RANGES, SECTIONS, Config

    load_config(None, ["algorithm.mode=sft", "rollout.temperature=0"])  # no sampled groups in SFT
    load_config(
        None, ["rollout.temperature=0", "algorithm.dynamic_sampling=false"]
    )  # deterministic test runs
    numeric = []
    for f in dataclasses.fields(Config):
        inner = dataclasses.fields(f.default_factory) if f.name in SECTIONS else [f]
        prefix = f"{f.name}." if f.name in SECTIONS else ""
        numeric += [prefix + g.name for g in inner if str(g.type).startswith(("int", "float"))]
    assert len(numeric) > 50 and sorted(set(numeric) - set(RANGES)) == []  # optim.betas: a list, own check
    assert sorted(set(RANGES) - set(numeric)) == []


def test_checks_hold_before_any_model_loads(tmp_path, monkeypatch):
    """A data error is raised before the model is built (red.train reads the data first)."""
    import red.train as train

    def no_model(*a, **k):
        raise AssertionError("the model was built before the data was read")

    monkeypatch.setattr(train, "build_model", no_model)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("[1]\n")
    assert train.main([f"output_dir={tmp_path / 'run'}", f"data.train={bad}", *TINY]) == 2
    assert os.path.exists(tmp_path / "run")
