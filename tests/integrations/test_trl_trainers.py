"""red_kernels' fused LM head beyond GRPO's two fields, against stock TRL 1.16 on CPU: the extra per-token fields
(is_top1, mean_logits, log_sum_sq_probs), SFTTrainer's loss / entropy / token accuracy, and a Mixture-of-Experts
model's load-balancing loss (forward and inside GRPOTrainer.compute_loss)."""

import copy

import datasets  # trl and its datasets: installed by .[bench] (-> [trl]); a missing one fails, never skips
import pytest
import torch
import trl
from conftest import tiny_model
from trl.trainer.utils import add_fused_lm_head

from red_kernels.integrations.trl import OUTPUTS, REDKernelsSFTTrainer, add_red_lm_head


@pytest.fixture(scope="module")
def tiny():
    """(model, tokenizer), the tied embedding sharpened (a random init is near-uniform) so that argmax tokens
    and entropies vary; tests deep-copy the model."""
    model, tok = tiny_model(seed=5)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(10.0)
    return model, tok


def _greedy_mixed(model, n=4, length=14, seed=0):
    """Token rows whose first half continues greedily (each next token the model's argmax, so is_top1 holds)
    and whose second half is random: token accuracy strictly between 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (n, 3), generator=g)
    with torch.no_grad():
        for _ in range(length // 2 - 3):
            nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
    rand = torch.randint(3, model.config.vocab_size, (n, length - ids.shape[1]), generator=g)
    return torch.cat([ids, rand], 1)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_grads_close(a, b):
    assert a.keys() == b.keys() and a
    for name, g in b.items():
        torch.testing.assert_close(a[name], g, rtol=1e-4, atol=1e-6 * float(g.abs().max()), msg=name)


@pytest.mark.parametrize("transform", [{}, {"final_logit_softcapping": 3.0, "logit_scale": 0.5}])
def test_every_fused_field_matches_trl(tiny, transform):
    """All five FusedCausalLMOutput fields against TRL's head asked for all of them (temperature 0.7)."""
    base = copy.deepcopy(tiny[0])
    for k, v in transform.items():
        setattr(base.config, k, v)
    ours, theirs = base, copy.deepcopy(base)
    for m in (ours, theirs):
        add_fused_lm_head(m, temperature=0.7, outputs=OUTPUTS)
    add_red_lm_head(ours, temperature=0.7, outputs=OUTPUTS)
    ids = _greedy_mixed(tiny[0])
    labels = ids.clone()
    labels[:, :2] = -100
    a, b = (m(input_ids=ids, labels=labels, fused_lm_head=True) for m in (ours, theirs))
    assert a.is_top1.dtype == torch.bool and torch.equal(a.is_top1, b.is_top1)
    assert 0 < int(a.is_top1.sum()) < int(a.label_mask.sum())  # both outcomes occur
    for f in ("log_probs", "entropy", "mean_logits", "log_sum_sq_probs"):
        torch.testing.assert_close(getattr(a, f), getattr(b, f), rtol=1e-5, atol=1e-5, msg=f)
        assert (getattr(a, f)[~a.label_mask] == 0).all(), f


def test_is_top1_counts_only_the_first_of_tied_maxima():
    """Two identical weight rows tie exactly (small integers: every summation order gives the same logits): the
    earlier id is the argmax, the later one is not (TRL's rule)."""
    from red_kernels.integrations.trl import _extra_fields

    w = torch.randint(-3, 4, (6, 4), generator=torch.Generator().manual_seed(0)).float()
    w[1] = w[4] = torch.tensor([5.0, -5.0, 5.0, 5.0])  # rows 1 and 4: equal, dominant logits for x = w[1]
    x = w[1:2].repeat(3, 1)
    y = torch.tensor([1, 4, 0])
    out = _extra_fields(x, w, None, y, 1.0, None, 1.0, ("is_top1",))
    assert out["is_top1"].tolist() == [True, False, False]


def test_outputs_are_validated(tiny):
    with pytest.raises(ValueError, match="outputs: unknown field"):
        add_red_lm_head(copy.deepcopy(tiny[0]), outputs=("log_probs", "logits"))


