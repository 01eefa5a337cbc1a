"""REDKernelsGRPOTrainer against stock trl.GRPOTrainer 1.16, real TRL on CPU with a tiny random Qwen2.

Two optimizer steps from one generation (steps_per_generation=2, so the old-policy pass runs), a reference model
(beta > 0, so the reference pass runs) and an entropy bonus: loss, grad norm and final weights must agree within
1e-4 relative in fp32, and no pass may run the lm_head over more than one position per sequence (generation
scores only the last position; any scoring pass that did would be materialising [N, V] logits).
"""

import copy
import math

import datasets  # trl and its datasets: installed by .[bench] (-> [trl]); a missing one fails, never skips
import pytest
import torch
import trl
from conftest import tiny_model

from red_kernels import linear_logprobs
from red_kernels.integrations.trl import REDKernelsGRPOTrainer, logit_transform


@pytest.fixture(scope="module")
def tiny():
    """(model, tokenizer): never trained or patched here; tests deep-copy the model."""
    return tiny_model(seed=3)


@pytest.fixture(scope="module")
def saved_tiny(tiny, tmp_path_factory):
    """The tiny Qwen2 saved to disk: TRL builds the reference model from the policy's path."""
    path = tmp_path_factory.mktemp("tiny-qwen2")
    model, tok = tiny
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path), tok


def reward_len(completions, **kwargs):
    """A reward that varies within a group, so that advantages are non-zero."""
    return [float(len(c) % 5) for c in completions]


def _no_full_logits(module):
    def forward(x):
        if x.dim() == 3 and x.shape[1] > 1:
            raise AssertionError(f"lm_head run over {x.shape[1]} positions: [N, V] logits materialised")
        return torch.nn.functional.linear(x, module.weight, module.bias)

    module.forward = forward


def _train(cls, saved, tmp_path, loss_type, entropy_coef):
    path, tok = saved
    torch.manual_seed(0)
    args = trl.GRPOConfig(
        output_dir=str(tmp_path / cls.__name__),
        loss_type=loss_type,
        entropy_coef=entropy_coef,
        beta=0.05,
        num_generations=4,
        per_device_train_batch_size=4,
        steps_per_generation=2,
        max_completion_length=6,
        max_steps=2,
        optim="sgd",
        learning_rate=0.1,  # SGD: updates linear in the gradients
        logging_steps=1,
        seed=0,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    data = datasets.Dataset.from_dict({"prompt": ["12+7=", "3*4=", "9-5=", "8+8="]})
    trainer = cls(model=path, reward_funcs=reward_len, args=args, train_dataset=data, processing_class=tok)
    _no_full_logits(trainer.model.lm_head)
    _no_full_logits(trainer.ref_model.lm_head)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return logs, weights


def _close(a, b, rel=1e-4):
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-7)


@pytest.mark.parametrize("loss_type,entropy_coef", [("grpo", 0.0), ("dr_grpo", 0.0), ("dapo", 0.05)])
def test_two_steps_match_stock_grpo_trainer(tiny, saved_tiny, tmp_path, monkeypatch, loss_type, entropy_coef):
    import red_kernels.integrations.trl as adapter

    stock_logs, stock_w = _train(trl.GRPOTrainer, saved_tiny, tmp_path, loss_type, entropy_coef)
    calls = []

    def recording(*args, **kwargs):
        calls.append((torch.is_grad_enabled(), kwargs["return_entropy"]))
        return linear_logprobs(*args, **kwargs)

    monkeypatch.setattr(adapter, "linear_logprobs", recording)
    ours_logs, ours_w = _train(REDKernelsGRPOTrainer, saved_tiny, tmp_path, loss_type, entropy_coef)
    # old-policy pass (no grad, policy), reference pass (no grad, ref model: no entropy), policy pass (grad)
    assert {(False, True), (False, False), (True, True)} <= set(calls)
    assert len(stock_logs) == len(ours_logs) == 2
    for s, o in zip(stock_logs, ours_logs):
        for key in ("loss", "grad_norm", "entropy", "kl"):
            assert _close(s[key], o[key]), (key, s[key], o[key])
    assert stock_logs[-1]["grad_norm"] > 0
    for name, w in stock_w.items():
        diff = (ours_w[name] - w).abs().max()
        assert diff <= 1e-4 * max(w.abs().max(), 1e-6), (name, float(diff))
    init = tiny[0].state_dict()
    moved = max(float((init[k] - w).abs().max()) for k, w in stock_w.items())
    assert moved > 1e-4  # the two steps changed the weights, so equal weights mean equal updates


class _Config:
    def __init__(self, **kw):
        self.__dict__.update(kw)


@pytest.mark.parametrize(
    "attrs,want",
    [
        ({}, (None, 1.0)),
        ({"final_logit_softcapping": 30.0}, (30.0, 1.0)),
        ({"logit_scale": None, "logits_scaling": 8.0, "model_type": "granite"}, (None, 0.125)),
        ({"logits_scaling": 4.0, "model_type": "hyperclovax"}, (None, 4.0)),
        ({"lm_head_multiplier": 0.5}, (None, 0.5)),
        ({"logit_scale": 0.0625, "output_multiplier": 2.0}, (None, 0.0625)),
    ],
)
def test_logit_transform_reads_the_config_like_trl(attrs, want):
    assert logit_transform(_Config(**attrs)) == want


SOFTCAP_SCALE = {"final_logit_softcapping": 3.0, "logit_scale": 0.5}


