"""The embedded task family, tokenizer and model: `python -m red.train` runs with no download.

Task family "running extremum" (deterministic generator). A problem lists L one-digit numbers and asks for the
largest or the smallest; the step-by-step teacher trace writes the running extremum after each number and ends
in \\boxed{answer}:

    problem: Find the smallest: 4 0 5 1 2 9
    trace:   Running smallest: 4 0 0 0 0 0. The answer is \\boxed{0}.

* `chains_warmup` (the warm-up distribution, easier and different): only "largest" problems.
* `chains` (the RED training and held-out distribution): "largest" and "smallest" problems, half each.

The warm-up teaches the format and the "largest" half; RED's teacher traces must extend the policy to
"smallest". Problems are split into disjoint train / held-out sets by a hash of their numbers, so the warm-up
and RED training never see a held-out problem.

The tokenizer is a byte-level BPE trained in-process (digits split individually, as Qwen2 does) wrapped in a
`PreTrainedTokenizerFast` with a ChatML template; the model is a small random Qwen2.
"""
from __future__ import annotations

import hashlib
import random

# task -> list of (kind, largest digit used); kinds are drawn uniformly
TASKS = {
    "chains_warmup": [("largest", 9), ("largest minus one", 4)],
    "chains": [("largest minus one", 9)],
}
LENGTH = 6
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TINY_MODEL = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)


def is_heldout(numbers) -> bool:
    """Deterministic split of the problem space: 1 in 8 number lists is held out for evaluation."""
    h = hashlib.blake2b(bytes(numbers), digest_size=2).digest()
    return h[0] % 8 == 0


def make_example(kind: str, numbers: list[int]) -> dict:
    """kind 'largest' or 'largest minus one' over one-digit numbers -> problem, answer, step-by-step trace."""
    run, cur = [], numbers[0]
    for x in numbers:
        cur = max(cur, x)
        run.append(cur)
    problem = f"Find the {kind}:" + "".join(f" {x}" for x in numbers)
    trace = "Running largest:" + "".join(f" {x}" for x in run) + "."
    if kind == "largest minus one":
        trace += f" Minus one: {cur} - 1 = \\boxed{{{cur - 1}}}."
        cur -= 1
    else:
        trace += f" The answer is \\boxed{{{cur}}}."
    return {"problem": problem, "answer": str(cur), "traces": [trace], "source": f"synthetic/{kind}"}


def generate(task: str, n: int, seed: int, split: str = "train") -> list[dict]:
    """n examples of `task` ('chains' or 'chains_warmup') from the train or heldout part, deterministic."""
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r} (known: {', '.join(TASKS)})")
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    kinds = TASKS[task]
    rng = random.Random(f"{task}/{split}/{seed}")
    out = []
    while len(out) < n:
        kind, top = kinds[rng.randrange(len(kinds))]
        numbers = [rng.randrange(top + 1) for _ in range(LENGTH)]
        if is_heldout(numbers) != (split == "heldout"):
            continue
        out.append(make_example(kind, numbers))
    return out


def build_tokenizer():
    """Byte-level BPE (~300 tokens) trained in-process on task text, with a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = []
    for task in TASKS:
        for ex in generate(task, 300, seed=12345):
            corpus += [ex["problem"], ex["traces"][0]]
    corpus += ["user", "assistant", "system", "You are a helpful assistant."]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=["<|im_start|>"])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_model(tokenizer, overrides: dict | None = None, seed: int = 0):
    """A small random Qwen2ForCausalLM (tied embeddings) sized for the tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    kw = dict(TINY_MODEL)
    kw.update(overrides or {})
    cfg = Qwen2Config(vocab_size=len(tokenizer), tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, bos_token_id=None, **kw)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(cfg)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model
