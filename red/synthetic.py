"""The embedded task family, tokenizer and model: `python -m red.train` runs with no download.

Task family "running extremum" (deterministic generator; design rationale in experiments/embedded/DESIGN.md).
A problem lists one-digit numbers and asks for the largest or the smallest. A solution writes the running
extremum after each number and ends in \\boxed{answer}.

* `chains_warmup` (the warm-up = the student's pre-training): "largest" problems only, with CONCISE solutions
  (the student's own style):
      Find the largest: 4 0 5 1 2 9  ->  Running largest: 4 4 5 5 5 9. So \\boxed{9}.
* `chains` (RED training and held-out): half "largest" (RECALL: the base model already solves some of them, its
  own exploration can sharpen that) and half "smallest" (EXTENSION: the base model never saw a running minimum
  and answers with the maximum, so online samples almost never earn a reward; only the teacher shows how). The
  teacher traces are correct but VERBOSE like distilled R1 traces: 1 or 2 redundant re-checks ("Wait, let me
  check: 0.") before the answer, 31-41 tokens against 23 for a concise solution. With `rollout.max_new_tokens:
  48` a student that copies the verbosity and adds a third check (47-50 tokens) mostly runs out of budget
  (truncated: no answer, reward 0): verbosity costs.
* `chains_concise`: the `chains` problems with concise traces (ablation: the same skills without verbosity).
* `wordproblems`: one- and two-step grade-school word problems (+, -, *, /) with worked solutions ending in
  \\boxed{}, for real-model runs (red/configs/smollm2-135m.yaml); not part of the tiny tokenizer's corpus.

Problems are split into disjoint train / held-out sets by a hash of their numbers (1 in 8 held out), so the
warm-up and RED training never see a held-out problem. Held-out rows carry `source` synthetic/largest or
synthetic/smallest, so evaluation reports recall and extension separately.

The tokenizer is a byte-level BPE trained in-process (digits split individually, as Qwen2 does) wrapped in a
`PreTrainedTokenizerFast` with a ChatML template; the model is a small random Qwen2.
"""

from __future__ import annotations

import hashlib
import random
from itertools import accumulate

# task -> (kinds, list lengths (both drawn uniformly), teacher style, base habits)
# base habits (warm-up only): kind -> per-list-length probability that a warm-up trace is CAREFUL (the correct
# running-extremum procedure); otherwise it is the kind's HABIT: a one-line guess of the last number for
# "largest", the running LARGEST for "smallest" (the student confuses the two). None: always careful.
WARMUP_CAREFUL = {
    "largest": {5: 0.8, 6: 0.65, 7: 0.35, 8: 0.2},
    "smallest": {5: 0.06, 6: 0.06, 7: 0.06, 8: 0.06},
}
WARMUP_KINDS = ("largest",) * 3 + ("smallest",)  # the warm-up sees "smallest" in 1 of 4 problems
LENGTHS = (5, 6, 7, 8)
TASKS = {
    "chains_warmup": (WARMUP_KINDS, LENGTHS, "concise", WARMUP_CAREFUL),
    "chains": (("largest", "smallest"), LENGTHS, "verbose", None),
    "chains_concise": (("largest", "smallest"), LENGTHS, "concise", None),
}
SPLITS = ("train", "validation", "heldout")
CHECKS = (1, 2)  # redundant re-checks in a verbose trace, drawn uniformly
CHECK_PHRASES = ("Wait, let me check: {a}.", "Hmm, check again: {a}.", "Wait, is it {a}? Yes.")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_MODEL = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def split_of(key: bytes) -> str:
    """Deterministic split of the problem space by a hash of the problem: 1 in 8 held out for the final
    evaluation, 1 in 8 for validation (tuning), the rest for training; the three are disjoint."""
    h = hashlib.blake2b(key, digest_size=2).digest()[0] % 8
    return "heldout" if h == 0 else "validation" if h == 1 else "train"


def is_heldout(numbers) -> bool:
    return split_of(bytes(numbers)) == "heldout"


def make_example(
    kind: str,
    numbers: list[int],
    style: str = "concise",
    rng: random.Random | None = None,
    careful: bool = True,
) -> dict:
    """kind 'largest' | 'smallest' over one-digit numbers -> problem, answer, step-by-step trace.

    style 'verbose' adds 1-2 redundant re-checks (drawn from `rng`) before the answer sentence. careful=False
    writes the kind's habit instead (see WARMUP_CAREFUL): a wrong-procedure trace, as a base model's
    pre-training data may hold; `answer` stays the correct one."""
    rng = rng or random.Random(repr(numbers))
    answer = max(numbers) if kind == "largest" else min(numbers)
    problem = f"Find the {kind}:" + "".join(f" {x}" for x in numbers)
    if not careful and kind == "largest":
        cur = numbers[-1]
        trace = f"Guess: {cur}."
    else:
        does = kind if careful else "largest"
        run = list(accumulate(numbers, max if does == "largest" else min))
        cur = run[-1]
        trace = f"Running {does}:" + "".join(f" {x}" for x in run) + "."
    if style == "verbose":
        for _ in range(rng.choice(CHECKS)):
            trace += " " + rng.choice(CHECK_PHRASES).format(a=cur)
    trace += f" So \\boxed{{{cur}}}."
    return {"problem": problem, "answer": str(answer), "traces": [trace], "source": f"synthetic/{kind}"}


