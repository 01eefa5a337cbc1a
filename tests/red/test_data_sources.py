"""Data sources besides files: a `save_to_disk` folder (FOLDER[@SPLIT]) and `hf:NAME[:CONFIG][@SPLIT]` through
datasets.load_dataset, loaded offline from datasets built in the test; the column layouts detected and said in
one log line; errors that name the missing column and the key that maps it; `red.train` on both."""

import json
import logging

import datasets
import pytest

from red import synthetic
from red.data import DataError, load_examples

OPENR1 = [
    {
        "problem": "What is 2+3?",
        "solution": "2+3=5, so \\boxed{5}.",
        "answer": "5",
        "generations": ["wrong: \\boxed{6}", "right: \\boxed{5}"],
        "correctness_math_verify": [False, True],
    },
    {
        "problem": "What is 1+1?",
        "solution": "\\boxed{2}",
        "answer": "2",
        "generations": ["\\boxed{2}"],
        "correctness_math_verify": [True],
    },
]
LUFFY = [
    {
        "prompt": [{"role": "user", "content": "Compute 3*3."}],
        "reward_model": {"ground_truth": "9", "style": "rule"},
        "target": [{"role": "assistant", "content": "3*3=9 \\boxed{9}"}],
        "data_source": "luffy",
    }
]
FLAT = [{"prompt": "Compute 4*4.", "answer": "16", "target": "16 \\boxed{16}"}]


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network, and datasets' cache inside the test's folder."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def hub_folder(root, configs: dict[str, dict[str, list[dict]]]):
    """A dataset repository laid out as on the Hub (README configs + JSONL data files), loadable by name."""
    lines = ["---", "configs:"]
    for config, splits in configs.items():
        lines += [f"- config_name: {config}", "  data_files:"]
        for split, rows in splits.items():
            path = root / "data" / f"{config}-{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            lines += [f"  - split: {split}", f"    path: data/{config}-{split}.jsonl"]
    (root / "README.md").write_text("\n".join(lines + ["---", ""]))
    return root


def test_save_to_disk_folder_openr1_layout_detected_and_said(tmp_path, offline, caplog):
    folder = tmp_path / "openr1"
    datasets.Dataset.from_list(OPENR1).save_to_disk(str(folder))
    with caplog.at_level(logging.INFO, "red.data"):
        ex, skipped = load_examples(str(folder))
    assert [(e.problem, e.answer, e.traces) for e in ex] == [
        ("What is 2+3?", "5", ["right: \\boxed{5}"]),
        ("What is 1+1?", "2", ["\\boxed{2}"]),
    ] and skipped == []
    (line,) = [r.getMessage() for r in caplog.records]
    assert line == (
        f"{folder}: layout openr1: problem <- problem, answer <- answer, "
        "teacher traces <- generations (math-verify-correct)"
    )


def test_save_to_disk_dataset_dict_by_split(tmp_path, offline):
    folder = tmp_path / "dd"
    datasets.DatasetDict(
        train=datasets.Dataset.from_list(LUFFY), test=datasets.Dataset.from_list(FLAT)
    ).save_to_disk(str(folder))
    (train,), _ = load_examples(str(folder))
    assert (train.problem, train.answer, train.traces, train.source) == (
        "Compute 3*3.",
        "9",
        ["3*3=9 \\boxed{9}"],
        "luffy",
    )
    assert train.messages == [{"role": "user", "content": "Compute 3*3."}]
    (test,), _ = load_examples(f"{folder}@test")
    assert (test.problem, test.answer, test.traces) == ("Compute 4*4.", "16", ["16 \\boxed{16}"])
    with pytest.raises(DataError, match=r"no split 'dev' in the saved dataset \(splits: train, test\)"):
        load_examples(f"{folder}@dev")


def test_hf_name_config_and_split_load_offline(tmp_path, offline, caplog):
    repo = hub_folder(
        tmp_path / "repo", {"default": {"train": FLAT}, "hard": {"train": OPENR1[:1], "test": OPENR1}}
    )
    with caplog.at_level(logging.INFO, "red.data"):
        (flat,), _ = load_examples(f"hf:{repo}")
    assert (flat.problem, flat.answer, flat.traces) == ("Compute 4*4.", "16", ["16 \\boxed{16}"])
    assert caplog.records[-1].getMessage() == (
        f"hf:{repo}: layout flat prompt/answer/target: problem <- prompt, answer <- answer, "
        "teacher traces <- target"
    )
    hard, _ = load_examples(f"hf:{repo}:hard@test")
    assert [e.answer for e in hard] == ["5", "2"] and hard[0].traces == ["right: \\boxed{5}"]
    with pytest.raises(DataError, match=r"hf:.*:nope.*datasets.load_dataset failed"):
        load_examples(f"hf:{repo}:nope")


def test_missing_columns_name_the_column_and_the_key(tmp_path):
    f = tmp_path / "rows.jsonl"
    f.write_text(json.dumps({"question": "1+1?", "solutionX": "two"}) + "\n")
    with pytest.raises(DataError) as e:
        load_examples(str(f))
    assert str(e.value) == (
        f"{f} row 1: no gold answer: none of the columns answer/final_answer/ground_truth/gold/expected_answer "
        "holds it (row columns: question, solutionX); name yours with data.answer_key=COLUMN"
    )
    with pytest.raises(
        DataError, match=r"no problem text: column 'q' \(data.problem_key\) is missing or empty"
    ):
        load_examples(str(f), keys={"problem": "q", "answer": "solutionX"})
    (ex,), _ = load_examples(str(f), keys={"answer": "solutionX"})
    assert (ex.problem, ex.answer) == ("1+1?", "two")
    f.write_text(json.dumps({"prompt": [{"role": "user", "content": "x"}], "reward_model": {}}) + "\n")
    with pytest.raises(
        DataError, match=r"none of the columns reward_model.ground_truth.*data.answer_key=COLUMN"
    ):
        load_examples(str(f))


def test_a_plain_folder_is_not_taken_for_a_dataset(tmp_path):
    with pytest.raises(
        DataError,
        match="is a directory: give a .jsonl, .json or .parquet file, a folder written by datasets' save_to_disk",
    ):
        load_examples(str(tmp_path))


@pytest.mark.slow
def test_train_on_hf_and_saved_datasets_offline(tmp_path, offline):
    from red.train import main
    from tests.e2e.test_train_e2e import TINY

    rows = synthetic.generate("chains", 16, seed=0, split="train")
    flat = [{"prompt": r["problem"], "answer": r["answer"], "target": r["traces"][0]} for r in rows]
    repo = hub_folder(tmp_path / "repo", {"default": {"train": flat}})
    held = tmp_path / "held"
    datasets.Dataset.from_list(flat[:4]).save_to_disk(str(held))
    out = tmp_path / "run"
    assert (
        main(
            [
                f"output_dir={out}",
                f"data.train=hf:{repo}",
                f"data.eval={held}",
                "train.steps=1",
                *TINY,
                "rollout.max_new_tokens=64",
            ]
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_problems"] == 16 and summary["eval_problems"] == 4
