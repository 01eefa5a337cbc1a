"""`red.eval --max-new-tokens 256` with a config whose rollout.max_new_tokens is 128 (issue 24, case 10): the
engine the config builds is sized for the eval's own limit (it used to be built for 128 and fail with
"engine limit" after loading). The flag is what the user asked for, and raising the engine's max_model_len costs
nothing a clamp would save, so neither an error nor a silent clamp."""

import pytest

import red.rollout.vllm_engine as vllm_engine
from red import synthetic
from red.eval import main


class Built(Exception):
    pass


def test_eval_builds_its_engine_for_its_own_max_new_tokens(tmp_path, monkeypatch):
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
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    seen = {}

    def fake_engine(model_dir, max_prompt_len, max_new_tokens, **kw):
        seen.update(max_prompt_len=max_prompt_len, max_new_tokens=max_new_tokens)
        raise Built

    monkeypatch.setattr(vllm_engine, "VLLMEngine", fake_engine)
    args = ["--model", str(tmp_path / "m"), "--data", "synthetic:chains", "--device", "cpu"]
    over = ["rollout.engine=vllm", "rollout.max_new_tokens=128", "data.max_prompt_len=64"]
    with pytest.raises(Built):
        main([*args, "--max-new-tokens", "256", "--max-prompt-len", "100", *over])
    assert seen == {"max_prompt_len": 100, "max_new_tokens": 256}
    with pytest.raises(Built):  # without the flags: the config's own limits
        main([*args, *over])
    assert seen == {"max_prompt_len": 64, "max_new_tokens": 128}
