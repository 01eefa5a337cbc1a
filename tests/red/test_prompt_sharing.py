"""Layout "shared" (red/packing.py): a group's prompt runs once per micro-batch, its members attend to it through
an explicit mask. Against the padded layout: same log-probs, entropies, loss and gradients; a member never
sees another member; the plan holds every sequence once and counts a chunk's prompt once."""

import pytest
import torch
from conftest import tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from test_packing import _loss_config, moved_policy_batch, policy, tiny_llama
from test_update import _Recorder

from red import attention, synthetic
from red.batching import IGNORE
from red.packing import collate_shared, micro_batches, shared_groups
from red.records import PromptItem, RolloutBatch
from red.rollout.base import Rollout
from red.update import Policy, old_policy_pass, policy_update


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(seed=0)


def grouped_batch(groups=4, n=4, offline=1, seed=0) -> RolloutBatch:
    """`groups` prompts of 2-18 tokens, each with n - offline online members (engine log-probs) and `offline`
    teacher traces, responses of 1-12 tokens; advantages, r̄ and w set per row."""
    g = torch.Generator().manual_seed(seed)

    def tokens(lo, hi):
        return torch.randint(3, 200, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    parts = []
    for i in range(groups):
        p = tokens(2, 19)
        online = [tokens(1, 13) for _ in range(n - offline)]
        ros = [Rollout(p, r, [-1.0] * len(r), "stop") for r in online]
        item = PromptItem(p, "1", [tokens(1, 13) for _ in range(max(offline, 1))], "t", i, i)
        parts.append(RolloutBatch.from_rollouts([item], [ros], offline))
    b = RolloutBatch.cat(parts)
    return b.replace(
        advantage=torch.linspace(-2, 2, b.B),
        group_accuracy=torch.linspace(0.1, 0.9, b.B),
        offline_weight=torch.full((b.B,), 1.5),
    )


def test_collate_shared_lays_out_one_prompt_per_chunk():
    p = [5, 6, 7]
    item = PromptItem(p, "1", [[8, 9]], "t", 0, 0)
    b = RolloutBatch.from_rollouts([item], [[Rollout(p, [4, 3, 2], [-0.5, -0.25, -0.125], "stop")]], 1)
    b = b.replace(
        advantage=torch.tensor([1.0, 2.0]), old_logprobs=torch.tensor([[-1.0, -2.0, -3.0], [-4, -5, 0]])
    )
    mb = collate_shared(b, [[[0, 1]]])
    assert mb.input_ids.tolist() == [[5, 6, 7, 4, 3, 2, 8, 9]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 3, 4]]  # each member continues the prompt
    # member 0's targets 4 3 2 come from columns 2 (the prompt's last), 3, 4; member 1's 8 9 from 2 and 6
    assert mb.hidden_index.tolist() == [[2, 3, 4, 2, 6]]
    assert mb.targets.tolist() == [[4, 3, 2, 8, 9]] and IGNORE not in mb.targets
    assert mb.sequence_ids.tolist() == [[0, 0, 0, 1, 1]] and mb.response_start.tolist() == [0, 3]
    assert mb.offline_mask.tolist() == [[False, False, False, True, True]]
    assert mb.old_logprobs.tolist() == [[-1.0, -2.0, -3.0, -4.0, -5.0]]
    see = mb.attention_mask[0, 0].int().tolist()
    assert see[5] == [1, 1, 1, 1, 1, 1, 0, 0]  # member 0's last token: prompt + its own tokens
    assert see[7] == [1, 1, 1, 0, 0, 0, 1, 1]  # member 1's last token: prompt + its own, not member 0's
    assert see[1] == [1, 1, 0, 0, 0, 0, 0, 0]  # the prompt is causal
    assert mb.to_response(mb.old_logprobs, 4).tolist() == [[-1, -2, -3, 0], [-4, -5, 0, 0]]


def test_collate_shared_refuses_members_of_different_prompts():
    b = grouped_batch(2, 2, 0)
    with pytest.raises(ValueError, match="share a chunk but not a prompt"):
        collate_shared(b, [[[0, 2]]])


def _cost(prompts, lengths, chunk):
    return len(prompts[chunk[0]]) + sum(lengths[i] - len(prompts[i]) for i in chunk)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 5), st.integers(1, 120)), min_size=1, max_size=40),
    st.sampled_from([16, 64, 256, 1024]),
    st.sampled_from([None, 50, 200]),
)
def test_shared_plan_holds_every_sequence_once_and_counts_a_prompt_once(members, budget, row_tokens):
    prompt_len = {0: 3, 1: 40, 2: 7, 3: 90, 4: 15, 5: 1}
    prompts = [tuple(range(100 + g, 100 + g + prompt_len[g])) for g, _ in members]
    lengths = [len(p) + r for p, (_, r) in zip(prompts, members)]
    plan = shared_groups(prompts, lengths, budget, row_tokens)
    cap = budget if row_tokens is None else min(budget, row_tokens)
    assert sorted(i for mb in plan for row in mb for chunk in row for i in chunk) == list(range(len(members)))
    for mb in plan:
        fills = [sum(_cost(prompts, lengths, c) for c in row) for row in mb]
        for row in mb:
            for chunk in row:
                assert len({prompts[i] for i in chunk}) == 1  # a chunk shares one prompt
                assert _cost(prompts, lengths, chunk) <= cap or len(chunk) == 1  # or one sequence too long
        alone = len(mb) == 1 and len(mb[0]) == 1 and len(mb[0][0]) == 1
        assert len(mb) * max(fills) <= budget or alone  # rows x width within the budget
    total = sum(_cost(prompts, lengths, c) for mb in plan for row in mb for c in row)
    assert total <= sum(lengths)  # never more tokens than unshared


