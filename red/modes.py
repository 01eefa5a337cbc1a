"""The one mode table: everything a mode means, and the run plan (stages of one loop) built from it.

| mode          | phases                     | teacher traces | offline shaping          | w               | entropy bonus |
|---------------|----------------------------|----------------|--------------------------|-----------------|---------------|
| red           | RL                         | rollout.num_offline | loss.offline_shaping (accuracy_shift) | algorithm.offline_weight | loss.entropy_coef (0) |
| luffy         | RL                         | rollout.num_offline | luffy                    | fixed (w = 1)   | 0.001 unless set |
| grpo          | RL                         | 0              | -                        | -               | loss.entropy_coef (0) |
| sft           | SFT                        | max(k, 1) per prompt, NLL only                                              |
| sft_then_grpo | SFT for algorithm.sft_steps (default train.steps // 2), then grpo, each its own optimizer |

The SFT phase of `sft` and `sft_then_grpo` has its own learning rate and schedule (config section `sft`: lr,
warmup_steps, min_lr_ratio; nulls fall back to `optim`), so the SFT baselines are tuned like every method.

A run is a list of stages run by the same loop (red/loop.py): the optional warm-up (SFT on `warmup.data`, its
own optimizer, saved to output_dir/warmup/) and the main stage (eval, checkpoints, metrics.jsonl).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from red_kernels.policy_loss import SHAPINGS

from .algorithm import OFFLINE_WEIGHTS


@dataclass(frozen=True)
class Mode:
    kind: str  # 'rl' | 'sft' | 'sft_then_rl'
    teacher: bool = False  # teacher traces inside the RL groups
    shaping: str | None = None  # forced offline shaping (None: loss.offline_shaping)
    offline_weight: str | None = None  # forced w policy (None: algorithm.offline_weight)
    entropy_coef: float = 0.0  # entropy bonus when loss.entropy_coef is null
    then: str | None = None  # the RL mode after the SFT phase
    teacher_only_groups: str = (
        "zero_online"  # algorithm.teacher_only_groups=auto (validation choice, issue 22)
    )

    def __post_init__(self):
        if self.shaping is not None and self.shaping not in SHAPINGS:
            raise ValueError(f"Mode.shaping must be one of {SHAPINGS} (red_kernels/policy_loss.py)")
        if self.offline_weight is not None and self.offline_weight not in OFFLINE_WEIGHTS:
            raise ValueError(f"Mode.offline_weight must be one of {OFFLINE_WEIGHTS} (red/algorithm.py)")

    def check(self, cfg, check) -> None:
        """Mode-specific config checks; `check(cond, key, msg)` raises the config error."""
        r, name = cfg.rollout, cfg.algorithm.mode
        if self.teacher:
            check(
                r.num_offline >= 1, "rollout.num_offline", f"mode {name} needs >= 1 teacher trace per group"
            )
            check(r.n - r.num_offline >= 1, "rollout.n", f"mode {name} needs >= 1 online sample (n - k >= 1)")
        if self.kind != "sft":
            check(r.n >= 2, "rollout.n", f"a group needs >= 2 members, got {r.n}")
            check(
                r.temperature > 0 or not cfg.algorithm.dynamic_sampling,
                "rollout.temperature",
                f"mode {name} samples rollout.n answers per prompt; at temperature 0 (greedy) they are all the "
                f"same, no group has any reward spread and dynamic sampling drops every one: use > 0 (e.g. 1.0), "
                f"or algorithm.dynamic_sampling=false for a deterministic test run",
            )
        if self.kind == "sft_then_rl":
            s, total = cfg.algorithm.sft_steps, cfg.train.steps
            check(
                s is None or 1 <= s <= total,
                "algorithm.sft_steps",
                f"mode {name} needs an SFT phase of 1..train.steps={total} steps (default train.steps // 2), got {s}",
            )


MODES: dict[str, Mode] = {
    "red": Mode("rl", teacher=True),
    "luffy": Mode(
        "rl",
        teacher=True,
        shaping="luffy",
        offline_weight="fixed",
        entropy_coef=0.001,
        teacher_only_groups="keep",
    ),
    "grpo": Mode("rl"),
    "sft": Mode("sft"),
    "sft_then_grpo": Mode("sft_then_rl", then="grpo"),
}


@dataclass(frozen=True)
class Schedule:
    """Learning rate of one optimizer: peak lr, linear warm-up steps, cosine decay to min_lr_ratio x lr."""

    lr: float
    warmup_steps: int
    min_lr_ratio: float


@dataclass(frozen=True)
class Phase:
    """Consecutive steps of one leaf mode ('sft', 'grpo', 'luffy', 'red'); k = teacher traces per prompt.
    schedule: the phase's own optimizer and schedule (the SFT phase of sft / sft_then_grpo, from the `sft`
    section); None: the stage's (optim.*). A phase with its own schedule starts a fresh optimizer, and so does
    the phase after it."""

    mode: str
    steps: int
    k: int
    schedule: Schedule | None = None


@dataclass(frozen=True)
class Stage:
    """Steps sharing one optimizer, LR schedule and prompt stream."""

    name: str
    data: str
    phases: tuple
    prompts_per_step: int
    lr: float
    warmup_steps: int
    min_lr_ratio: float
    weight_decay: float
    seed: int
    main: bool  # eval / checkpoint cadence, metrics.jsonl, summary

    @property
    def steps(self) -> int:
        return sum(p.steps for p in self.phases)

    def phase_at(self, step: int) -> Phase:
        return self.phases[self.phase_index(step)]

    def phase_index(self, step: int) -> int:
        """Index of the phase that runs step `step` (0-based; past the end: the last phase)."""
        for i, p in enumerate(self.phases):
            if step < p.steps:
                return i
            step -= p.steps
        return len(self.phases) - 1

    def schedule_of(self, i: int) -> Schedule:
        """Phase i's schedule (its own, else the stage's)."""
        own = self.phases[i].schedule
        return own or Schedule(self.lr, self.warmup_steps, self.min_lr_ratio)

    def optimizer_span(self, i: int) -> int:
        """Steps of the optimizer phase i belongs to: the phase's own when any phase has its own schedule,
        else the whole stage (one optimizer)."""
        return self.phases[i].steps if any(p.schedule for p in self.phases) else self.steps


def sft_steps(cfg) -> int:
    s = cfg.algorithm.sft_steps
    return max(cfg.train.steps // 2, 1) if s is None else s


def sft_schedule(cfg) -> Schedule:
    """The SFT phase's schedule (sft and sft_then_grpo): the `sft` section, its nulls taken from `optim`."""
    s, o = cfg.sft, cfg.optim
    return Schedule(
        o.lr if s.lr is None else s.lr,
        s.warmup_steps,
        o.min_lr_ratio if s.min_lr_ratio is None else s.min_lr_ratio,
    )