def generate(task: str, n: int, seed: int, split: str = "train") -> list[dict]:
    """n examples of `task` (a key of TASKS) from the train, validation or heldout part, deterministic."""
    if task not in TASKS and task != "wordproblems":
        raise ValueError(f"unknown synthetic task {task!r} (known: {', '.join(TASKS)}, wordproblems)")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if task == "wordproblems":
        return generate_word_problems(n, seed, split)
    kinds, lengths, style, habits = TASKS[task]
    rng = random.Random(f"{task}/{split}/{seed}")
    out = []
    while len(out) < n:
        kind = kinds[rng.randrange(len(kinds))]
        numbers = [rng.randrange(10) for _ in range(lengths[rng.randrange(len(lengths))])]
        if split_of(bytes(numbers)) != split:
            continue
        careful = habits is None or rng.random() < habits[kind][len(numbers)]
        out.append(make_example(kind, numbers, style, rng, careful))
    return out


# ---------------------------------------------------------------- grade-school word problems (real-model runs)
NAMES = ("Tom", "Ana", "Lee", "Mia", "Sam", "Ravi", "Zoe", "Omar", "Lena", "Kofi")
ITEMS = ("apples", "pencils", "stickers", "marbles", "books", "cookies", "cards", "shells")


def word_problem(rng: random.Random) -> dict:
    """A one- or two-step grade-school word problem with a worked solution ending in \\boxed{}."""
    who, what = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.randrange(5)
    a, b, c = rng.randint(3, 40), rng.randint(2, 25), rng.randint(2, 9)
    if kind == 0:
        q = f"{who} has {a} {what}. {who} buys {b} more. How many {what} does {who} have now?"
        steps, ans = (
            [f"{who} has {a} {what} and buys {b} more, so {who} has {a} + {b} = {a + b} {what}."],
            a + b,
        )
    elif kind == 1:
        a = a + b
        q = f"{who} had {a} {what} and gave {b} of them to a friend. How many {what} does {who} have left?"
        steps, ans = [f"{who} gave away {b} of {a} {what}, so {a} - {b} = {a - b} {what} are left."], a - b
    elif kind == 2:
        q = f"{who} has {c} bags with {b} {what} in each bag. How many {what} does {who} have in total?"
        steps, ans = [f"There are {c} bags of {b} {what}, so {c} * {b} = {c * b} {what}."], c * b
    elif kind == 3:
        q = f"{who} shares {c * b} {what} equally among {c} friends. How many {what} does each friend get?"
        steps, ans = [f"{c * b} {what} shared among {c} friends is {c * b} / {c} = {b} {what} each."], b
    else:
        q = (
            f"{who} has {a} {what}, buys {c} packs of {b} {what}, and then gives {c} {what} away. "
            f"How many {what} does {who} have now?"
        )
        steps = [
            f"The packs hold {c} * {b} = {c * b} {what}.",
            f"{who} then has {a} + {c * b} = {a + c * b} {what}.",
            f"After giving {c} away, {a + c * b} - {c} = {a + c * b - c} {what} are left.",
        ]
        ans = a + c * b - c
    trace = "\n".join(steps) + f"\nThe answer is \\boxed{{{ans}}}."
    return {"problem": q, "answer": str(ans), "traces": [trace], "source": "synthetic/wordproblems"}


def generate_word_problems(n: int, seed: int, split: str) -> list[dict]:
    rng = random.Random(f"wordproblems/{split}/{seed}")
    out = []
    while len(out) < n:
        ex = word_problem(rng)
        if split_of(ex["problem"].encode()) == split:
            out.append(ex)
    return out


def build_tokenizer():
    """Byte-level BPE (~300 tokens) trained in-process on task text, with a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [
        t
        for task in TASKS
        for ex in generate(task, 300, seed=12345)
        for t in (ex["problem"], ex["traces"][0])
    ]
    corpus += ["user", "assistant", "system", "You are a helpful assistant."]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_model(tokenizer, overrides: dict | None = None, seed: int = 0):
    """A small random Qwen2ForCausalLM (tied embeddings) sized for the tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=len(tokenizer),
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **{**TINY_MODEL, **(overrides or {})},
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(cfg)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model
