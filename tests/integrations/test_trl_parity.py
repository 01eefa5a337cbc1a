"""REDKernelsGRPOTrainer against stock trl.GRPOTrainer 1.16 for every loss TRL offers, at the level of one step.

Each case builds both trainers from the same saved tiny Qwen2 with the same GRPOConfig and a fixed rollout
(`rollout_func`: the same completions and recorded sampling log-probs for both), runs TRL's own
`_generate_and_score_completions` (old-policy, reference and importance-sampling passes), moves the weights of both
policies by the same small perturbation (as an optimizer step would, so ratios differ from 1 and clipping, masks
and corrections engage), then one `compute_loss` + backward. The scored batch, the loss and every parameter's
gradient must agree with stock TRL (batch and loss rtol 1e-5, gradients rtol 1e-4) in fp32 on CPU.

`LOSS_TYPES` is read from TRL's GRPOConfig help text, and a test checks that list against the loss types the
installed TRL's `_compute_loss` dispatches on, so a loss added upstream fails here until it is covered.
"""

import copy
import inspect
import os
import re

import datasets  # trl and its datasets: installed by .[bench] (-> [trl]); a missing one fails, never skips
import pytest
import torch
import trl
from conftest import tiny_model

from red_kernels.integrations.trl import REDKernelsGRPOTrainer

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is flagged experimental by TRL

PROMPTS = ["12+7=", "3*4="]
GENERATIONS = 4
MAX_COMPLETION = 8
LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo")


def _offered_loss_types():
    """The loss types the installed TRL's GRPOTrainer._compute_loss dispatches on."""
    src = inspect.getsource(trl.GRPOTrainer._compute_loss)
    found = set(re.findall(r'self\.loss_type == "(\w+)"', src))
    for group in re.findall(r"self\.loss_type in \[([^\]]*)\]", src):
        found |= set(re.findall(r'"(\w+)"', group))
    return found


def test_every_loss_type_trl_offers_is_covered():
    assert _offered_loss_types() == set(LOSS_TYPES)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(path of the saved tiny model, tokenizer, fixed rollout): completions of several lengths (some end with
    EOS, some are truncated), and sampling log-probs = the model's own float64 log-probs + noise, as a vLLM engine
    with a slightly different numerics would record."""
    model, tok = tiny_model(seed=3)
    with torch.no_grad():  # a random init is near-uniform (entropy ≈ log V): sharpen it (tied embeddings)
        model.get_input_embeddings().weight.mul_(10.0)
    path = tmp_path_factory.mktemp("tiny-qwen2")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    g = torch.Generator().manual_seed(0)
    prompt_ids = [tok(p)["input_ids"] for p in PROMPTS for _ in range(GENERATIONS)]
    completions = []
    for i in range(len(prompt_ids)):
        ids = torch.randint(3, model.config.vocab_size, (3 + i % (MAX_COMPLETION - 2),), generator=g).tolist()
        completions.append(ids + [tok.eos_token_id] if i % 3 else ids + ids[:1])  # every third one truncated
    completions = [c[:MAX_COMPLETION] for c in completions]
    sampling = []
    with torch.no_grad():
        for p, c in zip(prompt_ids, completions):
            ids = torch.tensor([p + c])
            logits = model(input_ids=ids).logits[0, len(p) - 1 : -1].double()
            lp = logits.log_softmax(-1).gather(-1, torch.tensor(c)[:, None]).squeeze(-1)
            sampling.append((lp + 0.3 * torch.randn(len(c), generator=g, dtype=torch.float64)).tolist())
    rollout = {"prompt_ids": prompt_ids, "completion_ids": completions, "logprobs": sampling}
    return str(path), tok, rollout


def _reward(completions, completion_ids, **kwargs):
    """Varies within each group, so advantages are non-zero and of both signs."""
    return [float(sum(c) % 7) for c in completion_ids]


def _perturb(model, scale=0.2):
    """The same deterministic move of every weight (relative to its size) in any copy of the model."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(torch.randn(p.shape, generator=g) * scale * p.abs().mean())


