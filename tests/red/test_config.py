"""Config loading/validation (OmegaConf schema), the mode table, and data loading: bad input gives an error
naming the key or the row."""

import json

import pytest

from red import modes
from red.config import ConfigError, DataConfig, load_config
from red.data import DataError, Example, PromptStream, load_examples, tokenize_examples

# ------------------------------------------------------------------------------------------------ config


def test_default_config_and_typed_overrides():
    cfg = load_config(
        overrides=[
            "train.steps=7",
            "optim.lr=1e-6",
            "algorithm.entropy_ema=0.9",
            "data.eval=[a.jsonl, b.jsonl]",
            "rollout.vllm={gpu_memory_utilization: 0.3}",
            "loss.dual_clip=null",
        ]
    )
    assert cfg.train.steps == 7 and cfg.optim.lr == 1e-6 and cfg.algorithm.entropy_ema == 0.9
    assert cfg.data.eval == ["a.jsonl", "b.jsonl"] and cfg.rollout.vllm == {"gpu_memory_utilization": 0.3}
    assert cfg.loss.dual_clip is None


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.stepz=3", "train.stepz"),
        ("nosuch.a=1", "nosuch"),
        ("train.steps=abc", "train.steps"),
        ("train.steps=0", "train.steps"),
        ("rollout.engine=tgi", "rollout.engine"),
        ("algorithm.mode=ppo", "algorithm.mode"),
        ("rollout.num_offline=9", "rollout.num_offline"),
        ("algorithm.entropy_ema=1.5", "algorithm.entropy_ema"),
        ("loss.loss_agg=sum", "loss.loss_agg"),
        ("optim.betas=[0.9]", "optim.betas"),
        ("data.prompt_template=Solve it", "data.prompt_template"),
        ("warmup.data=synthetic:chains", "warmup.data"),
        ("log.plot=maybe", "log.plot"),
    ],
)
def test_bad_config_names_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    assert f"'{key}'" in str(e.value)


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(overrides=["train.steps"])


