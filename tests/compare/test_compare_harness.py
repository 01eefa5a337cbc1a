"""red.compare with an injected runner (no training): same overrides for every mode, resume skips finished runs,
compare.json has the issue-10 schema and its numbers come from the runs' summary.json files."""

import json
import math
import os

import pytest

from red.compare import compare, main, parse_overrides

ACC = {("grpo", 0): 0.5, ("grpo", 1): 0.6, ("red", 0): 0.7, ("red", 1): 0.6}


def fake_runner(calls, fail=(), warm=None):
    def run(argv, out):
        kv = dict(a.split("=", 1) for a in argv if "=" in a)
        mode, seed = kv["algorithm.mode"], int(kv["seed"])
        if "--warmup-only" in argv:  # the shared warm-up of one seed: its model and base evaluation
            (warm if warm is not None else []).append((seed, argv))
            os.makedirs(os.path.join(out, "warmup"), exist_ok=True)
            open(os.path.join(out, "warmup", "config.json"), "w").write('{"vocab_size": 320}')
            base = {"accuracy": 0.3, "n": 1, "per_source": {"all": {"avg@1": 0.3}}}
            json.dump(
                {"warmup_only": True, "eval_before": base}, open(os.path.join(out, "summary.json"), "w")
            )
            return 0
        calls.append((mode, seed, argv))
        if (mode, seed) in fail:
            return 1
        os.makedirs(out, exist_ok=True)
        acc = ACC[(mode, seed)]
        ev = {
            "accuracy": acc,
            "n": 1,
            "per_source": {
                "all": {
                    "avg@1": acc,
                    "mean_length": 30.0 + seed,
                    "mean_length_correct": 28.0,
                    "mean_length_wrong": 40.0,
                },
                "synthetic/largest": {"avg@1": 1.0},
                "synthetic/smallest": {"avg@1": 2 * acc - 1},
            },
        }
        with open(os.path.join(out, "metrics.jsonl"), "w") as fh:
            for step in (0, 1, 2):
                row = {"step": step, "mode": mode, "eval/acc": acc * step / 2, "H_on": 1.0 + step}
                fh.write(json.dumps({**row, "kept_frac_teacher_only": 0.25 * step}) + "\n")
        os.makedirs(os.path.join(out, "step_2"), exist_ok=True)
        open(os.path.join(out, "step_2", "config.json"), "w").write('{"vocab_size": 320}')
        open(os.path.join(out, "latest"), "w").write("step_2")
        with open(os.path.join(out, "summary.json"), "w") as fh:
            json.dump({"eval_before": None, "eval_after": ev, "wall_time_s": 5.0}, fh)
        return 0

    return run


def test_runs_aggregates_and_resumes(tmp_path):
    out = str(tmp_path / "cmp")
    calls = []
    res = compare(None, ["grpo", "red"], 2, "grpo", 2, ["train.steps=2"], out, runner=fake_runner(calls))
    assert sorted((m, s) for m, s, _ in calls) == sorted(ACC)
    for mode, seed, argv in calls:  # every mode gets the same overrides, its own output dir
        assert "train.steps=2" in argv and f"output_dir={os.path.join(out, mode, f'seed_{seed}')}" in argv
    on_disk = json.load(open(os.path.join(out, "compare.json")))
    assert on_disk == json.loads(json.dumps(res))
    assert set(on_disk) >= {"budget", "versions", "arms", "paired_vs_baseline", "paired", "base"}
    red = on_disk["arms"]["red"]
    assert [r["seed"] for r in red["runs"]] == [0, 1]
    assert set(red["runs"][0]) >= {
        "seed",
        "heldout_acc",
        "len_mean",
        "len_correct_mean",
        "len_wrong_mean",
        "wall_s",
        "output_dir",
    }
    assert red["heldout_acc"]["mean"] == pytest.approx(0.65) and red["heldout_acc"]["n"] == 2
    # [0.7, 0.6]: s = 0.0707107, half-width 12.7062 * s / sqrt(2) = 0.63531
    assert red["heldout_acc"]["ci95"] == pytest.approx([0.65 - 0.63531, 0.65 + 0.63531], abs=1e-5)
    assert red["len_mean"]["mean"] == pytest.approx(30.5)
    assert red["runs"][1]["heldout_acc_per_source"]["synthetic/smallest"] == pytest.approx(0.2)
    # paired by seed: red - grpo = 0.2, 0.0
    p = on_disk["paired_vs_baseline"]
    assert set(p) == {"red"} and p["red"]["n"] == 2 and p["red"]["diff_mean"] == pytest.approx(0.1)
    assert on_disk["budget"]["train_steps"] == 2 and on_disk["budget"]["group_size"] == 8
    assert os.path.isfile(os.path.join(out, "compare.md")) and os.path.isfile(
        os.path.join(out, "compare.png")
    )
    assert "| red | 2 | 65.0 |" in open(os.path.join(out, "compare.md")).read()

    calls.clear()  # re-run: everything finished, nothing runs, same result
    assert (
        compare(None, ["grpo", "red"], 2, "grpo", 1, ["train.steps=2"], out, runner=fake_runner(calls)) == res
    )
    assert calls == []
    os.remove(os.path.join(out, "red", "seed_1", "summary.json"))  # an unfinished run is run (resumed) again
    compare(None, ["grpo", "red"], 2, "grpo", 1, ["train.steps=2"], out, runner=fake_runner(calls))
    assert [(m, s) for m, s, _ in calls] == [("red", 1)]
    with pytest.raises(SystemExit, match="other settings"):  # same directories, another budget: refused
        compare(None, ["grpo", "red"], 2, "grpo", 1, ["train.steps=3"], out, runner=fake_runner(calls))


