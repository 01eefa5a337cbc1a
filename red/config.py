"""Training configuration: a typed dataclass schema; loading, merging, `a.b=c` overrides and `${...}`
interpolation by OmegaConf (structured configs); value checks here.

Every error names the full key and, for choices, the allowed values
(e.g. `config key 'rollout.engine': must be one of hf, vllm, auto, got 'tgi'`).
`red.eval` reuses `DataConfig`; `red.compare` runs `python -m red.train` with dotted overrides.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import os
from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from red_kernels.policy_loss import AGGREGATIONS, SHAPINGS, canonical_shaping

from .algorithm import OFFLINE_WEIGHTS, TEACHER_ONLY_CHOICES
from .data import COLUMN_LAYOUTS
from .errors import ConfigError
from .modes import MODES
from .rollout.factory import ENGINES


@dataclass
class ModelConfig:
    path: str | None = None  # HF directory or hub id; None -> build the tiny synthetic model
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 | float16 (master weights stay fp32)
    config_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {rope_theta: 40000}
    gradient_checkpointing: bool = False
    lean_layers: bool = (
        True  # RMSNorm / SwiGLU that save less for the backward (red/lean_layers.py), same math
    )
    tiny: dict[str, Any] = field(default_factory=dict)  # Qwen2Config kwargs for the synthetic model
    attn_implementation: str = "auto"  # auto: red/attention.py picks by device; or any HF name


@dataclass
class DataConfig:
    train: str = "synthetic:chains"  # file (.jsonl/.parquet) or synthetic:<task>
    eval: list[str] = field(default_factory=lambda: ["synthetic:chains"])
    # eval.split=validation evaluates these (tuning); null -> data.eval's synthetic tasks on their validation
    # split (a file in data.eval has no validation split: list validation files here)
    validation: list[str] | None = None
    columns: str = "auto"  # COLUMN_LAYOUTS of red/data.py
    problem_key: str | None = None  # explicit column names override the preset
    answer_key: str | None = None
    trace_key: str | None = None
    system_prompt: str | None = None
    eos_token: str | None = None  # token ending teacher traces; None: <|im_end|> for ChatML, else EOS
    prompt_template: str = "{problem}"
    max_prompt_len: int = 1024
    overlong_prompt: str = "reject"  # reject | truncate (keep the last tokens)
    overlong_trace: str = "reject"  # reject | truncate (keep the first tokens; loses EOS)
    bad_rows: str = "error"  # error | skip (skipped rows are reported by row number)
    shuffle: bool = True
    eval_limit: int | None = None  # rows per eval file (None = all)
    synthetic_train_size: int = 20000
    synthetic_eval_size: int = 200


@dataclass
class RolloutConfig:
    engine: str = "hf"  # ENGINES of red/rollout/factory.py
    n: int = 8  # group size (online + offline)
    num_offline: int = 1  # k teacher traces per group
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 1024
    batch_size: int = 256  # max sequences per generate call
    is_correction: str = "none"  # none | tis (truncated importance sampling on online tokens)
    is_cap: float = 2.0
    vllm: dict[str, Any] = field(default_factory=dict)  # passed to the vLLM engine


@dataclass
class RewardConfig:
    format_reward: float = 0.0  # added when a \boxed{} answer is present
    overlong_penalty: bool = False
    overlong_buffer: int = 256  # B of the soft overlong penalty; L_max = rollout.max_new_tokens
    workers: int = 2
    timeout_s: float = 10.0
    fn: str | None = None  # package.module:callable, a user reward instead of math-verify (red/rewards.py)


@dataclass
class AlgorithmConfig:
    mode: str = "red"  # MODES of red/modes.py
    adv_std: bool = True
    adv_stats: str = "group"  # group | online
    dynamic_sampling: bool = True
    max_refill: int = 3
    offline_weight: str = "entropy_ratio"  # OFFLINE_WEIGHTS of red/algorithm.py
    w_min: float = 1.0
    w_max: float | None = None  # None -> n - k
    w_eps: float = 1e-8
    entropy_ema: float | None = None  # None: off; alpha in [0, 1): H~ = alpha H~_prev + (1-alpha) H
    sft_steps: int | None = None  # sft_then_grpo: SFT steps before GRPO (None -> train.steps // 2)
    teacher_only_groups: str = "auto"  # auto (the mode's, red/modes.py) | keep | zero_online | drop


@dataclass
class LossConfig:
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.28
    dual_clip: float | None = None
    offline_shaping: str = "accuracy_shift"  # SHAPINGS of red_kernels/policy_loss.py ('red': old name)
    shaping_gamma: float = 0.1
    r_min: float | None = None  # None -> 1 / (2n)
    sft_coef: float = 0.0
    entropy_coef: float | None = None  # None -> mode default (luffy 0.001, else 0)
    kl_coef: float = 0.0
    loss_agg: str = "seq_sum_const"  # AGGREGATIONS of red_kernels/policy_loss.py
    loss_const: float | None = None  # None -> rollout.max_new_tokens


@dataclass
class OptimConfig:
    lr: float = 1e-6
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1


@dataclass
class TrainConfig:
    steps: int = 100
    prompts_per_step: int = 64  # groups per optimizer step (whole batch, all ranks)
    micro_batch_tokens: int = 16384  # tokens (padding included) per forward/backward
    packing: bool = True  # pack sequences into rows (no padding) where the attention supports it
    share_prompts: bool = True  # packed with sdpa/eager: a group's prompt runs once per micro-batch
    release_host_memory: bool = (
        True  # CPU: free heap pages back to the OS per micro-batch (red/host_memory.py)
    )
    ppo_epochs: int = 1
    parallel: str = "ddp"  # ddp | fsdp2 (world size 1: no wrapper)
    max_nonfinite_steps: int = 3  # this many steps in a row with a non-finite loss/gradient stop the run


@dataclass
class SFTConfig:
    """The SFT phase of modes sft and sft_then_grpo: its own optimizer and schedule (tuned like any method)."""

    lr: float | None = None  # None -> optim.lr
    warmup_steps: int = 0
    min_lr_ratio: float | None = None  # None -> optim.min_lr_ratio


@dataclass
class WarmupConfig:
    """Optional SFT stage that turns a random model into a 'pretrained base' (synthetic default only)."""

    enabled: bool = False
    data: str = "synthetic:chains_warmup"
    steps: int = 0
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 10
    path: str | None = None  # None -> output_dir/warmup; a finished warm-up there is loaded, not rerun


@dataclass
class EvalConfig:
    every: int = 0  # 0: only before and after training
    n: int = 1  # samples per problem (avg@n, pass@k)
    temperature: float = 0.0  # 0 = greedy
    max_new_tokens: int | None = None  # None -> rollout.max_new_tokens
    before: bool = True
    split: str = (
        "heldout"  # heldout (final numbers) | validation (tuning: data.validation, disjoint problems)
    )


@dataclass
class LogConfig:
    tensorboard: bool = False  # same as listing tensorboard in report_to
    report_to: list[str] = field(default_factory=list)  # trackers beside metrics.jsonl: tensorboard, wandb
    progress: bool = True
    samples_every: int = 10
    samples_max: int = 4
    plot: bool = True
    truncation_warn: float = 0.2  # warn when this fraction of online samples hits max_new_tokens


@dataclass
class CheckpointConfig:
    every: int = 0  # 0: only at the end
    keep: int = 2
    resume: str = "auto"  # auto | never
    # config keys (or whole sections) a resume may change, e.g. [optim.lr, train.steps] (red/drift.py)
    allow_changes: list[str] = field(default_factory=list)


@dataclass
class Config:
    seed: int = 0
    output_dir: str = "runs/red"
    device: str = "auto"  # auto | cpu | cuda
    threads: int | None = None  # torch CPU threads (None: torch default)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def eval_max_new_tokens(self) -> int:
        """The held-out evaluation's generation budget: eval.max_new_tokens, or rollout.max_new_tokens when null."""
        return self.eval.max_new_tokens or self.rollout.max_new_tokens


