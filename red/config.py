"""Training configuration: YAML file -> nested dataclasses, `a.b=c` command-line overrides, validation.

Every error names the offending key (e.g. `config key 'rollout.n': must be >= 2, got 1`).
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

MODES = ("grpo", "sft", "sft_then_grpo", "luffy", "red")


class ConfigError(ValueError):
    """A bad configuration value; the message names the key."""


@dataclass
class ModelConfig:
    path: str | None = None            # HF directory or hub id; None -> build the tiny synthetic model
    dtype: str = "float32"             # float32 | bfloat16 | float16 (training weights)
    config_overrides: dict = field(default_factory=dict)   # e.g. {rope_theta: 40000}
    gradient_checkpointing: bool = False
    tiny: dict = field(default_factory=dict)   # Qwen2Config kwargs for the synthetic model
    attn_implementation: str = "sdpa"


@dataclass
class DataConfig:
    train: str = "synthetic:chains"    # file (.jsonl/.parquet) or synthetic:<task>
    eval: list = field(default_factory=lambda: ["synthetic:chains"])
    columns: str = "auto"              # auto | plain | openr1 | luffy
    problem_key: str | None = None     # explicit column names override the preset
    answer_key: str | None = None
    trace_key: str | None = None
    system_prompt: str | None = None
    eos_token: str | None = None       # token ending teacher traces; None: <|im_end|> for ChatML, else EOS
    prompt_template: str = "{problem}"
    max_prompt_len: int = 1024
    overlong_prompt: str = "reject"    # reject | truncate (keep the last tokens)
    overlong_trace: str = "reject"     # reject | truncate (keep the first tokens; loses EOS)
    bad_rows: str = "error"            # error | skip (skipped rows are reported by row number)
    shuffle: bool = True
    eval_limit: int | None = None      # rows per eval file (None = all)
    synthetic_train_size: int = 20000
    synthetic_eval_size: int = 200


@dataclass
class RolloutConfig:
    engine: str = "hf"                 # hf | vllm | auto
    n: int = 8                         # group size (online + offline)
    num_offline: int = 1               # k teacher traces per group
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 1024
    batch_size: int = 256              # max sequences per generate call
    is_correction: str = "none"        # none | tis (truncated importance sampling on online tokens)
    is_cap: float = 2.0
    vllm: dict = field(default_factory=dict)   # passed to the vLLM engine


@dataclass
class RewardConfig:
    format_reward: float = 0.0         # added when a \boxed{} answer is present
    overlong_penalty: bool = False
    overlong_buffer: int = 256         # B of the soft overlong penalty; L_max = rollout.max_new_tokens
    workers: int = 2
    timeout_s: float = 10.0


@dataclass
class AlgorithmConfig:
    mode: str = "red"
    adv_std: bool = True
    adv_stats: str = "group"           # group | online
    dynamic_sampling: bool = True
    max_refill: int = 3
    offline_weight: str = "entropy_ratio"   # entropy_ratio | fixed
    w_min: float = 1.0
    w_max: float | None = None         # None -> n - k
    w_eps: float = 1e-8
    entropy_ema: float | None = None   # None: off; alpha in [0, 1): H~ = alpha H~_prev + (1-alpha) H
    sft_steps: int = 0                 # sft_then_grpo: steps of SFT before GRPO


@dataclass
class LossConfig:
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.28
    dual_clip: float | None = None
    offline_shaping: str = "red"       # red | luffy | none
    shaping_gamma: float = 0.1
    r_min: float | None = None         # None -> 1 / (2n)
    sft_coef: float = 0.0
    entropy_coef: float | None = None  # None -> mode default (luffy 0.001, else 0)
    kl_coef: float = 0.0
    loss_agg: str = "seq_sum_const"    # seq_sum_const | token_mean | seq_mean
    loss_const: float | None = None    # None -> rollout.max_new_tokens


@dataclass
class OptimConfig:
    lr: float = 1e-6
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1


@dataclass
class TrainConfig:
    steps: int = 100
    prompts_per_step: int = 64         # groups per optimizer step (whole batch, all ranks)
    micro_batch_tokens: int = 16384    # padded tokens per forward/backward
    ppo_epochs: int = 1


@dataclass
class WarmupConfig:
    """Optional SFT stage that turns a random model into a 'pretrained base' (synthetic default only)."""
    enabled: bool = False
    data: str = "synthetic:chains_warmup"
    steps: int = 0
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 10


@dataclass
class EvalConfig:
    every: int = 0                     # 0: only before and after training
    n: int = 1                         # samples per problem (avg@n, pass@k)
    temperature: float = 0.0           # 0 = greedy
    max_new_tokens: int | None = None  # None -> rollout.max_new_tokens
    before: bool = True


@dataclass
class LogConfig:
    tensorboard: bool = False
    progress: bool = True
    samples_every: int = 10
    samples_max: int = 4
    plot: bool = True
    truncation_warn: float = 0.2       # warn when this fraction of online samples hits max_new_tokens


@dataclass
class CheckpointConfig:
    every: int = 0                     # 0: only at the end
    keep: int = 2
    resume: str = "auto"               # auto | never


@dataclass
class Config:
    seed: int = 0
    output_dir: str = "runs/red"
    device: str = "auto"               # auto | cpu | cuda
    threads: int | None = None         # torch CPU threads (None: torch default)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------- building


def _type_of(cls, name):
    return typing.get_type_hints(cls)[name]


def _coerce(value, tp, key):
    """Check/convert a YAML or CLI value to the annotated type; errors name the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"config key '{key}': bad value {value!r}")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    if tp is list or origin is list:
        if isinstance(value, list):
            return value
        if isinstance(value, (str, int, float)):
            return [value]
        raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    return value