def test_failed_run_is_reported_and_left_out(tmp_path):
    out = str(tmp_path / "cmp")
    res = compare(None, ["grpo", "red"], 2, "grpo", 1, [], out, runner=fake_runner([], fail={("red", 1)}))
    assert res["failed"] == [
        {"arm": "red", "mode": "red", "seed": 1, "output_dir": os.path.join(out, "red", "seed_1")}
    ]
    assert res["arms"]["red"]["heldout_acc"]["n"] == 1 and res["paired_vs_baseline"]["red"]["n"] == 1
    assert "FAILED runs" in open(os.path.join(out, "compare.md")).read()


def test_command_line_errors_name_the_argument(capsys):
    with pytest.raises(SystemExit):
        main(["--modes", "grpo,ppo"])
    assert "--modes" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--modes", "red,luffy"])  # baseline grpo not among the arms
    assert "--baseline" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--arms", "grpo,x=ppo"])
    assert "unknown mode 'ppo'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--arms", "grpo,red,red"])
    assert "used twice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--seeds", "1,x"])
    assert "--seeds" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="seed"):
        parse_overrides(["seed=3"])
    with pytest.raises(SystemExit, match="--modes"):
        parse_overrides(["algorithm.mode=red"])
    assert parse_overrides(["output_dir=x/y", "train.steps=3"]) == ("x/y", ["train.steps=3"])


def test_one_seed_writes_strict_json_with_null_intervals(tmp_path):
    out = str(tmp_path / "one")
    compare(None, ["grpo", "red"], 1, "grpo", 1, [], out, runner=fake_runner([]))
    text = open(os.path.join(out, "compare.json")).read()
    assert "NaN" not in text
    on_disk = json.loads(text)
    assert on_disk["arms"]["red"]["heldout_acc"] == {
        "mean": pytest.approx(0.7),
        "ci95": [None, None],
        "n": 1,
    }
    assert on_disk["paired_vs_baseline"]["red"]["ci95"] == [None, None]
    assert "| red | 1 | 70.0 | n/a |" in open(os.path.join(out, "compare.md")).read()


def test_a_bad_config_fails_before_any_run_and_names_the_key(tmp_path, capsys):
    from red.config import ConfigError

    calls = []
    with pytest.raises(ConfigError, match="'train.stepz': unknown key"):
        compare(
            None,
            ["grpo", "red"],
            1,
            "grpo",
            1,
            ["train.stepz=2"],
            str(tmp_path / "a"),
            runner=fake_runner(calls),
        )
    with pytest.raises(ConfigError, match="rollout.num_offline"):  # valid for grpo, not for red
        compare(
            None,
            ["grpo", "red"],
            1,
            "grpo",
            1,
            ["rollout.num_offline=0"],
            str(tmp_path / "b"),
            runner=fake_runner(calls),
        )
    assert calls == [] and not os.path.exists(tmp_path / "a")
    assert main(["--config", "no-such-config", f"output_dir={tmp_path / 'c'}"]) == 2
    assert "no-such-config" in capsys.readouterr().err
    assert main(["--modes", "grpo", "train.steps=0", f"output_dir={tmp_path / 'd'}"]) == 2
    assert "config key 'train.steps': must be >= 1" in capsys.readouterr().err


