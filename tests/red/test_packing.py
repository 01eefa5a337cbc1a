"""Packed micro-batches (red/packing.py) against padded ones: same log-probs, entropies, loss and gradients; no
attention across a sequence boundary; layout and budget of the packed rows."""

import pytest
import torch
from conftest import tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from test_batching import make_batch
from test_update import _Recorder

from red.batching import IGNORE, collate, token_budget_groups
from red.packing import collate_packed, first_fit_rows, micro_batch_count, micro_batches, packed_groups
from red.records import PromptItem, RolloutBatch
from red.rollout.base import Rollout
from red.update import Policy, old_policy_pass, policy_update

LAYOUTS = ("rows", "flat")


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(seed=0)


def mixed_batch(n=12, seed=0) -> RolloutBatch:
    """make_batch's kinds of rows (online with engine log-probs, every third a teacher trace) with lengths from
    3 to 30 tokens, so rows of a micro-batch have room for short sequences."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for i in range(n):
        p = torch.randint(3, 200, (int(torch.randint(2, 19, (1,), generator=g)),), generator=g).tolist()
        r = torch.randint(3, 200, (int(torch.randint(1, 13, (1,), generator=g)),), generator=g).tolist()
        item = PromptItem(p, "1", [r], "t", i, i)
        if i % 3 == 2:
            parts.append(RolloutBatch.from_rollouts([item], [[]], 1))
        else:
            parts.append(RolloutBatch.from_rollouts([item], [[Rollout(p, r, [-1.0] * len(r), "stop")]], 0))
    return RolloutBatch.cat(parts).replace(
        advantage=torch.linspace(-2, 2, n),
        group_accuracy=torch.linspace(0.1, 0.9, n),
        offline_weight=torch.full((n,), 1.5),
    )


def moved_policy_batch(model, tok, b, agg):
    """(b with old log-probs of a policy that moved since the rollout — ratios != 1, clipping active — and TIS
    weights, the global normaliser of aggregation `agg`)."""
    b = old_policy_pass(policy(model, tok, "off"), b, 10_000, 0.9)
    g = torch.Generator().manual_seed(1)
    mask = b.response_mask()
    b = b.replace(
        old_logprobs=b.old_logprobs + 0.3 * torch.randn(mask.shape, generator=g) * mask,
        is_weights=torch.where(mask, 0.5 + torch.rand(mask.shape, generator=g), 1.0),
    )
    return b, (b.B if agg != "token_mean" else int(b.response_len.sum()))


def policy(model, tok, layout):
    p = Policy(model, pad_id=tok.pad_token_id)
    p.packing = layout
    return p


def test_packed_groups_hold_every_sequence_once_within_the_budget():
    lengths = [5, 3, 8, 2, 7, 1, 30, 4]
    assert first_fit_rows(lengths, 8) == [[6], [2], [4, 5], [0, 1], [7, 3]]
    for budget in (8, 16, 40, 1000):
        for layout in LAYOUTS:
            groups = packed_groups(lengths, budget, layout)
            assert sorted(i for g in groups for row in g for i in row) == list(range(len(lengths)))
            for g in groups:
                width = max(sum(lengths[i] for i in row) for row in g)
                assert len(g) * width <= budget or sum(len(row) for row in g) == 1  # an over-long one alone
                if layout == "flat":
                    assert len(g) == 1
                else:
                    assert width <= max(lengths)
            assert micro_batch_count(lengths, budget, layout) == len(groups)
            assert len(groups) <= len(token_budget_groups(lengths, budget))  # never more than padded
    assert micro_batch_count(lengths, 16) == len(token_budget_groups(lengths, 16))
    with pytest.raises(ValueError, match="packing layout"):
        packed_groups(lengths, 16, "padded")


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(1, 300), min_size=1, max_size=60),
    st.sampled_from([16, 64, 256, 1024]),
    st.sampled_from(LAYOUTS),
)
def test_packing_never_needs_more_micro_batches_or_width_than_padding(lengths, budget, layout):
    groups = packed_groups(lengths, budget, layout)
    assert sorted(i for g in groups for row in g for i in row) == list(range(len(lengths)))
    assert len(groups) <= len(token_budget_groups(lengths, budget))
    for g in groups:
        width = max(sum(lengths[i] for i in row) for row in g)
        assert len(g) * width <= budget or sum(len(row) for row in g) == 1


def test_collate_packed_concatenates_sequences_with_restarting_positions():
    items = [PromptItem([5, 6, 7], "1", [[8, 9]], "t", 0, 0), PromptItem([5], "1", [], "t", 1, 1)]
    b = RolloutBatch.cat(
        [
            RolloutBatch.from_rollouts(items[:1], [[]], 1),
            RolloutBatch.from_rollouts(items[1:], [[Rollout([5], [4, 3], [-0.5, -0.25], "stop")]], 0),
        ]
    )
    b = b.replace(
        old_logprobs=torch.tensor([[-1.0, -2.0], [-0.5, -0.25]]), advantage=torch.tensor([1.0, 2.0])
    )
    mb = collate_packed(b, [[0, 1]], pad_id=0)
    assert mb.input_ids.tolist() == [[5, 6, 7, 8, 9, 5, 4, 3]] and mb.attention_mask is None
    assert mb.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2]]
    assert mb.targets.tolist() == [[IGNORE, IGNORE, 8, 9, IGNORE, 4, 3]]  # 9 never predicts the next prompt
    assert mb.sequence_ids.tolist() == [[0, 0, 0, 0, 0, 1, 1]]
    assert mb.offline_mask.tolist() == [[False, False, True, True, False, False, False]]
    assert mb.old_logprobs.tolist() == [[0, 0, -1.0, -2.0, 0, -0.5, -0.25]]
    assert mb.advantages.tolist() == [1.0, 2.0] and mb.response_start.tolist() == [2, 5]
    assert mb.to_response(mb.old_logprobs, 3).tolist() == [[-1.0, -2.0, 0.0], [-0.5, -0.25, 0.0]]
    two = collate_packed(b, [[1], [0]], pad_id=0)  # "rows": a padded tail
    assert two.input_ids.tolist() == [[5, 4, 3, 0, 0], [5, 6, 7, 8, 9]]
    assert two.position_ids.tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]]  # the tail is a block of its own
    assert two.sequence_ids.tolist() == [[0, 0, 0, -1], [1, 1, 1, 1]]
    assert two.rows.tolist() == [1, 0] and two.seq_row.tolist() == [0, 1]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_old_policy_pass_packed_equals_padded(tiny, layout):
    model, tok = tiny
    b = mixed_batch(12, seed=3)
    ref = old_policy_pass(policy(model, tok, "off"), b, 64, temperature=0.7)
    got = old_policy_pass(policy(model, tok, layout), b, 64, temperature=0.7)
    mbs = micro_batches(b, 64, 0, layout)
    assert len(mbs) > 1 and any(len(mb.rows) > mb.input_ids.shape[0] for mb in mbs)  # really packed
    assert torch.allclose(got.old_logprobs, ref.old_logprobs, rtol=1e-5, atol=1e-6)
    assert torch.allclose(got.entropy, ref.entropy, rtol=1e-5, atol=1e-6)
    assert not got.old_logprobs[~b.response_mask()].any()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_sequence_never_attends_across_a_boundary(tiny, layout):
    model, tok = tiny
    b = mixed_batch(10, seed=4)
    mb = micro_batches(b, 10_000, 0, layout)[0]
    assert len(mb.rows) == b.B and mb.input_ids.shape[0] < b.B  # one micro-batch, packed rows
    base = old_policy_pass(policy(model, tok, layout), b, 10_000, 1.0)
    row = int(mb.seq_row.bincount().argmax())
    in_row = mb.rows[mb.seq_row == row]  # in row order
    victim = int(
        in_row[0 if len(in_row) == 2 else 1]
    )  # a later neighbour (and an earlier one when there are 3+)
    prompt = b.prompt.clone()
    prompt[victim, : int(b.prompt_len[victim])] = 3 + (prompt[victim, : int(b.prompt_len[victim])] + 7) % 190
    changed = old_policy_pass(policy(model, tok, layout), b.replace(prompt=prompt), 10_000, 1.0)
    others = torch.arange(b.B) != victim
    assert not torch.allclose(changed.old_logprobs[victim], base.old_logprobs[victim])
    assert torch.equal(changed.old_logprobs[others], base.old_logprobs[others])
    assert torch.equal(changed.entropy[others], base.entropy[others])


def _loss_config(mode, agg):
    from red_kernels import REDLossConfig

    shaping = {"red": "accuracy_shift", "luffy": "luffy", "grpo": "none"}[mode]
    return REDLossConfig(
        loss_agg=agg,
        loss_const=8.0,
        r_min=1 / 16,
        offline_shaping=shaping,
        entropy_coef=0.001 if mode == "luffy" else 0.0,
        sft_coef=0.1 if mode == "red" else 0.0,
        dual_clip=3.0 if mode == "grpo" else None,
        temperature=0.9,
    )


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", ["red", "luffy", "grpo"])
@pytest.mark.parametrize("agg", ["seq_sum_const", "token_mean", "seq_mean"])
def test_update_packed_equals_padded(tiny, layout, mode, agg):
    model, tok = tiny
    b = mixed_batch(12, seed=5)
    if mode == "grpo":  # online rows only
        b = b.replace(is_offline=torch.zeros(b.B, dtype=torch.bool))
    b, norm = moved_policy_batch(model, tok, b, agg)
    cfg = _loss_config(mode, agg)
    runs = []
    for lay in ("off", layout):
        rec = _Recorder(model.parameters())
        m = policy_update(policy(model, tok, lay), b, cfg, 64, rec, 1e9, norm, use_old=True)
        runs.append((m, rec.grads))
    (m1, g1), (m2, g2) = runs
    assert m1["loss"] != 0.0
    for k in m1:
        assert m2[k] == pytest.approx(m1[k], rel=1e-5, abs=1e-7), k
    for a, c in zip(g1, g2):
        assert torch.allclose(c, a, rtol=1e-5, atol=1e-6 * float(a.abs().max()))


def tiny_llama(attn: str = "sdpa"):
    """A tiny random Llama (SmolLM2's architecture: GQA, tied embeddings), seed 0."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        attn_implementation=attn,
    )
    return LlamaForCausalLM(cfg)


def test_packed_llama_matches_padded():
    """SmolLM2 is a Llama: packing must hold there too (tiny random Llama, same tokens)."""
    model = tiny_llama()
    b = mixed_batch(10, seed=6)
    ref = old_policy_pass(Policy(model, pad_id=0), b, 64, 1.0)
    for layout in LAYOUTS:
        got = old_policy_pass(policy(model, type("T", (), {"pad_token_id": 0}), layout), b, 64, 1.0)
        assert torch.allclose(got.old_logprobs, ref.old_logprobs, rtol=1e-5, atol=1e-6)
        assert torch.allclose(got.entropy, ref.entropy, rtol=1e-5, atol=1e-6)


def test_padded_collate_unchanged_by_the_new_fields():
    b = make_batch(4)
    mb = collate(b, [0, 1, 2, 3], pad_id=0)
    assert mb.sequence_ids is None and mb.seq_row is None and mb.attention_mask is not None