def _build(cls, data, prefix=""):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix}': expected a mapping, got {data!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            full = f"{prefix}.{k}" if prefix else k
            raise ConfigError(f"config key '{full}': unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            full = f"{prefix}.{f.name}" if prefix else f.name
            kwargs[f.name] = _coerce(data[f.name], _type_of(cls, f.name), full)
    return cls(**kwargs)


def _parse_scalar(text: str):
    """CLI value: YAML scalar rules (1e-6 -> float, true -> bool, null -> None, [a, b] -> list)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and text.strip():
        # YAML reads '1e-6' as a string; accept it as a number.
        try:
            return float(text) if any(c in text for c in ".eE") else int(text)
        except ValueError:
            return value
    return value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b=c` overrides to a nested dict (before dataclass conversion)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. train.steps=10)")
        key, text = item.split("=", 1)
        key = key.strip()
        if key.startswith("--"):
            key = key[2:]
        parts = key.split(".")
        node = data
        for p in parts[:-1]:
            if not isinstance(node.get(p, {}), dict):
                raise ConfigError(f"config key '{key}': '{p}' is not a section")
            node = node.setdefault(p, {})
        node[parts[-1]] = _parse_scalar(text)
    return data


def default_config_path(name: str = "default.yaml"):
    return importlib.resources.files("red").joinpath("configs", name)


def load_yaml(path) -> dict:
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping")
    return data


def resolve_config_path(name):
    """An existing file, else a config packaged in red/configs (name with or without .yaml)."""
    import os
    if os.path.isfile(str(name)):
        return str(name)
    base = os.path.basename(str(name))
    for cand in (base, base + ".yaml"):
        p = default_config_path(cand)
        if p.is_file():
            return p
    raise ConfigError(f"config file {name!r} not found (neither a file nor a packaged config in red/configs)")


def load_config(path=None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (default: the packaged default.yaml), apply overrides, build and validate."""
    data = load_yaml(default_config_path() if path is None else resolve_config_path(path))
    data = apply_overrides(data, list(overrides or []))
    cfg = _build(Config, data)
    validate(cfg)
    return cfg


# ---------------------------------------------------------------------------------------------- validation


def _check(cond, key, msg):
    if not cond:
        raise ConfigError(f"config key '{key}': {msg}")


def _choice(value, key, options):
    _check(value in options, key, f"must be one of {', '.join(map(str, options))}, got {value!r}")


def validate(cfg: Config) -> None:
    a, r, lo, t = cfg.algorithm, cfg.rollout, cfg.loss, cfg.train
    _choice(a.mode, "algorithm.mode", MODES)
    _choice(cfg.model.dtype, "model.dtype", ("float32", "bfloat16", "float16"))
    _choice(cfg.device, "device", ("auto", "cpu", "cuda"))
    _choice(r.engine, "rollout.engine", ("hf", "vllm", "auto"))
    _choice(r.is_correction, "rollout.is_correction", ("none", "tis"))
    _choice(a.adv_stats, "algorithm.adv_stats", ("group", "online"))
    _choice(a.offline_weight, "algorithm.offline_weight", ("entropy_ratio", "fixed"))
    _choice(lo.offline_shaping, "loss.offline_shaping", ("red", "luffy", "none"))
    _choice(lo.loss_agg, "loss.loss_agg", ("seq_sum_const", "token_mean", "seq_mean"))
    _choice(cfg.data.columns, "data.columns", ("auto", "plain", "openr1", "luffy"))
    _choice(cfg.data.overlong_prompt, "data.overlong_prompt", ("reject", "truncate"))
    _choice(cfg.data.overlong_trace, "data.overlong_trace", ("reject", "truncate"))
    _choice(cfg.data.bad_rows, "data.bad_rows", ("error", "skip"))
    _choice(cfg.checkpoint.resume, "checkpoint.resume", ("auto", "never"))
    _check(r.n >= 1, "rollout.n", f"must be >= 1, got {r.n}")
    _check(0 <= r.num_offline <= r.n, "rollout.num_offline", f"must be in [0, rollout.n={r.n}], got {r.num_offline}")
    if a.mode in ("red", "luffy"):
        _check(r.num_offline >= 1, "rollout.num_offline", f"mode {a.mode} needs >= 1 teacher trace per group")
        _check(r.n - r.num_offline >= 1, "rollout.n", f"mode {a.mode} needs >= 1 online sample (n - k >= 1)")
    if a.mode in ("grpo", "sft_then_grpo", "red", "luffy"):
        _check(r.n >= 2, "rollout.n", f"a group needs >= 2 members, got {r.n}")
    if a.mode == "sft_then_grpo":
        _check(0 <= a.sft_steps <= t.steps, "algorithm.sft_steps", f"must be in [0, train.steps], got {a.sft_steps}")
    _check(r.temperature >= 0, "rollout.temperature", f"must be >= 0, got {r.temperature}")
    _check(0 < r.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {r.top_p}")
    _check(r.max_new_tokens >= 1, "rollout.max_new_tokens", f"must be >= 1, got {r.max_new_tokens}")
    _check(r.batch_size >= 1, "rollout.batch_size", f"must be >= 1, got {r.batch_size}")
    _check(r.is_cap >= 1, "rollout.is_cap", f"must be >= 1, got {r.is_cap}")
    _check(a.max_refill >= 0, "algorithm.max_refill", f"must be >= 0, got {a.max_refill}")
    _check(a.w_min > 0, "algorithm.w_min", f"must be > 0, got {a.w_min}")
    if a.w_max is not None:
        _check(a.w_max >= a.w_min, "algorithm.w_max", f"must be >= algorithm.w_min={a.w_min}, got {a.w_max}")
    _check(a.w_eps > 0, "algorithm.w_eps", f"must be > 0, got {a.w_eps}")
    if a.entropy_ema is not None:
        _check(0 <= a.entropy_ema < 1, "algorithm.entropy_ema", f"must be in [0, 1) or null, got {a.entropy_ema}")
    _check(lo.clip_eps_low >= 0 and lo.clip_eps_high >= 0, "loss.clip_eps_low", "clip epsilons must be >= 0")
    if lo.r_min is not None:
        _check(0 < lo.r_min < 0.5, "loss.r_min", f"must be in (0, 0.5), got {lo.r_min}")
    _check(t.steps >= 1, "train.steps", f"must be >= 1, got {t.steps}")
    _check(t.prompts_per_step >= 1, "train.prompts_per_step", f"must be >= 1, got {t.prompts_per_step}")
    _check(t.micro_batch_tokens >= 1, "train.micro_batch_tokens", f"must be >= 1, got {t.micro_batch_tokens}")
    _check(t.ppo_epochs >= 1, "train.ppo_epochs", f"must be >= 1, got {t.ppo_epochs}")
    _check(cfg.optim.lr > 0, "optim.lr", f"must be > 0, got {cfg.optim.lr}")
    _check(len(cfg.optim.betas) == 2 and all(0 <= b < 1 for b in cfg.optim.betas), "optim.betas",
           f"must be two numbers in [0, 1), got {cfg.optim.betas}")
    _check(cfg.optim.grad_clip > 0, "optim.grad_clip", f"must be > 0, got {cfg.optim.grad_clip}")
    _check(0 <= cfg.optim.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1], got {cfg.optim.min_lr_ratio}")
    _check(cfg.data.max_prompt_len >= 1, "data.max_prompt_len", f"must be >= 1, got {cfg.data.max_prompt_len}")
    _check(cfg.eval.n >= 1, "eval.n", f"must be >= 1, got {cfg.eval.n}")
    _check(cfg.eval.every >= 0, "eval.every", f"must be >= 0, got {cfg.eval.every}")
    _check(cfg.checkpoint.keep >= 1, "checkpoint.keep", f"must be >= 1, got {cfg.checkpoint.keep}")
    _check(cfg.checkpoint.every >= 0, "checkpoint.every", f"must be >= 0, got {cfg.checkpoint.every}")
    _check(cfg.reward.workers >= 1, "reward.workers", f"must be >= 1, got {cfg.reward.workers}")
    _check(cfg.reward.overlong_buffer >= 1, "reward.overlong_buffer", "must be >= 1")
    if cfg.warmup.enabled:
        _check(cfg.warmup.steps >= 1, "warmup.steps", f"must be >= 1 when warmup.enabled, got {cfg.warmup.steps}")
        _check(cfg.warmup.data != cfg.data.train, "warmup.data",
               "the warm-up must use a different task distribution than data.train")
    _check("{problem}" in cfg.data.prompt_template, "data.prompt_template", "must contain '{problem}'")


def effective(cfg: Config) -> dict:
    """Mode-dependent settings the trainer uses (what each mode means, in one place)."""
    a, r, lo = cfg.algorithm, cfg.rollout, cfg.loss
    mode = a.mode
    k = r.num_offline if mode in ("red", "luffy", "sft") else 0
    shaping = "luffy" if mode == "luffy" else lo.offline_shaping
    weight = "fixed" if mode == "luffy" else a.offline_weight
    entropy_coef = lo.entropy_coef if lo.entropy_coef is not None else (0.001 if mode == "luffy" else 0.0)
    w_max = a.w_max if a.w_max is not None else float(max(r.n - k, 1))
    r_min = lo.r_min if lo.r_min is not None else 1.0 / (2 * r.n)
    loss_const = lo.loss_const if lo.loss_const is not None else float(r.max_new_tokens)
    return dict(mode=mode, num_offline=k, offline_shaping=shaping, offline_weight=weight,
                entropy_coef=entropy_coef, w_max=max(w_max, a.w_min), r_min=r_min, loss_const=loss_const)