def _step(cls, setup, tmp_path, opts):
    """One scored batch + one compute_loss/backward; returns (batch, loss, grads, trainer)."""
    path, tok, rollout = setup
    opts = dict(opts)
    vllm = opts.pop("vllm", False)
    last_entropy = opts.pop("last_world_entropy", None)

    def rollout_func(prompts, trainer):
        return copy.deepcopy(rollout)

    torch.manual_seed(0)
    args = trl.GRPOConfig(
        output_dir=str(tmp_path / cls.__name__),
        num_generations=GENERATIONS,
        per_device_train_batch_size=len(PROMPTS) * GENERATIONS // 2,
        steps_per_generation=2,  # gradient_accumulation_steps=1: TRL computes old-policy log-probs
        max_completion_length=MAX_COMPLETION,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        disable_tqdm=True,
        **opts,
    )
    data = datasets.Dataset.from_dict({"prompt": PROMPTS})
    trainer = cls(
        model=path,
        reward_funcs=_reward,
        args=args,
        train_dataset=data,
        processing_class=tok,
        rollout_func=rollout_func,
    )
    trainer.model.train()  # as in Trainer.training_step: train-mode normalisers, adaptive entropy updates
    trainer.current_gradient_accumulation_steps = args.gradient_accumulation_steps  # set by Trainer's loop
    if vllm:  # as if use_vllm=True: the recorded sampling log-probs feed TRL's importance-sampling correction
        trainer.use_vllm = True
        trainer._last_loaded_step = trainer.state.global_step  # no weight sync to an engine we do not have
    if last_entropy is not None:  # adaptive entropy: the previous optimizer step's measured entropy
        trainer._last_world_entropy = last_entropy
    batch = trainer._generate_and_score_completions(
        [{"prompt": p} for p in PROMPTS for _ in range(GENERATIONS)]
    )
    _perturb(trainer.model)
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return batch, loss.detach(), grads, trainer


LEVELS = ("token", "sequence")
CASES = [
    pytest.param({"loss_type": t, "importance_sampling_level": lvl}, id=f"{t}-{lvl}")
    for t in LOSS_TYPES
    for lvl in LEVELS
]
OPTIONS = {
    "grpo-epsilon_high": {"loss_type": "grpo", "epsilon_high": 0.28},
    "dapo-epsilon_high-seq": {
        "loss_type": "dapo",
        "epsilon_high": 0.28,
        "importance_sampling_level": "sequence",
    },
    "cispo-epsilon_high5": {"loss_type": "cispo", "epsilon_high": 5.0},
    "grpo-delta": {"loss_type": "grpo", "delta": 1.1},
    "grpo-delta-seq": {"loss_type": "grpo", "delta": 1.05, "importance_sampling_level": "sequence"},
    "dapo-entropy_mask": {"loss_type": "dapo", "top_entropy_quantile": 0.2},
    "grpo-entropy_mask-seq": {
        "loss_type": "grpo",
        "top_entropy_quantile": 0.5,
        "importance_sampling_level": "sequence",
    },
    "dapo-entropy_bonus": {"loss_type": "dapo", "entropy_coef": 0.05},
    "dapo-entropy_mask-bonus": {"loss_type": "dapo", "entropy_coef": 0.05, "top_entropy_quantile": 0.3},
    "dapo-adaptive_entropy": {
        "loss_type": "dapo",
        "use_adaptive_entropy": True,
        "entropy_coef": 0.05,
        "entropy_target": 100.0,
        "last_world_entropy": 5.0,
    },
    "grpo-adaptive_entropy-off": {
        "loss_type": "grpo",
        "use_adaptive_entropy": True,
        "entropy_coef": 0.05,
        "entropy_target": 0.1,
        "last_world_entropy": 5.0,
    },
    "dapo-kl-bias_correction": {"loss_type": "dapo", "beta": 0.1, "use_bias_correction_kl": True},
    "grpo-kl-no_bias_correction": {"loss_type": "grpo", "beta": 0.1, "use_bias_correction_kl": False},
    "grpo-kl-bias_correction-seq": {
        "loss_type": "grpo",
        "beta": 0.1,
        "use_bias_correction_kl": True,
        "importance_sampling_level": "sequence",
    },
    "dapo-off_policy_mask": {"loss_type": "dapo", "off_policy_mask_threshold": 0.02},
    "grpo-off_policy_mask-vllm": {"loss_type": "grpo", "off_policy_mask_threshold": 0.02, "vllm": True},
    "dapo-mask_truncated": {"loss_type": "dapo", "mask_truncated_completions": True},
    **{
        f"grpo-vllm-{mode}": {
            "loss_type": "grpo",
            "vllm": True,
            "vllm_importance_sampling_mode": mode,
            "vllm_importance_sampling_clip_min": 0.8,
            "vllm_importance_sampling_clip_max": 1.25,
        }
        for mode in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
    },
    "dapo-vllm-default-seq": {"loss_type": "dapo", "vllm": True, "importance_sampling_level": "sequence"},
    "vespo-vllm-token_truncate": {
        "loss_type": "vespo",
        "vllm": True,
        "vllm_importance_sampling_mode": "token_truncate",
        "vllm_importance_sampling_clip_max": 1.5,
    },
    "sapo-vllm-token_mask": {
        "loss_type": "sapo",
        "vllm": True,
        "vllm_importance_sampling_mode": "token_mask",
    },
    "everything": {
        "loss_type": "dapo",
        "epsilon_high": 0.28,
        "delta": 1.2,
        "top_entropy_quantile": 0.5,
        "entropy_coef": 0.01,
        "beta": 0.05,
        "off_policy_mask_threshold": 0.05,
        "vllm": True,
        "vllm_importance_sampling_mode": "token_truncate",
    },
}
CASES += [pytest.param(opts, id=name) for name, opts in OPTIONS.items()]

