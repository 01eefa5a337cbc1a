"""Config overrides reach the loaded model (transformers 5 keeps RoPE settings in `config.rope_parameters`; a plain
`setattr(cfg, "rope_theta", ...)` is ignored by the model and by vLLM). Checked on the rotary module's `inv_freq`
against float64 frequencies 1 / theta^(2i/d), not on the config object."""

import json

import pytest
import torch

from red.config import ConfigError, load_config
from red.models import check_config_overrides, load_pretrained
from tests.conftest import tiny_model

OVERRIDES = {"rope_theta": 40000, "max_position_embeddings": 16384}


def plain_rope(theta, head_dim):
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, tok = tiny_model(seed=0)
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, model.config.hidden_size // model.config.num_attention_heads


@pytest.fixture(scope="module")
def legacy(saved, tmp_path_factory):
    """The same model with a transformers-4 config.json (top-level rope_theta, as Qwen2.5-Math-1.5B ships it)."""
    src, head_dim = saved
    path = tmp_path_factory.mktemp("legacy")
    for f in src.iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((path / "config.json").read_text())
    cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]
    cfg.update(max_position_embeddings=4096, rope_scaling=None)
    (path / "config.json").write_text(json.dumps(cfg))
    return path, head_dim


def rotary(model):
    mods = [m for m in model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]
    assert mods
    return mods


@pytest.mark.parametrize("fmt", ["saved", "legacy"])
def test_rope_theta_and_context_reach_the_rotary_module(fmt, request):
    path, head_dim = request.getfixturevalue(fmt)
    base, _ = load_pretrained(str(path))
    model, _ = load_pretrained(str(path), config_overrides=OVERRIDES)
    for m in rotary(base):
        torch.testing.assert_close(m.inv_freq.double(), plain_rope(10000.0, head_dim), rtol=1e-6, atol=0)
    for m in rotary(model):
        torch.testing.assert_close(m.inv_freq.double(), plain_rope(40000.0, head_dim), rtol=1e-6, atol=0)
        assert m.original_max_seq_len == 16384
    assert model.config.rope_parameters["rope_theta"] == 40000
    assert model.config.max_position_embeddings == 16384
    # not vacuous: the two bases give clearly different frequencies
    assert (plain_rope(40000.0, head_dim) - plain_rope(10000.0, head_dim)).abs().max() > 1e-2


def test_override_survives_save_and_reload(saved, tmp_path):
    """What vLLM reads: the saved config of the overridden model (engine_from_config writes model.config)."""
    path, _ = saved
    model, _ = load_pretrained(str(path), config_overrides=OVERRIDES)
    model.config.save_pretrained(tmp_path)
    saved_cfg = json.loads((tmp_path / "config.json").read_text())
    assert (
        saved_cfg["rope_parameters"]["rope_theta"] == 40000 and saved_cfg["max_position_embeddings"] == 16384
    )


def test_paper_config_overrides_give_the_intended_base(legacy):
    cfg = load_config("qwen2.5-math-1.5b-openr1")
    overrides = dict(cfg.model.config_overrides)
    assert overrides["rope_theta"] == 40000
    path, head_dim = legacy
    model, _ = load_pretrained(str(path), config_overrides=overrides)
    for m in rotary(model):
        torch.testing.assert_close(m.inv_freq.double(), plain_rope(40000.0, head_dim), rtol=1e-6, atol=0)
        assert m.original_max_seq_len == overrides["max_position_embeddings"]


def test_rope_scaling_is_merged_into_rope_parameters(saved):
    """Legacy rope_scaling {"type": "linear", "factor": 4} -> rope_parameters; linear scaling divides inv_freq."""
    path, head_dim = saved
    model, _ = load_pretrained(
        str(path), config_overrides={"rope_scaling": {"type": "linear", "factor": 4.0}}
    )
    assert model.config.rope_parameters["rope_type"] == "linear"
    for m in rotary(model):
        torch.testing.assert_close(m.inv_freq.double(), plain_rope(10000.0, head_dim) / 4, rtol=1e-6, atol=0)


def test_unknown_override_key_is_an_error_naming_it(saved):
    path, _ = saved
    with pytest.raises(ConfigError, match=r"model\.config_overrides\.rope_thetta"):
        load_pretrained(str(path), config_overrides={"rope_thetta": 40000})


def test_ineffective_override_is_detected_on_the_module(saved):
    """What the old code produced (config attribute set, model untouched) fails the check, naming the key."""
    path, _ = saved
    model, _ = load_pretrained(str(path))
    with pytest.raises(ConfigError, match=r"model\.config_overrides\.rope_theta"):
        check_config_overrides(model, {"rope_theta": 40000})
    model.config.rope_parameters["rope_theta"] = 40000  # config edited after the model was built: still stale
    with pytest.raises(ConfigError, match="rotary frequencies"):
        check_config_overrides(model, {"rope_theta": 40000})
    with pytest.raises(ConfigError, match=r"model\.config_overrides\.max_position_embeddings"):
        check_config_overrides(model, {"max_position_embeddings": 16384})


@pytest.mark.parametrize("dtype, expected", [("float32", torch.float32), ("bfloat16", torch.bfloat16)])
def test_dtype_parameter_sets_the_parameter_dtype(saved, dtype, expected):
    path, _ = saved
    model, _ = load_pretrained(str(path), dtype)
    assert {p.dtype for p in model.parameters()} == {expected}
    with pytest.raises(ConfigError, match="model.dtype"):
        load_pretrained(str(path), "fp8")


def test_loads_keep_hub_kernels_off_offline(saved, monkeypatch):
    """transformers >= 5.2x defaults `use_kernels=True` (layers swapped for Hub code at load): our loads pass
    False, so an offline load never reaches the Hub and the numerics are the checkpoint's own layers."""
    import transformers

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path, _ = saved
    model, _ = load_pretrained(str(path))
    assert model.use_kernels is False
    if hasattr(transformers.PreTrainedModel, "set_use_kernels"):
        from red.models import no_hub_kernels

        assert no_hub_kernels() == {"use_kernels": False}