def test_yaml_file_and_packaged_real_model_config(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("algorithm: {mode: luffy}\nrollout: {n: 4}\n")
    cfg = load_config(str(p), ["train.steps=3"])
    lc, w = modes.loss_config(cfg, "luffy"), modes.offline_weight_settings(cfg, "luffy", 1)
    assert lc.offline_shaping == "luffy" and w["fixed"] and lc.entropy_coef == 0.001
    assert w["w_max"] == 3.0 and lc.r_min == 1 / 8
    real = load_config("qwen2.5-math-1.5b-openr1")
    assert (
        real.model.path == "Qwen/Qwen2.5-Math-1.5B"
        and real.rollout.n == 8
        and real.train.prompts_per_step == 64
    )
    assert real.model.config_overrides["rope_theta"] == 40000 and real.rollout.max_new_tokens == 8192


def test_mode_table():
    grpo = load_config(overrides=["algorithm.mode=grpo"])
    assert (
        modes.phases(grpo) == (modes.Phase("grpo", 40, 0),)
        and modes.offline_weight_settings(grpo, "grpo", 0)["w_max"] == 8.0
    )
    red = load_config()
    lc, w = modes.loss_config(red, "red"), modes.offline_weight_settings(red, "red", 1)
    assert (
        modes.phases(red) == (modes.Phase("red", 40, 1),)
        and lc.offline_shaping == "accuracy_shift"
        and not w["fixed"]
    )
    assert w["w_max"] == 7.0 and lc.entropy_coef == 0.0 and lc.loss_const == 48.0 and lc.r_min == 1 / 16
    # the kernel config is built from the loss section by field name: no field re-declared with another default
    assert (
        modes.loss_config(load_config(overrides=["loss.dual_clip=3.0", "loss.kl_coef=0.1"]), "red").dual_clip
        == 3.0
    )
    stages = modes.plan(red)
    assert [s.name for s in stages] == ["warm-up", "red"] and stages[0].phases == (
        modes.Phase("sft", 120, 1),
    )
    assert stages[0].lr == 3e-3 and not stages[0].main and stages[1].main
    sft = modes.loss_config(red, "sft")
    assert (sft.offline_shaping, sft.sft_coef, sft.loss_agg) == ("none", 1.0, "token_mean")


def test_sft_then_grpo_sft_phase_defaults_to_half_and_zero_is_an_error():
    cfg = load_config(overrides=["algorithm.mode=sft_then_grpo", "train.steps=10"])
    own = modes.Schedule(cfg.optim.lr, 0, cfg.optim.min_lr_ratio)  # sft.* null -> optim's values
    assert modes.phases(cfg) == (modes.Phase("sft", 5, 1, own), modes.Phase("grpo", 5, 0))
    cfg = load_config(overrides=["algorithm.mode=sft_then_grpo", "train.steps=10", "algorithm.sft_steps=3"])
    assert [p.steps for p in modes.phases(cfg)] == [3, 7] and modes.plan(cfg)[-1].phase_at(3).mode == "grpo"
    for bad in ("0", "11"):
        with pytest.raises(ConfigError, match="'algorithm.sft_steps'"):
            load_config(
                overrides=["algorithm.mode=sft_then_grpo", "train.steps=10", f"algorithm.sft_steps={bad}"]
            )
    load_config(overrides=["algorithm.mode=red", "algorithm.sft_steps=0"])  # other modes ignore the key


def test_interpolation_scalar_lists_and_choice_messages():
    cfg = load_config(
        overrides=["eval.max_new_tokens=${rollout.max_new_tokens}", "data.eval=x.jsonl", "--train.steps=4"]
    )
    assert cfg.eval.max_new_tokens == 48 and cfg.data.eval == ["x.jsonl"] and cfg.train.steps == 4
    # a value that is not YAML stays the text it is (users' prompt templates)
    cfg = load_config(overrides=["data.prompt_template={problem} Put the answer in \\boxed{}."])
    assert cfg.data.prompt_template == "{problem} Put the answer in \\boxed{}."
    with pytest.raises(ConfigError, match=r"'rollout.engine': must be one of hf, vllm, auto, got 'tgi'"):
        load_config(overrides=["rollout.engine=tgi"])
    with pytest.raises(ConfigError, match=r"'train.stepz': unknown key \(known: .*micro_batch_tokens"):
        load_config(overrides=["train.stepz=1"])


# ------------------------------------------------------------------------------------------------ data


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_bad_row_error_names_file_and_row(tmp_path):
    f = _jsonl(tmp_path / "d.jsonl", [{"problem": "1+1?", "answer": "2"}, {"problem": "2+2?"}])
    with pytest.raises(DataError, match=r"d\.jsonl row 2: no gold answer"):
        load_examples(f)
    ex, skipped = load_examples(f, bad_rows="skip")
    assert [e.row for e in ex] == [1] and "row 2" in skipped[0]


def test_invalid_json_row_is_named(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"problem": "a", "answer": "1"}\n{"problem": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl row 2: not valid JSON"):
        load_examples(str(p))


def test_missing_problem_and_missing_file(tmp_path):
    f = _jsonl(tmp_path / "d.jsonl", [{"question": "", "answer": "3"}])
    with pytest.raises(DataError, match="row 1: no problem text"):
        load_examples(f)
    with pytest.raises(DataError, match="not found"):
        load_examples(str(tmp_path / "nope.jsonl"))


def test_layouts_plain_gsm8k_openr1(tmp_path):
    f = _jsonl(
        tmp_path / "gsm.jsonl",
        [{"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7 apples.\n#### 7"}],
    )
    (e,), _ = load_examples(f)
    assert e.answer == "7" and e.traces[0].endswith("\\boxed{7}.") and e.source == "gsm"
    f = _jsonl(
        tmp_path / "or1.jsonl",
        [
            {
                "problem": "p",
                "answer": "$5$",
                "solution": "s",
                "generations": ["wrong one", "right one"],
                "correctness_math_verify": [False, True],
            }
        ],
    )
    (e,), _ = load_examples(f)
    assert e.answer == "5" and e.traces == ["right one"]
    f = _jsonl(tmp_path / "minerva.jsonl", [{"problem": "p", "solution": "so \\boxed{\\frac{1}{2}}"}])
    (e,), _ = load_examples(f)
    assert e.answer == "\\frac{1}{2}"


def test_layout_luffy_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {
            "data_source": "math",
            "prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"}],
            "reward_model": {"ground_truth": "4", "style": "rule"},
            "target": [{"role": "assistant", "content": "T1 \\boxed{4}"}],
        },
        {
            "data_source": "aime",
            "prompt": [{"role": "user", "content": "Q2"}],
            "reward_model": {"ground_truth": None, "style": "rule"},
            "target": [],
        },
    ]
    p = tmp_path / "l.parquet"
    pq.write_table(pa.Table.from_pylist(rows), p)
    with pytest.raises(DataError, match=r"l\.parquet row 2: no gold answer"):
        load_examples(str(p))
    ex, skipped = load_examples(str(p), bad_rows="skip")
    (e,) = ex
    assert (e.problem, e.answer, e.traces, e.source) == ("Q1", "4", ["T1 \\boxed{4}"], "math")
    assert e.messages[0] == {"role": "system", "content": "S"}


