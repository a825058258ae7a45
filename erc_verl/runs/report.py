"""`erc_verl.report` hook: summarise a run from its metrics JSONL (`erc_verl.runs.metrics`) and plot it."""

import glob
import json
import math
import os

from omegaconf import DictConfig

from erc_verl.runs.metrics import read_steps

REWARD = "critic/score/mean"
ENTROPY = "actor/entropy"
ERC_CLIPFRAC = "actor/erc_clipfrac"
RATIO_MIN, RATIO_MAX, RATIO_MEAN = "actor/entropy_ratio_min", "actor/entropy_ratio_max", "actor/entropy_ratio_mean"
STEP_TIME = "timing_s/step"
PROBS_DIFF_MAX = "training/rollout_probs_diff_max"


def val_accuracy_key(rows: list[tuple[int, dict]]) -> str | None:
    """verl's headline validation metric for the task: ``val-core/<data_source>/acc/mean@<n>``."""
    keys = sorted({k for _, d in rows for k in d if k.startswith("val-core/") and "/acc/mean@" in k})
    return keys[0] if keys else None


def series(rows: list[tuple[int, dict]], key: str) -> tuple[list[int], list[float]]:
    pts = [(s, float(d[key])) for s, d in rows if key in d and d[key] is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def summarize(rows: list[tuple[int, dict]]) -> dict:
    acc_key = val_accuracy_key(rows)
    acc_steps, acc = series(rows, acc_key) if acc_key else ([], [])
    _, step_times = series(rows, STEP_TIME)
    _, diffs = series(rows, PROBS_DIFF_MAX)
    train_steps = [s for s, d in rows if STEP_TIME in d]
    return {
        "val_accuracy_key": acc_key,
        "val_accuracy_before": acc[0] if acc and acc_steps[0] == 0 else None,
        "val_accuracy_after": acc[-1] if acc and acc_steps[-1] > 0 else None,
        "training_steps": len(train_steps),
        "mean_step_seconds": sum(step_times) / len(step_times) if step_times else None,
        "max_rollout_probs_diff": max(diffs) if diffs else None,
    }


def plot(rows: list[tuple[int, dict]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc_key = val_accuracy_key(rows)
    panels = [
        ("reward (train, mean)", [(REWARD, "score")]),
        ("validation accuracy", [(acc_key, acc_key.split("/", 1)[1] if acc_key else "")] if acc_key else []),
        ("policy entropy", [(ENTROPY, "actor/entropy")]),
        (
            "ERC clip fraction",
            [(ERC_CLIPFRAC, "all"), ("actor/erc_clipfrac_low", "low"), ("actor/erc_clipfrac_high", "high")],
        ),
        ("entropy ratio (new / old)", [(RATIO_MIN, "min"), (RATIO_MEAN, "mean"), (RATIO_MAX, "max")]),
    ]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.2 * len(panels)), sharex=True)
    for ax, (title, curves) in zip(axes, panels, strict=True):
        for key, label in curves:
            xs, ys = series(rows, key)
            if xs:
                ax.plot(xs, ys, marker="o", markersize=3, label=label)
        if title.startswith("entropy ratio"):
            xs, lo = series(rows, RATIO_MIN)
            _, hi = series(rows, RATIO_MAX)
            if xs and len(lo) == len(hi):
                ax.fill_between(xs, lo, hi, alpha=0.2)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fmt_duration(seconds: float) -> str:
    """1m05s / 42s."""
    seconds = round(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _fmt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4g}"


def report(cfg: DictConfig) -> dict:
    """Write ``plot.png`` and ``summary.json`` next to the metrics and print where everything is."""
    metrics_path = os.path.abspath(cfg.erc_verl.metrics_file)
    run_dir = os.path.dirname(metrics_path)
    rows = read_steps(metrics_path)
    summary = summarize(rows)
    plot_path = os.path.join(run_dir, "plot.png")
    plot(rows, plot_path)
    ckpt_dir = os.path.abspath(cfg.trainer.default_local_dir)
    summary.update(
        metrics=metrics_path,
        plot=plot_path,
        checkpoints=sorted(glob.glob(os.path.join(ckpt_dir, "global_step_*"))),
    )
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(summary_text(summary, ckpt_dir), flush=True)
    return summary


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def summary_text(summary: dict, ckpt_dir: str) -> str:
    """What the run printed last: validation accuracy before -> after, speed, and where the outputs are."""
    before, after = summary["val_accuracy_before"], summary["val_accuracy_after"]
    gain = f" ({100 * (after - before):+.1f} points)" if before is not None and after is not None else ""
    validation = (
        f"[erc-verl] validation accuracy ({summary['val_accuracy_key']}): {_pct(before)} before -> {_pct(after)} "
        f"after{gain}" if summary["val_accuracy_key"] else "[erc-verl] no validation ran"
    )
    return (
        f"{validation}\n"
        f"[erc-verl] {summary['training_steps']} steps, {_fmt(summary['mean_step_seconds'])} s/step, "
        f"max |p_rollout - p_actor| {_fmt(summary['max_rollout_probs_diff'])}\n"
        f"[erc-verl] every metric, one line per step: {summary['metrics']}\n"
        f"[erc-verl] plot: {summary['plot']}\n"
        f"[erc-verl] checkpoints: {ckpt_dir} ({len(summary['checkpoints'])} saved)"
    )
