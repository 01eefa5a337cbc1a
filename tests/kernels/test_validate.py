"""Bad inputs to linear_logprobs raise ValueError/TypeError whose message names the offending argument."""

from __future__ import annotations

import pytest
import torch

from red_kernels import linear_logprobs

N, H, V = 6, 8, 20


def good(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(N, H, generator=g).to(dtype),
        torch.randn(V, H, generator=g).to(dtype),
        torch.randint(0, V, (N,), generator=g),
    )


def _with_nan(t, value):
    t = t.clone()
    t.view(-1)[3] = value
    return t


def bad_case(name):
    """(args, kwargs, expected exception, regex the message must match) for one bad input."""
    x, w, y = good()
    cases = {
        "mismatched_H": ((x[:, :5], w, y), {}, ValueError, "hidden.*H"),
        "weight_not_2d": ((x, w[None], y), {}, ValueError, "weight"),
        "targets_shape": ((x, w, y[:-1]), {}, ValueError, "targets.*shape"),
        "targets_float": ((x, w, y.float()), {}, TypeError, "targets"),
        "weight_on_other_device": ((x, w.to("meta"), y), {}, ValueError, "device"),
        "targets_on_other_device": ((x, w, y.to("meta")), {}, ValueError, "device"),
        "hidden_integer": ((x.long(), w, y), {}, TypeError, "hidden"),
        "weight_integer": ((x, w.int(), y), {}, TypeError, "weight"),
        "mixed_dtypes": ((x, w.bfloat16(), y), {}, TypeError, "hidden.*weight"),
        "target_too_large": ((x, w, torch.where(y == y[0], V, y)), {}, ValueError, "targets"),
        "target_negative_not_ignored": ((x, w, torch.where(y == y[0], -1, y)), {}, ValueError, "targets"),
        "temperature_zero": ((x, w, y), {"temperature": 0.0}, ValueError, "temperature"),
        "temperature_negative": ((x, w, y), {"temperature": -1.0}, ValueError, "temperature"),
        "temperature_nan": ((x, w, y), {"temperature": float("nan")}, ValueError, "temperature"),
        "hidden_nan": ((_with_nan(x, float("nan")), w, y), {}, ValueError, "hidden"),
        "hidden_inf": ((_with_nan(x, float("inf")), w, y), {}, ValueError, "hidden"),
        "weight_nan": ((x, _with_nan(w, float("nan")), y), {}, ValueError, "weight"),
        "weight_inf": ((x, _with_nan(w, -float("inf")), y), {}, ValueError, "weight"),
        "bias_shape": ((x, w, y), {"bias": torch.zeros(V + 1)}, ValueError, "bias"),
        "bad_backend": ((x, w, y), {"backend": "cuda-magic"}, ValueError, "backend"),
        "softcap_zero": ((x, w, y), {"softcap": 0.0}, ValueError, "softcap"),
        "softcap_negative": ((x, w, y), {"softcap": -30.0}, ValueError, "softcap"),
        "softcap_inf": ((x, w, y), {"softcap": float("inf")}, ValueError, "softcap"),
        "logit_scale_zero": ((x, w, y), {"logit_scale": 0.0}, ValueError, "logit_scale"),
        "logit_scale_nan": ((x, w, y), {"logit_scale": float("nan")}, ValueError, "logit_scale"),
    }
    return cases[name]


BAD = [
    "mismatched_H",
    "weight_not_2d",
    "targets_shape",
    "targets_float",
    "weight_on_other_device",
    "targets_on_other_device",
    "hidden_integer",
    "weight_integer",
    "mixed_dtypes",
    "target_too_large",
    "target_negative_not_ignored",
    "temperature_zero",
    "temperature_negative",
    "temperature_nan",
    "hidden_nan",
    "hidden_inf",
    "weight_nan",
    "weight_inf",
    "bias_shape",
    "bad_backend",
    "softcap_zero",
    "softcap_negative",
    "softcap_inf",
    "logit_scale_zero",
    "logit_scale_nan",
]


@pytest.mark.parametrize("name", BAD)
def test_bad_input_raises_naming_the_argument(name):
    args, kwargs, exc, pattern = bad_case(name)
    with pytest.raises(exc, match=pattern):
        linear_logprobs(*args, backend=kwargs.pop("backend", "torch"), **kwargs)


def test_ignore_index_targets_are_not_out_of_range():
    """A negative target equal to ignore_index is valid and yields 0; any other negative id is rejected."""
    x, w, y = good()
    y = y.clone()
    y[2] = -7
    logp, ent = linear_logprobs(x, w, y, ignore_index=-7, backend="torch")
    assert logp[2] == 0 and ent[2] == 0 and (logp[[0, 1, 3, 4, 5]] < 0).all()
    with pytest.raises(ValueError, match="targets"):
        linear_logprobs(x, w, y, backend="torch")  # default ignore_index=-100: -7 is out of range


def test_old_shaping_name_red_is_an_alias_of_accuracy_shift():
    from red_kernels import REDLossConfig, red_loss

    with pytest.warns(FutureWarning, match="REDLossConfig.offline_shaping='red' is deprecated"):
        old = REDLossConfig(offline_shaping="red")
    assert old == REDLossConfig(offline_shaping="accuracy_shift") == REDLossConfig()
    g = torch.Generator().manual_seed(0)
    h, w = (
        torch.randn(2, 5, 8, generator=g, dtype=torch.float64),
        torch.randn(11, 8, generator=g, dtype=torch.float64),
    )
    tgt, mask = torch.randint(0, 11, (2, 5), generator=g), torch.ones(2, 5, dtype=torch.bool)
    kw = dict(
        loss_mask=mask,
        offline_mask=torch.tensor([[False] * 5, [True] * 5]),
        group_accuracy=torch.tensor([0.25, 0.25], dtype=torch.float64),
    )
    with pytest.warns(FutureWarning):
        a = red_loss(
            h, w, tgt, torch.tensor([1.0, -0.5], dtype=torch.float64), offline_shaping="red", **kw
        ).loss
    b = red_loss(
        h, w, tgt, torch.tensor([1.0, -0.5], dtype=torch.float64), offline_shaping="accuracy_shift", **kw
    ).loss
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="offline_shaping.*accuracy_shift"):
        REDLossConfig(offline_shaping="RED")