BATCH_KEYS = ("old_per_token_logps", "ref_per_token_logps", "importance_sampling_ratio", "advantages")


@pytest.mark.parametrize("opts", CASES)
def test_one_step_matches_stock_trl(setup, tmp_path, opts):
    s_batch, s_loss, s_grads, stock = _step(trl.GRPOTrainer, setup, tmp_path, opts)
    o_batch, o_loss, o_grads, ours = _step(REDKernelsGRPOTrainer, setup, tmp_path, opts)
    for key in BATCH_KEYS:
        assert (key in s_batch) == (key in o_batch), key
        if key in s_batch:
            torch.testing.assert_close(o_batch[key], s_batch[key], rtol=1e-5, atol=1e-6, msg=key)
    assert "old_per_token_logps" in s_batch  # the ratios below are of two different policies
    if opts.get("vllm"):
        ratio = s_batch["importance_sampling_ratio"]
        assert not torch.allclose(ratio, torch.ones_like(ratio))  # the correction did something
    torch.testing.assert_close(o_loss, s_loss, rtol=1e-5, atol=1e-7)
    assert s_loss != 0
    assert s_grads.keys() == o_grads.keys() and s_grads
    for name, g in s_grads.items():
        scale = float(g.abs().max())
        torch.testing.assert_close(o_grads[name], g, rtol=1e-4, atol=1e-6 * scale, msg=name)
    assert any(float(g.abs().max()) > 0 for g in s_grads.values())
    clipped = stock._metrics["train"].get("clip_ratio/region_mean")
    if clipped is not None and opts.get("importance_sampling_level", "token") == "token":
        assert 0 < clipped[0] < 1  # some ratios leave [1 - ε, 1 + ε]: the clipped branch is exercised
    assert ours.entropy_coef == pytest.approx(stock.entropy_coef, rel=1e-12)  # the adaptive controller agrees
    for key in ("entropy", "kl", "clip_ratio/region_mean", "cispo_clip_ratio", "vespo/phi_seq_mean"):
        s, o = stock._metrics["train"].get(key), ours._metrics["train"].get(key)
        assert (s is None) == (o is None), key
        if s is not None:
            assert o == pytest.approx(s, rel=1e-5, abs=1e-7), key