def _sft(cls, tiny, tmp_path, ids):
    model, tok = tiny
    args = trl.SFTConfig(
        output_dir=str(tmp_path / cls.__name__),
        per_device_train_batch_size=ids.shape[0],
        report_to="none",
        use_cpu=True,
        bf16=False,
        disable_tqdm=True,
        save_strategy="no",
        max_length=None,
    )
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist()})
    trainer = cls(model=copy.deepcopy(model), args=args, train_dataset=data, processing_class=tok)
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.detach(), _grads(trainer.model), trainer._metrics["train"]


def test_sft_trainer_loss_entropy_and_token_accuracy_match_stock_trl(tiny, tmp_path):
    ids = _greedy_mixed(tiny[0], n=4, length=16, seed=1)
    s_loss, s_grads, s_metrics = _sft(trl.SFTTrainer, tiny, tmp_path, ids)
    o_loss, o_grads, o_metrics = _sft(REDKernelsSFTTrainer, tiny, tmp_path, ids)
    torch.testing.assert_close(o_loss, s_loss, rtol=1e-5, atol=1e-7)
    _assert_grads_close(o_grads, s_grads)
    assert 0 < s_metrics["mean_token_accuracy"][0] < 1
    assert o_metrics["mean_token_accuracy"] == s_metrics["mean_token_accuracy"]
    assert o_metrics["entropy"][0] == pytest.approx(s_metrics["entropy"][0], rel=1e-5)


def _tiny_moe(vocab, seed=0):
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=4,
        num_experts_per_tok=2,
        router_aux_loss_coef=0.3,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = MixtralForCausalLM(cfg)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(10.0)
    return model


def test_moe_forward_returns_trls_aux_loss_and_gradients(tiny):
    base = _tiny_moe(tiny[0].config.vocab_size)
    ours, theirs = base, copy.deepcopy(base)
    for m in (ours, theirs):
        add_fused_lm_head(m, outputs=("log_probs", "entropy"))
    add_red_lm_head(ours)
    ids = _greedy_mixed(tiny[0], n=3, length=10)
    attn = torch.ones_like(ids)
    attn[1, -3:] = 0
    labels = ids.masked_fill(attn == 0, -100)
    outs = []
    for m in (ours, theirs):
        out = m(
            input_ids=ids, attention_mask=attn, labels=labels, fused_lm_head=True, output_router_logits=True
        )
        (out.loss + 0.1 * out.entropy.sum()).backward()
        outs.append((out, _grads(m)))
    (a, ga), (b, gb) = outs
    assert b.aux_loss is not None and float(b.aux_loss.detach()) > 0
    torch.testing.assert_close(a.aux_loss, b.aux_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-7)
    _assert_grads_close(ga, gb)
    assert any(
        "gate" in n and g.abs().max() > 0 for n, g in ga.items()
    )  # the router is trained by the aux loss


def test_moe_grpo_compute_loss_matches_stock_trl(tiny, tmp_path):
    """GRPOTrainer with a Mixtral policy: TRL enables the aux loss from the config's router_aux_loss_coef and
    requests router logits in the policy pass; loss, aux-loss metric and every gradient as stock TRL."""
    import os

    from red_kernels.integrations.trl import REDKernelsGRPOTrainer

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    _, tok = tiny
    path = tmp_path / "moe"
    _tiny_moe(tiny[0].config.vocab_size, seed=1).save_pretrained(path)
    tok.save_pretrained(path)
    g = torch.Generator().manual_seed(2)
    prompts = [tok("2+2=")["input_ids"]] * 4
    completions = [torch.randint(3, 320, (3 + i,), generator=g).tolist() for i in range(4)]
    rollout = {
        "prompt_ids": prompts,
        "completion_ids": completions,
        "logprobs": [[-1.0] * len(c) for c in completions],
    }

    def run(cls):
        args = trl.GRPOConfig(
            output_dir=str(tmp_path / cls.__name__),
            num_generations=4,
            per_device_train_batch_size=4,
            max_completion_length=8,
            report_to="none",
            save_strategy="no",
            use_cpu=True,
            bf16=False,
            disable_tqdm=True,
        )
        trainer = cls(
            model=str(path),
            reward_funcs=lambda completion_ids, **kw: [float(sum(c) % 5) for c in completion_ids],
            args=args,
            train_dataset=datasets.Dataset.from_dict({"prompt": ["2+2="]}),
            processing_class=tok,
            rollout_func=lambda p, t: copy.deepcopy(rollout),
        )
        assert trainer.aux_loss_enabled
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
        batch = trainer._generate_and_score_completions([{"prompt": "2+2="}] * 4)
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        return loss.detach(), _grads(trainer.model), trainer._metrics["train"]["aux_loss"]

    s_loss, s_grads, s_aux = run(trl.GRPOTrainer)
    o_loss, o_grads, o_aux = run(REDKernelsGRPOTrainer)
    assert s_aux[0] > 0 and o_aux[0] == pytest.approx(s_aux[0], rel=1e-5)
    torch.testing.assert_close(o_loss, s_loss, rtol=1e-5, atol=1e-7)
    _assert_grads_close(o_grads, s_grads)


