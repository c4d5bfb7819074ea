"""PNG figures of a comparison: speed, idle time and memory per run; test accuracy per epoch.

matplotlib draws off-screen (Agg), so this works on a headless node.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)


def plot_comparison(result: dict, path: Path) -> Path:
    """Three panels, one above the other: samples/s (bars: medians, whiskers: min and max over repeats), idle fraction
    and peak memory of each stage."""
    runs = result["runs"]
    labels = [r["label"] for r in runs]
    fig, axes = plt.subplots(3, 1, figsize=(max(7.0, 0.6 * len(runs) + 2.0), 12.0), sharex=True)
    speed = [r["samples_per_sec"] for r in runs]
    lo = [s - min(r.get("samples_per_sec_runs", [s])) for s, r in zip(speed, runs)]
    hi = [max(r.get("samples_per_sec_runs", [s])) - s for s, r in zip(speed, runs)]
    colors = ["tab:gray" if r["method"] == "backprop" else "tab:blue" for r in runs]
    axes[0].bar(labels, speed, yerr=[lo, hi], color=colors, capsize=3)
    axes[0].set_ylabel("samples/s (median; whiskers: range)")
    axes[0].set_title("throughput (grey: end-to-end backprop)")
    _per_stage_bars(axes[1], runs, lambda r: r.get("idle_fraction") or [], "idle fraction", (0.0, 1.0))
    _per_stage_bars(axes[2], runs, lambda r: [s["peak_memory_mb"] for s in r.get("stage_stats", [])]
                    or [r["peak_memory_mb"]], "peak memory (MiB)", None)
    for ax in axes:
        ax.tick_params(axis="x", rotation=60)
        for tick in ax.get_xticklabels():
            tick.set_horizontalalignment("right")
    fig.suptitle(f"{result['name']}: {result.get('repeats', 1)} repeat(s)")
    return _save(fig, path)


def _per_stage_bars(ax, runs: list[dict], values, ylabel: str, ylim) -> None:
    per_run = [values(r) for r in runs]
    width = 0.8 / max(1, max(len(v) for v in per_run))
    for k in range(max(len(v) for v in per_run)):
        xs = [i + (k - (len(v) - 1) / 2) * width for i, v in enumerate(per_run) if k < len(v)]
        ys = [v[k] for v in per_run if k < len(v)]
        ax.bar(xs, ys, width=width, label=f"stage {k}")
    ax.set_xticks(range(len(runs)), [r["label"] for r in runs])
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    if any(per_run):  # in-process runs have no per-stage figures: nothing to label
        ax.legend(fontsize="small")


def plot_learning_curves(runs: list[dict], path: Path, title: str) -> Path:
    """Test accuracy after each epoch, one line per run (``test_accuracy_per_epoch`` of its summary)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        acc = r["test_accuracy_per_epoch"]
        ax.plot(range(1, len(acc) + 1), acc, marker="o", markersize=3, label=r["label"])
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)  # readers never see half a figure
    return path


def plot_plan(result: dict, path: Path) -> Path:
    """Predicted samples/s per method; beside each, the measured figure when the plan was validated."""
    rows = result["predictions"]
    measured = {v["label"]: v["measured"] for v in result.get("validation", [])}
    labels = [r["label"] for r in rows]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(7.0, 0.6 * len(rows) + 2.0), 4.5))
    width = 0.4 if measured else 0.8
    ax.bar([x - (width / 2 if measured else 0) for x in xs], [r["samples_per_sec"] for r in rows], width=width,
           label="predicted", color="tab:blue")
    if measured:
        ax.bar([x + width / 2 for x in xs], [measured.get(lbl, 0.0) for lbl in labels], width=width,
               label="measured (median)", color="tab:orange")
    ax.set_xticks(list(xs), labels, rotation=60, ha="right")
    ax.set_ylabel("samples/s")
    ax.set_title(f"{result['workers']} workers: {result['device']}", fontsize="small")
    ax.legend()
    return _save(fig, path)