@pytest.mark.parametrize("shifted,transform", [(False, {}), (True, {}), (False, SOFTCAP_SCALE)])
def test_fused_forward_matches_trls_fused_lm_head(tiny, shifted, transform):
    """The patched forward against TRL's own fused LM head: values and parameter gradients, temperature 0.7,
    prompt positions and padding ignored, labels given shifted (context parallelism) or not, and a softcapped,
    scaled model (refused with NotImplementedError while linear_logprobs lacks softcap / logit_scale)."""
    import inspect

    from trl.trainer.utils import add_fused_lm_head

    from red_kernels.integrations.trl import add_red_lm_head

    base = copy.deepcopy(tiny[0])
    for k, v in transform.items():
        setattr(base.config, k, v)
    ours, theirs = base, copy.deepcopy(base)
    for m in (ours, theirs):
        add_fused_lm_head(m, temperature=0.7, outputs=("log_probs", "entropy"))
    if transform and not {"softcap", "logit_scale"} <= set(inspect.signature(linear_logprobs).parameters):
        with pytest.raises(NotImplementedError, match="softcap"):
            add_red_lm_head(ours, temperature=0.7)
        return
    add_red_lm_head(ours, temperature=0.7)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (3, 11), generator=g)
    attn = torch.ones_like(ids)
    attn[2, -4:] = 0  # a padded row
    labels = ids.masked_fill(attn == 0, -100)
    labels[:, :5] = -100  # the prompt is not scored
    pad = torch.full((3, 1), -100)
    kw = {"shift_labels": torch.cat([labels[:, 1:], pad], 1)} if shifted else {"labels": labels}
    outs = []
    for m in (ours, theirs):
        m.zero_grad()
        out = m(input_ids=ids, attention_mask=attn, fused_lm_head=True, **kw)
        (out.log_probs.sum() + 0.3 * out.entropy.sum()).backward()
        outs.append((out, {n: p.grad.clone() for n, p in m.named_parameters()}))
    (a, ga), (b, gb) = outs
    assert a.log_probs.shape == b.log_probs.shape == (3, 11 if shifted else 10)
    assert torch.equal(a.label_mask, b.label_mask)
    assert (a.log_probs[~a.label_mask] == 0).all() and (a.entropy[~a.label_mask] == 0).all()
    for x, y in ((a.log_probs, b.log_probs), (a.entropy, b.entropy), (a.loss, b.loss)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-4, atol=1e-6)


def test_adapter_passes_softcap_and_scale_as_trl_applies_them(tiny, monkeypatch):
    """With an op of the documented signature (z = softcap·tanh(s·(x·Wᵀ+b)/softcap)/τ, here a naive float64
    stand-in), the adapter's output equals TRL's for a softcapped, scaled model: the config is read and the
    arguments passed as TRL applies them."""
    from trl.trainer.utils import add_fused_lm_head

    import red_kernels.integrations.trl as adapter

    def op(
        hidden,
        weight,
        targets,
        *,
        bias=None,
        temperature=1.0,
        return_entropy=True,
        softcap=None,
        logit_scale=1.0,
    ):
        z = (hidden.double() @ weight.double().t()) * logit_scale
        z = (softcap * torch.tanh(z / softcap) if softcap is not None else z) / temperature
        logp = torch.log_softmax(z, -1)
        keep = targets != -100
        lp = logp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1) * keep
        ent = -(logp.exp() * logp).sum(-1) * keep
        return lp.float(), ent.float() if return_entropy else None

    monkeypatch.setattr(adapter, "linear_logprobs", op)
    base = copy.deepcopy(tiny[0])
    for k, v in SOFTCAP_SCALE.items():
        setattr(base.config, k, v)
    ours, theirs = base, copy.deepcopy(base)
    for m in (ours, theirs):
        add_fused_lm_head(m, temperature=0.7, outputs=("log_probs", "entropy"))
    adapter.add_red_lm_head(ours, temperature=0.7)
    ids = torch.randint(0, base.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :3] = -100
    a, b = (m(input_ids=ids, labels=labels, fused_lm_head=True) for m in (ours, theirs))
    torch.testing.assert_close(a.log_probs, b.log_probs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.entropy, b.entropy, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(
        a.log_probs,
        base(input_ids=ids).logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        * (labels[:, 1:] != -100),
        atol=1e-3,
    )  # the transform mattered


def test_refuses_zero3_at_construction_with_the_reason(tiny, monkeypatch):
    """ZeRO-3 is refused by add_red_lm_head and by both trainers before anything is built (the trainers' own
    __init__ is never reached)."""
    import red_kernels.integrations.trl as adapter

    monkeypatch.setattr(adapter, "_zero3_enabled", lambda args=None: True)
    with pytest.raises(NotImplementedError, match="ZeRO-3.*outside any gather"):
        adapter.add_red_lm_head(copy.deepcopy(tiny[0]))

    def never(*args, **kwargs):
        raise AssertionError("the stock trainer was constructed before the refusal")

    for cls, base in (
        (adapter.REDKernelsGRPOTrainer, trl.GRPOTrainer),
        (adapter.REDKernelsSFTTrainer, trl.SFTTrainer),
    ):
        monkeypatch.setattr(base, "__init__", never)
        with pytest.raises(NotImplementedError, match="Use ZeRO-1/2 or FSDP2"):
            cls(model="unused", args=None)


def test_zero3_is_read_from_the_training_arguments():
    import red_kernels.integrations.trl as adapter

    class Plugin:
        zero_stage = 3

    class Args:
        deepspeed_plugin = Plugin()

    assert adapter._zero3_enabled(Args())
    Plugin.zero_stage = 2
    assert not adapter._zero3_enabled(Args())