def test_truncated_logprobs_make_the_vllm_ratio_of_a_top_k_sampler_one(tiny, tmp_path):
    """Rollouts drawn (in float64) from the policy's own top-k distribution at temperature 0.8, their sampler
    log-probs recorded as vLLM records them: on-policy, the true importance ratio is 1. Stock TRL scores the full
    softmax, so its ratio is biased low by the truncated mass; with truncated_logprobs=True it is 1 to fp32."""
    import os

    from red_kernels.integrations.trl import REDKernelsGRPOTrainer

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    model, tok = tiny
    path = tmp_path / "policy"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    k, tau = 5, 0.8
    g = torch.Generator().manual_seed(4)
    prompt = tok("3*4=")["input_ids"]
    completions, sampler = [], []
    with torch.no_grad():
        for _ in range(4):
            ids, lps = list(prompt), []
            for _ in range(5):
                z = model(input_ids=torch.tensor([ids])).logits[0, -1].double() / tau
                kth = z.sort(descending=True).values[k - 1]
                logq = z.masked_fill(z < kth, float("-inf")).log_softmax(-1)
                t = int(torch.multinomial(logq.exp(), 1, generator=g))
                ids.append(t)
                lps.append(float(logq[t]))
            completions.append(ids[len(prompt) :])
            sampler.append(lps)
    rollout = {"prompt_ids": [prompt] * 4, "completion_ids": completions, "logprobs": sampler}

    def scored(cls, **extra):
        args = trl.GRPOConfig(
            output_dir=str(tmp_path / cls.__name__),
            num_generations=4,
            per_device_train_batch_size=4,
            max_completion_length=5,
            temperature=tau,
            top_k=k,
            vllm_importance_sampling_mode="token_truncate",
            report_to="none",
            save_strategy="no",
            use_cpu=True,
            bf16=False,
            disable_tqdm=True,
        )
        trainer = cls(
            model=str(path),
            reward_funcs=lambda completion_ids, **kw: [float(sum(c) % 5) for c in completion_ids],
            args=args,
            train_dataset=datasets.Dataset.from_dict({"prompt": ["3*4="]}),
            processing_class=tok,
            rollout_func=lambda p, t: copy.deepcopy(rollout),
            **extra,
        )
        trainer.use_vllm = True  # as with vLLM: the recorded sampler log-probs feed the IS correction
        trainer._last_loaded_step = trainer.state.global_step
        return trainer._generate_and_score_completions([{"prompt": "3*4="}] * 4)

    stock = scored(trl.GRPOTrainer)
    ours = scored(REDKernelsGRPOTrainer, truncated_logprobs=True)
    sampler_lp = torch.tensor(sampler, dtype=torch.float64)
    torch.testing.assert_close(ours["old_per_token_logps"].double(), sampler_lp, rtol=1e-5, atol=1e-5)
    assert float((ours["importance_sampling_ratio"] - 1).abs().max()) < 1e-5
    stock_log_ratio = stock["old_per_token_logps"].double() - sampler_lp
    assert (
        float(stock_log_ratio.max()) < 0 and float(stock_log_ratio.mean()) < -0.05
    )  # biased low: truncated mass
    with pytest.raises(ValueError, match="top_k > 0 with top_p=1.0"):
        REDKernelsGRPOTrainer(
            model=str(path),
            reward_funcs=lambda completion_ids, **kw: [0.0] * len(completion_ids),
            args=trl.GRPOConfig(output_dir=str(tmp_path / "x"), top_p=0.9, report_to="none", use_cpu=True),
            train_dataset=datasets.Dataset.from_dict({"prompt": ["3*4="]}),
            processing_class=tok,
            truncated_logprobs=True,
        )
