"""PNG of a run's dynamics from metrics.jsonl: reward/accuracy, entropies H_on/H_off, offline weight w, response
length, held-out accuracy. `python -m red.plot RUN_DIR` redraws it."""

from __future__ import annotations

import os
import sys

from .metrics import read_metrics


def plot_run(metrics_path: str, out_path: str, title: str = "") -> str | None:
    rows = read_metrics(metrics_path)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        (
            "accuracy",
            [
                ("acc_online", "online acc"),
                ("acc_offline", "teacher acc"),
                ("reward_mean", "reward"),
                ("eval/acc", "held-out acc"),
            ],
        ),
        ("entropy (nats)", [("H_on", "H_on"), ("H_off", "H_off")]),
        ("offline weight", [("w", "w"), ("w_raw_abs", "|w_raw|")]),
        (
            "response length",
            [
                ("len_online_mean", "online mean"),
                ("len_correct_mean", "correct"),
                ("len_wrong_mean", "wrong"),
            ],
        ),
        (
            "groups",
            [
                ("drop_frac_all_correct", "dropped all-correct"),
                ("drop_frac_all_wrong", "dropped all-wrong"),
                ("teacher_prob", "teacher-token prob"),
            ],
        ),
        ("loss", [("loss", "loss"), ("grad_norm", "grad norm")]),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (name, keys) in zip(axes.flat, panels):
        for key, label in keys:
            points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points), marker="o" if key.startswith("eval/") else None, ms=4, label=label)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(title or os.path.dirname(os.path.abspath(metrics_path)))
    fig.tight_layout()
    fig.savefig(out_path, dpi=80)
    plt.close(fig)
    return out_path


if __name__ == "__main__":
    run = sys.argv[1] if len(sys.argv) > 1 else "."
    print(plot_run(os.path.join(run, "metrics.jsonl"), os.path.join(run, "dynamics.png")))