def test_the_budget_holds_the_schema_values_the_runs_use(tmp_path):
    cfg = tmp_path / "short.yaml"
    cfg.write_text("rollout: {n: 4}\n")  # train.* left to the schema's defaults, as the runs see them
    res = compare(
        str(cfg), ["grpo"], 1, "grpo", 1, ["train.steps=3"], str(tmp_path / "cmp"), runner=fake_runner([])
    )
    from red.config import TrainConfig

    b, prompts = res["budget"], TrainConfig().prompts_per_step
    assert (b["train_steps"], b["prompts_per_step"], b["group_size"], b["samples"]) == (
        3,
        prompts,
        4,
        3 * prompts * 4,
    )


def test_arm_and_seed_syntax():
    from red.compare import Arm, parse_arms, parse_seeds

    arms = parse_arms(
        "grpo,red_phi_p=red:loss.offline_shaping=none,"
        "lz=luffy:algorithm.teacher_only_groups=zero_online:data.train=synthetic:chains_concise,"
        "b=red:optim.betas=[0.9,0.99]"
    )
    assert arms == [
        Arm("grpo", "grpo"),
        Arm("red_phi_p", "red", ("loss.offline_shaping=none",)),
        Arm(
            "lz",
            "luffy",
            ("algorithm.teacher_only_groups=zero_online", "data.train=synthetic:chains_concise"),
        ),
        Arm("b", "red", ("optim.betas=[0.9,0.99]",)),
    ]
    assert (
        parse_seeds("3") == [0, 1, 2] and parse_seeds("11,12,13") == [11, 12, 13] and parse_seeds("7,") == [7]
    )
    with pytest.raises(SystemExit, match="set by the harness"):
        parse_arms("x=red:seed=3")


def test_arms_share_one_warmup_per_seed_and_record_entropy(tmp_path):
    """Named arms with seed list [11, 12]: one warm-up per seed (2 in all) shared by every arm through
    warmup.path, each arm with its own overrides after the common ones; entropy and teacher-only share per run."""
    out, calls, warm = str(tmp_path / "cmp"), [], []
    global ACC
    ACC = {(m, s): 0.5 + 0.1 * (m == "red") + 0.01 * s for m in ("grpo", "red") for s in (11, 12)}
    arms = ["grpo", "red", "red_phi_p=red:loss.offline_shaping=none"]
    res = compare(
        None, arms, [11, 12], "grpo", 2, ["train.steps=2"], out, runner=fake_runner(calls, warm=warm)
    )
    assert sorted(s for s, _ in warm) == [11, 12] and len(calls) == 6
    for mode, seed, argv in calls:
        assert f"warmup.path={os.path.join(out, 'warmup', 'shared', f'seed_{seed}')}/warmup" in argv
        assert "eval.before=false" in argv and argv.index("train.steps=2") < argv.index(
            f"algorithm.mode={mode}"
        )
    phi = [argv for m, s, argv in calls if "loss.offline_shaping=none" in argv]
    assert len(phi) == 2 and all(os.path.join(out, "red_phi_p", "seed_") in " ".join(a) for a in phi)
    r = res["arms"]["red_phi_p"]
    assert r["mode"] == "red" and r["overrides"] == ["loss.offline_shaping=none"]
    run = r["runs"][0]
    assert run["seed"] == 11 and run["final_entropy_online"] == pytest.approx(2.0)  # mean H_on of steps 0..2
    assert run["entropy_limit"] == pytest.approx(0.8 * math.log(320))
    assert run["teacher_only_share"] == pytest.approx(0.25)
    assert res["base"] == {"11": {"accuracy": 0.3, "per_source": {"all": 0.3}}, "12": res["base"]["12"]}
    assert res["paired"]["red"]["grpo"]["diff_mean"] == pytest.approx(0.1)
    assert res["paired_vs_baseline"]["red_phi_p"]["n"] == 2
    md = open(os.path.join(out, "compare.md")).read()
    assert "| red_phi_p | 2 |" in md and "base (warm-up)" in md
    calls.clear(), warm.clear()  # finished: nothing reruns, the warm-ups neither
    compare(None, arms, [11, 12], "grpo", 2, ["train.steps=2"], out, runner=fake_runner(calls, warm=warm))
    assert calls == [] and warm == []