class _Tok:
    """Whitespace tokenizer with a chat template marker, enough for tokenize_examples."""

    chat_template = "x"
    eos_token_id = 0

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        return " ".join(m["content"] for m in messages) + " <think>"

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [len(w) for w in text.split()]}


def test_tokenize_overlong_and_eos_and_think():
    exs = [
        Example("a b c", "1", ["t t"], row=1),
        Example("a b c d e f", "1", ["t"], row=2),
        Example("a", "1", ["t t t t t t"], row=3),
        Example("a", "1", ["<think> t"], row=4),
    ]
    cfg = DataConfig(max_prompt_len=5, overlong_prompt="reject", overlong_trace="reject")
    items, rep = tokenize_examples(exs, _Tok(), cfg, max_response_len=4, eos_id=0, need_traces=True)
    assert [it.row for it in items] == [1, 4]
    assert items[0].trace_ids == [[1, 1, 0]]  # EOS appended
    assert items[1].trace_ids == [[1, 0]] and rep.think_stripped == 1
    assert rep.prompts_rejected == [2] and rep.traces_rejected == [3]
    cfg = DataConfig(max_prompt_len=5, overlong_prompt="truncate", overlong_trace="truncate")
    items, rep = tokenize_examples(exs, _Tok(), cfg, max_response_len=4, eos_id=0, need_traces=True)
    assert (
        [it.row for it in items] == [1, 2, 3, 4]
        and rep.prompts_truncated == [2]
        and rep.traces_truncated == [3]
    )
    assert len(items[1].prompt_ids) == 5 and items[2].trace_ids == [[1, 1, 1, 1]]  # cut, no EOS


def test_prompt_stream_is_deterministic_and_resumable():
    a = PromptStream(5, seed=3)
    first = a.take(7)
    assert sorted(first[:5]) == [0, 1, 2, 3, 4]  # one full epoch, then the next
    b = PromptStream(5, seed=3, cursor=4)
    assert b.take(3) == first[4:7]


def test_old_shaping_name_red_is_an_alias_with_a_warning(tmp_path):
    with pytest.warns(FutureWarning, match="loss.offline_shaping.*'red' is deprecated, use 'accuracy_shift'"):
        cfg = load_config(overrides=["loss.offline_shaping=red"])
    assert cfg.loss.offline_shaping == "accuracy_shift"
    assert modes.loss_config(cfg, "red").offline_shaping == "accuracy_shift"
    with pytest.raises(ConfigError, match="loss.offline_shaping.*accuracy_shift, luffy, none, got 'redd'"):
        load_config(overrides=["loss.offline_shaping=redd"])


def test_sft_phase_has_its_own_schedule_and_optimizer_span():
    over = ["train.steps=10", "sft.lr=3e-3", "sft.warmup_steps=2", "sft.min_lr_ratio=0.5", "optim.lr=1e-4"]
    cfg = load_config(overrides=["algorithm.mode=sft_then_grpo", "algorithm.sft_steps=4", *over])
    main = modes.plan(cfg)[-1]
    assert main.schedule_of(0) == modes.Schedule(3e-3, 2, 0.5)
    assert main.schedule_of(1) == modes.Schedule(1e-4, cfg.optim.warmup_steps, cfg.optim.min_lr_ratio)
    assert [main.optimizer_span(i) for i in (0, 1)] == [4, 6] and main.phase_index(4) == 1
    sft = modes.plan(load_config(overrides=["algorithm.mode=sft", *over]))[-1]
    assert sft.schedule_of(0).lr == 3e-3 and sft.optimizer_span(0) == 10
    red = modes.plan(load_config(overrides=over))[-1]
    assert red.schedule_of(0).lr == 1e-4 and red.optimizer_span(0) == 10  # RL modes: optim.*
    with pytest.raises(ConfigError, match="'sft.lr'"):
        load_config(overrides=["sft.lr=0"])


def test_teacher_only_groups_auto_is_the_modes_validation_choice():
    cfg = load_config()
    assert cfg.algorithm.teacher_only_groups == "auto"
    assert (
        modes.teacher_only_groups(cfg, "red") == "zero_online"
        and modes.teacher_only_groups(cfg, "luffy") == "keep"
    )
    cfg = load_config(overrides=["algorithm.teacher_only_groups=drop"])
    assert modes.teacher_only_groups(cfg, "luffy") == "drop"
    with pytest.raises(ConfigError, match="'algorithm.teacher_only_groups': must be one of auto, keep"):
        load_config(overrides=["algorithm.teacher_only_groups=zero"])