def test_shared_micro_batches_run_fewer_tokens():
    b = grouped_batch(4, 8, 1, seed=2)
    (mb,) = micro_batches(b, 10_000, 0, "shared")
    assert len(mb.rows) == b.B and mb.input_ids.shape[0] == 4  # a row per group (chunk)
    # one prompt per group instead of one per member (tokens are 3..199, the pad 0)
    assert int((mb.input_ids != 0).sum()) == int(b.lengths.sum() - (b.prompt_len * 7 / 8).sum())
    rows = micro_batches(b, 10_000, 0, "shared", row_tokens=60)
    assert len(rows) == 1 and rows[0].input_ids.shape[0] > 1 and rows[0].input_ids.shape[1] <= 60 + 18


def shared_policy(model, tok, row_tokens=None):
    p = policy(model, tok, "shared")
    p.row_tokens = row_tokens
    return p


@pytest.mark.parametrize("budget, row_tokens", [(24, None), (64, None), (10_000, None), (10_000, 30)])
def test_old_policy_pass_shared_equals_padded(tiny, budget, row_tokens):
    model, tok = tiny
    b = grouped_batch(4, 5, 1, seed=3)
    ref = old_policy_pass(policy(model, tok, "off"), b, 64, temperature=0.7)
    got = old_policy_pass(shared_policy(model, tok, row_tokens), b, budget, temperature=0.7)
    assert torch.allclose(got.old_logprobs, ref.old_logprobs, rtol=1e-5, atol=1e-6)
    assert torch.allclose(got.entropy, ref.entropy, rtol=1e-5, atol=1e-6)
    assert not got.old_logprobs[~b.response_mask()].any()


def test_a_member_never_sees_another_member(tiny):
    model, tok = tiny
    b = grouped_batch(3, 4, 1, seed=4)
    assert len(micro_batches(b, 10_000, 0, "shared")) == 1  # every member in one micro-batch
    base = old_policy_pass(policy(model, tok, "shared"), b, 10_000, 1.0)
    victim = 5  # group 1, member 1
    resp = b.response.clone()
    n = int(b.response_len[victim])
    resp[victim, :n] = 3 + (resp[victim, :n] + 7) % 190
    changed = old_policy_pass(policy(model, tok, "shared"), b.replace(response=resp), 10_000, 1.0)
    others = torch.arange(b.B) != victim
    assert torch.equal(changed.old_logprobs[others], base.old_logprobs[others])
    assert torch.equal(changed.entropy[others], base.entropy[others])
    assert not torch.equal(changed.old_logprobs[victim], base.old_logprobs[victim])


@pytest.mark.parametrize("mode", ["red", "luffy", "grpo"])
@pytest.mark.parametrize("agg", ["seq_sum_const", "token_mean", "seq_mean"])
def test_update_shared_equals_padded(tiny, mode, agg):
    model, tok = tiny
    b = grouped_batch(4, 5, 0 if mode == "grpo" else 1, seed=5)
    b, norm = moved_policy_batch(model, tok, b, agg)
    runs = []
    for lay, budget, row_tokens in (("off", 64, None), ("shared", 40, None), ("shared", 10_000, 30)):
        rec = _Recorder(model.parameters())
        pol = policy(model, tok, lay) if lay == "off" else shared_policy(model, tok, row_tokens)
        m = policy_update(pol, b, _loss_config(mode, agg), budget, rec, 1e9, norm)
        runs.append((m, rec.grads))
    (m1, g1) = runs[0]
    assert m1["loss"] != 0.0
    for m2, g2 in runs[1:]:
        for k in m1:
            assert m2[k] == pytest.approx(m1[k], rel=1e-5, abs=1e-7), k
        for a, c in zip(g1, g2):
            assert torch.allclose(c, a, rtol=1e-5, atol=1e-6 * float(a.abs().max()))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_llama_matches_padded(attn):
    """SmolLM2 is a Llama: the custom mask must reach its attention in both implementations (eager adds it to
    the scores, so the policy turns the bool mask into 0 / dtype-min)."""
    model = tiny_llama(attn)
    b = grouped_batch(3, 4, 1, seed=7)
    pad = type("T", (), {"pad_token_id": 0})
    ref = old_policy_pass(Policy(model, pad_id=0), b, 64, 1.0)
    got = old_policy_pass(policy(model, pad, "shared"), b, 64, 1.0)
    assert torch.allclose(got.old_logprobs, ref.old_logprobs, rtol=1e-5, atol=1e-6)
    assert torch.allclose(got.entropy, ref.entropy, rtol=1e-5, atol=1e-6)


def test_layout_selection_with_prompt_sharing():
    assert attention.packing_layout("sdpa", "cpu", True, True) == "shared"
    assert attention.packing_layout("eager", "cuda", True, True) == "shared"
    assert attention.packing_layout("sdpa", "cpu", True, False) == "rows"
    assert attention.packing_layout("flash_attention_2", "cuda", True, True) == "flat"  # varlen: no mask
    assert attention.packing_layout("sdpa", "cpu", False, True) == "off"


def test_row_bound_from_the_model_shape():
    tok = synthetic.build_tokenizer()
    tiny = synthetic.build_model(tok, {"hidden_size": 128, "intermediate_size": 384}, seed=0)
    assert attention.shared_row_tokens(tiny.config) == 128 + 288
    smollm2 = type("C", (), {"hidden_size": 576, "intermediate_size": 1536})
    assert attention.shared_row_tokens(smollm2) == 1728