SECTIONS = {f.name for f in dataclasses.fields(Config) if f.default_factory is not dataclasses.MISSING}


def flatten(d: dict, prefix: str = "") -> dict:
    """{"optim": {"lr": 1}} -> {"optim.lr": 1}; a mapping value inside a section (e.g. model.tiny) stays one
    value."""
    out = {}
    for k, v in d.items():
        if not prefix and k in SECTIONS and isinstance(v, dict):
            out.update(flatten(v, k + "."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ---------------------------------------------------------------------------------------------- loading


def _known(node) -> str:
    return ", ".join(sorted(node.keys())) if hasattr(node, "keys") else ""


def _error(e: OmegaConfBaseException, schema) -> ConfigError:
    key = getattr(e, "full_key", None) or "?"
    msg = str(e).split("\n")[0]
    if type(e).__name__ == "ConfigKeyError":
        parent = OmegaConf.select(schema, key.rpartition(".")[0]) if "." in key else schema
        return ConfigError(f"config key '{key}': unknown key (known: {_known(parent)})")
    return ConfigError(f"config key '{key}': {msg}")


def _as_lists(data: dict, cls=Config) -> dict:
    """A scalar given for a list key (`data.eval=file.jsonl`) means a list of one."""
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        v = data[f.name]
        if dataclasses.is_dataclass(
            f.default_factory if f.default_factory is not dataclasses.MISSING else None
        ):
            if isinstance(v, dict):
                _as_lists(v, f.default_factory)
        elif str(f.type).lower().startswith("list") and v is not None and not isinstance(v, list):
            data[f.name] = [v]
    return data


def parse_overrides(overrides: list[str]) -> dict:
    """`a.b=c` strings -> a nested dict (values by OmegaConf's YAML rules: 1e-6, true, null, [a, b], {k: v})."""
    out = OmegaConf.create()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. train.steps=10)")
        key, value = item.split("=", 1)
        key = key.strip().removeprefix("--")
        try:
            out = OmegaConf.merge(out, OmegaConf.from_dotlist([f"{key}={value}"]))
        except Exception:  # not YAML, e.g. a prompt template with braces: the text itself
            OmegaConf.update(out, key, value, merge=True)
    return OmegaConf.to_container(out)


def resolve_config_path(name) -> str:
    """An existing file, else, for a bare name (no directory part), a config packaged in red/configs (with or
    without .yaml). A path with a directory that does not exist is an error, never a packaged namesake."""
    if os.path.isfile(str(name)):
        return str(name)
    if os.path.dirname(str(name)):
        kind = "is a directory, not a YAML file" if os.path.isdir(str(name)) else "does not exist"
        raise ConfigError(
            f"config file {name!r} {kind}; give an existing YAML file, or a bare name for a packaged config "
            f"(e.g. --config default)"
        )
    base = os.path.basename(str(name))
    for cand in (base, base + ".yaml"):
        p = importlib.resources.files("red").joinpath("configs", cand)
        if p.is_file():
            return str(p)
    raise ConfigError(f"config file {name!r} not found (neither a file nor a packaged config in red/configs)")


def load_yaml(path) -> dict:
    try:
        data = OmegaConf.to_container(OmegaConf.load(path))
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except Exception as e:  # yaml.YAMLError (with the position) and OmegaConf's own
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        ctx, cm = getattr(e, "context", None), getattr(e, "context_mark", None)
        if ctx and cm is not None and mark is not cm:
            what += f", {ctx} at line {cm.line + 1}"
        raise ConfigError(
            f"config file {path}: not valid YAML{where} ({what}); fix the syntax there"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping")
    return data


def load_config(path=None, overrides: list[str] | None = None) -> Config:
    """The schema's defaults, merged with a YAML file (default: red/configs/default.yaml) and the overrides."""
    path = resolve_config_path(path or "default.yaml")
    schema = OmegaConf.structured(Config)
    layers = [_as_lists(load_yaml(path)), _as_lists(parse_overrides(list(overrides or [])))]
    try:
        merged = OmegaConf.merge(schema, *layers)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise _error(e, schema) from None
    validate(cfg)
    return cfg


# ---------------------------------------------------------------------------------------------- validation


def _check(cond, key, msg):
    if not cond:
        raise ConfigError(f"config key '{key}': {msg}")


CHOICES = {
    "algorithm.mode": MODES,  # the table itself: a row added there is a valid choice
    "model.dtype": ("float32", "bfloat16", "float16"),
    "device": ("auto", "cpu", "cuda"),
    "rollout.engine": ENGINES,
    "rollout.is_correction": ("none", "tis"),
    "algorithm.adv_stats": ("group", "online"),
    "algorithm.teacher_only_groups": ("auto", *TEACHER_ONLY_CHOICES),
    "algorithm.offline_weight": OFFLINE_WEIGHTS,
    "loss.offline_shaping": SHAPINGS,
    "loss.loss_agg": AGGREGATIONS,
    "data.columns": COLUMN_LAYOUTS,
    "data.overlong_prompt": ("reject", "truncate"),
    "data.overlong_trace": ("reject", "truncate"),
    "data.bad_rows": ("error", "skip"),
    "checkpoint.resume": ("auto", "never"),
    "eval.split": ("heldout", "validation"),
    "train.parallel": ("ddp", "fsdp2"),
}

INF = math.inf

# Every numeric key's range: key -> (low, high, low_open, high_open) (None: unbounded). Null values (keys whose
# null means "derived", e.g. eval.max_new_tokens) are not checked; every float must be finite. Checked when the
# config loads, before any model or data.
RANGES: dict[str, tuple] = {
    "seed": (0, None, False, False),
    "threads": (1, None, False, False),
    "data.max_prompt_len": (1, None, False, False),
    "data.eval_limit": (1, None, False, False),
    "data.synthetic_train_size": (1, None, False, False),
    "data.synthetic_eval_size": (1, None, False, False),
    "rollout.n": (1, None, False, False),
    "rollout.num_offline": (0, None, False, False),
    "rollout.temperature": (0, None, False, False),
    "rollout.top_p": (0, 1, True, False),
    "rollout.max_new_tokens": (1, None, False, False),
    "rollout.batch_size": (1, None, False, False),
    "rollout.is_cap": (1, None, False, False),
    "reward.format_reward": (None, None, False, False),
    "reward.overlong_buffer": (1, None, False, False),
    "reward.workers": (1, None, False, False),
    "reward.timeout_s": (0, None, True, False),
    "algorithm.max_refill": (0, None, False, False),
    "algorithm.w_min": (0, None, True, False),
    "algorithm.w_max": (0, None, True, False),
    "algorithm.w_eps": (0, None, True, False),
    "algorithm.entropy_ema": (0, 1, False, True),
    "algorithm.sft_steps": (0, None, False, False),
    "loss.clip_eps_low": (0, None, False, False),
    "loss.clip_eps_high": (0, None, False, False),
    "loss.dual_clip": (1, None, True, False),
    "loss.shaping_gamma": (0, None, True, False),
    "loss.r_min": (0, 0.5, True, True),
    "loss.sft_coef": (0, None, False, False),
    "loss.entropy_coef": (None, None, False, False),
    "loss.kl_coef": (0, None, False, False),
    "loss.loss_const": (0, None, True, False),
    "optim.lr": (0, None, True, False),
    "optim.weight_decay": (0, None, False, False),
    "optim.grad_clip": (0, None, True, False),
    "optim.warmup_steps": (0, None, False, False),
    "optim.min_lr_ratio": (0, 1, False, False),
    "train.steps": (1, None, False, False),
    "train.prompts_per_step": (1, None, False, False),
    "train.micro_batch_tokens": (1, None, False, False),
    "train.ppo_epochs": (1, None, False, False),
    "train.max_nonfinite_steps": (1, None, False, False),
    "sft.lr": (0, None, True, False),
    "sft.warmup_steps": (0, None, False, False),
    "sft.min_lr_ratio": (0, 1, False, False),
    "warmup.steps": (0, None, False, False),
    "warmup.batch_size": (1, None, False, False),
    "warmup.lr": (0, None, True, False),
    "warmup.warmup_steps": (0, None, False, False),
    "eval.every": (0, None, False, False),
    "eval.n": (1, None, False, False),
    "eval.temperature": (0, None, False, False),
    "eval.max_new_tokens": (1, None, False, False),
    "log.samples_every": (0, None, False, False),
    "log.samples_max": (0, None, False, False),
    "log.truncation_warn": (0, 1, False, False),
    "checkpoint.every": (0, None, False, False),
    "checkpoint.keep": (1, None, False, False),
}


def range_text(low, high, low_open, high_open) -> str:
    """(0, 1, True, False) -> "in (0, 1]"; (1, None, False, False) -> ">= 1"; no bounds -> "finite"."""
    if low is None and high is None:
        return "finite"
    if high is None:
        return f"{'>' if low_open else '>='} {low}"
    if low is None:
        return f"{'<' if high_open else '<='} {high}"
    return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def in_range(v, low, high, low_open, high_open) -> bool:
    if isinstance(v, float) and not math.isfinite(v):
        return False
    return (low is None or (v > low if low_open else v >= low)) and (
        high is None or (v < high if high_open else v <= high)
    )


def _get(cfg, key):
    for p in key.split("."):
        cfg = getattr(cfg, p)
    return cfg


def validate(cfg: Config) -> None:
    cfg.loss.offline_shaping = canonical_shaping(
        cfg.loss.offline_shaping, "config key 'loss.offline_shaping'"
    )
    for key, options in CHOICES.items():
        v = _get(cfg, key)
        _check(v in options, key, f"must be one of {', '.join(options)}, got {v!r}")
    for key, spec in RANGES.items():
        v = _get(cfg, key)
        if v is not None:
            _check(in_range(v, *spec), key, f"must be {range_text(*spec)}, got {v}")
    a, r, o = cfg.algorithm, cfg.rollout, cfg.optim
    _check(
        r.num_offline <= r.n, "rollout.num_offline", f"must be in [0, rollout.n={r.n}], got {r.num_offline}"
    )
    if a.w_max is not None:
        _check(a.w_max >= a.w_min, "algorithm.w_max", f"must be >= algorithm.w_min={a.w_min}, got {a.w_max}")
    _check(
        len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
        "optim.betas",
        f"must be two numbers in [0, 1), got {o.betas}",
    )
    if cfg.warmup.enabled:
        _check(
            cfg.warmup.steps >= 1, "warmup.steps", f"must be >= 1 when warmup.enabled, got {cfg.warmup.steps}"
        )
        _check(
            cfg.warmup.data != cfg.data.train,
            "warmup.data",
            "the warm-up must use a different task distribution than data.train",
        )
    keys = set(flatten(Config().to_dict()))
    for name in cfg.checkpoint.allow_changes:
        _check(
            name in keys or name in SECTIONS,
            "checkpoint.allow_changes",
            f"{name!r} is not a config key or section (e.g. optim.lr, train.steps, eval)",
        )
    if cfg.eval.split == "validation" and cfg.data.validation is None:
        files = [s for s in cfg.data.eval if not s.startswith("synthetic:")]
        _check(
            not files,
            "data.validation",
            f"eval.split=validation needs validation files for {files} (a file has no validation split; "
            "list files disjoint from the held-out ones)",
        )
    _check("{problem}" in cfg.data.prompt_template, "data.prompt_template", "must contain '{problem}'")
    for name in cfg.log.report_to:
        _check(
            name in ("tensorboard", "wandb"),
            "log.report_to",
            f"must list tensorboard and/or wandb, got {name!r}",
        )
    MODES[a.mode].check(cfg, _check)