def phases(cfg) -> tuple:
    name, r = cfg.algorithm.mode, cfg.rollout
    mode = MODES[name]
    if mode.kind == "sft":
        return (Phase("sft", cfg.train.steps, max(r.num_offline, 1), sft_schedule(cfg)),)
    if mode.kind == "sft_then_rl":
        s = sft_steps(cfg)
        return (
            Phase("sft", s, max(r.num_offline, 1), sft_schedule(cfg)),
            Phase(mode.then, cfg.train.steps - s, 0),
        )
    return (Phase(name, cfg.train.steps, r.num_offline if mode.teacher else 0),)


def plan(cfg) -> list[Stage]:
    """The stages of a run, in order."""
    o, w = cfg.optim, cfg.warmup
    main = Stage(
        cfg.algorithm.mode,
        cfg.data.train,
        phases(cfg),
        cfg.train.prompts_per_step,
        o.lr,
        o.warmup_steps,
        o.min_lr_ratio,
        o.weight_decay,
        cfg.seed,
        main=True,
    )
    if not w.enabled:
        return [main]
    return [
        Stage(
            "warm-up",
            w.data,
            (Phase("sft", w.steps, 1),),
            w.batch_size,
            w.lr,
            w.warmup_steps,
            0.1,
            0.0,
            cfg.seed + 1,
            main=False,
        ),
        main,
    ]


def teacher_only_groups(cfg, mode: str) -> str:
    """algorithm.teacher_only_groups of a leaf mode: the key, or with 'auto' the mode's validation-chosen default
    (red: zero_online, luffy: keep; experiments/embedded/sweep_teacher_only.md)."""
    v = cfg.algorithm.teacher_only_groups
    return MODES[mode].teacher_only_groups if v == "auto" else v


def uses_traces(cfg) -> bool:
    return any(p.k > 0 for p in phases(cfg))


def loss_config(cfg, mode: str):
    """red_kernels.REDLossConfig of a leaf mode, from the `loss` section (fields by name) and the mode table."""
    from red_kernels import REDLossConfig

    if MODES[mode].kind == "sft":
        return REDLossConfig(offline_shaping="none", sft_coef=1.0, loss_agg="token_mean", temperature=1.0)
    m, lo, r = MODES[mode], cfg.loss, cfg.rollout
    kw = {f.name: getattr(lo, f.name) for f in dataclasses.fields(REDLossConfig) if hasattr(lo, f.name)}
    kw.update(
        offline_shaping=m.shaping or lo.offline_shaping,
        entropy_coef=m.entropy_coef if lo.entropy_coef is None else lo.entropy_coef,
        r_min=1.0 / (2 * r.n) if lo.r_min is None else lo.r_min,
        loss_const=float(r.max_new_tokens) if lo.loss_const is None else lo.loss_const,
        temperature=r.temperature if r.temperature > 0 else 1.0,
    )
    return REDLossConfig(**kw)


def offline_weight_settings(cfg, mode: str, k: int) -> dict:
    """Keyword arguments of algorithm.EntropyRatioWeight for a leaf mode."""
    a, m = cfg.algorithm, MODES[mode]
    w_max = a.w_max if a.w_max is not None else float(max(cfg.rollout.n - k, 1))
    return dict(
        w_min=a.w_min,
        w_max=max(w_max, a.w_min),
        eps=a.w_eps,
        ema=a.entropy_ema,
        fixed=(m.offline_weight or a.offline_weight) == "fixed",
    )
