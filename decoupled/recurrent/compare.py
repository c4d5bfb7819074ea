"""Truncated BPTT against truncated BPTT + synthetic gradients, over truncation windows (DNI paper, Table 1 / Fig. 3).

``compare(config, truncations, methods)`` runs every (T, method[, seed]) of the grid from one base config
and reports, per cell, the longest sequence length learned (copy, repeat copy: the curriculum's last
passed length) or the best validation bits per character (text). Writes ``comparison.json``,
``comparison.md`` and ``comparison.png`` in one parent directory, with a run directory per cell.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from ..config import ConfigError
from ..metrics import write_json_atomic
from .config import (
    METHODS,
    TRUNCATIONS,
    RecurrentDNIMethod,
    SequenceConfig,
    as_sequence_config,
    build_sequence_config,
)
from .tbptt import new_run_dir, run

__all__ = ["METHODS", "TRUNCATIONS", "compare", "run"]


def _method(cfg: SequenceConfig, key: str) -> dict:
    """The method section for ``key``; dni variants keep the base config's predictor settings."""
    if key not in METHODS:
        raise ConfigError(f"--methods: unknown method {key!r}; expected some of: {', '.join(METHODS)}")
    if key == "tbptt":
        return {"name": "tbptt"}
    base = cfg.method.model_dump(mode="json") if isinstance(cfg.method, RecurrentDNIMethod) else {"name": "dni"}
    return {**base, "aux_future_gradient": key == "dni+aux"}


def metric_of(task: str) -> tuple[str, str, bool]:
    """(summary key, description, higher is better) of the figure a comparison reports."""
    if task == "text":
        return "best_val_bits_per_char", "best validation bits per character", False
    return "max_length_learned", "longest sequence length learned", True


def compare(
    config: SequenceConfig | dict,
    truncations: tuple[int, ...] | list[int] = TRUNCATIONS,
    methods: tuple[str, ...] | list[str] = METHODS,
    seeds: list[int] | None = None,
    parent: Path | None = None,
    jobs: int = 1,
) -> dict:
    """Every (T, method, seed) of the grid, interleaved so that a machine slowing down slows all methods alike.

    ``jobs`` > 1 runs that many cells at once, each in its own process (the runs are independent; each
    uses ``train.threads`` threads, so ``jobs * threads`` should not exceed the cores).
    """
    cfg = as_sequence_config(config)
    if jobs < 1:
        raise ConfigError(f"--jobs: must be >= 1, got {jobs}")
    seeds = list(seeds) if seeds else [cfg.train.seed]
    if not truncations or not methods:
        raise ConfigError("--truncations/--methods: the grid is empty")
    grid = []
    for t in truncations:
        for key in methods:
            for seed in seeds:
                data = cfg.model_dump(mode="json")
                data.update(truncation=t, method=_method(cfg, key))
                data["train"]["seed"] = seed
                grid.append((key, t, seed, build_sequence_config(data)))  # all validated before the first run
    parent = Path(parent) if parent is not None else new_run_dir(cfg.output.dir, f"{cfg.name}-compare")
    parent.mkdir(parents=True, exist_ok=True)
    cells = [(run_cfg, parent / f"{key.replace('+', '_')}-T{t}" / (f"seed-{seed}" if len(seeds) > 1 else ""))
             for key, t, seed, run_cfg in grid]
    runs = _run_cells(cells, jobs, cfg.train.progress, metric_of(cfg.task.name)[0])
    result = {"name": cfg.name, "task": cfg.task.name, "parent": str(parent), "truncations": list(truncations),
              "methods": list(methods), "seeds": seeds, "steps_budget": cfg.train.steps, "runs": runs}
    result["table"] = comparison_table(result, cfg)
    result["plot"] = str(plot_comparison(result, parent / "comparison.png"))
    write_json_atomic(parent / "comparison.json", result)
    (parent / "comparison.md").write_text(f"# {cfg.name}: truncated BPTT vs synthetic gradients\n\n{result['table']}")
    return result


def _run_cells(cells: list[tuple[SequenceConfig, Path]], jobs: int, progress: bool, key_name: str) -> list[dict]:
    """Each cell's summary, in grid order; ``jobs`` > 1: in a pool of fresh (spawned) processes."""

    def report(summary: dict) -> None:
        if progress:
            print(f"== {summary['method']} T={summary['truncation']} seed {summary['seed']}: {key_name} "
                  f"{summary[key_name]}, {summary['steps']} steps, {summary['wall_seconds']:.0f} s",
                  file=sys.stderr, flush=True)

    if jobs == 1 or len(cells) == 1:
        runs = []
        for run_cfg, run_dir in cells:
            runs.append(run(run_cfg, run_dir))
            report(runs[-1])
        return runs
    import multiprocessing
    import signal
    import threading

    runs: list[dict | None] = [None] * len(cells)
    # spawn: a forked child would inherit this process's torch thread pools and locks. A TERM sent to
    # this process alone must not leave the workers training on: it exits through the pool, which ends them.
    main = threading.current_thread() is threading.main_thread()  # only there can a handler be set
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143)) if main else None
    try:
        with multiprocessing.get_context("spawn").Pool(min(jobs, len(cells))) as pool:  # leaving it ends the workers
            jobs_in = [(i, run_cfg, run_dir) for i, (run_cfg, run_dir) in enumerate(cells)]
            for i, summary in pool.imap_unordered(_run_cell, jobs_in):  # a failed cell raises here
                runs[i] = summary
                report(summary)
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
    return runs


def _run_cell(job: tuple[int, SequenceConfig, Path]) -> tuple[int, dict]:
    i, run_cfg, run_dir = job
    return i, run(run_cfg, run_dir)


def _cell(result: dict, key: str, t: int) -> list[float]:
    name = metric_of(result["task"])[0]
    return [r[name] for r in result["runs"] if r["method"] == key and r["truncation"] == t]


def comparison_table(result: dict, cfg: SequenceConfig) -> str:
    """Markdown: one row per method, one column per T; a cell is the median over seeds (each seed's value after)."""
    _, what, _ = metric_of(result["task"])
    fmt = "{:.3f}" if result["task"] == "text" else "{:.0f}"
    head = ["method"] + [f"T = {t}" for t in result["truncations"]]
    lines = [f"{what} ({cfg.model.name} {cfg.model.hidden}, at most {cfg.train.steps} batches of "
             f"{cfg.train.batch_size}; seeds {', '.join(map(str, result['seeds']))})", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in result["methods"]:
        cells = [key]
        for t in result["truncations"]:
            values = _cell(result, key, t)
            text = fmt.format(statistics.median(values))
            if len(values) > 1:
                text += " (" + ", ".join(fmt.format(v) for v in values) + ")"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    if result["task"] != "text":
        # progress the length alone hides: two runs stuck at the same length may be far apart in loss
        lines += ["", "evaluation bits per output step at the run's last length (that length in brackets; "
                  "comparable between cells at the same length)", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for key in result["methods"]:
            cells = [key]
            for t in result["truncations"]:
                runs = [r for r in result["runs"] if r["method"] == key and r["truncation"] == t]
                cells.append(", ".join(f"{r['final_eval_bits_per_step']:.2f} ({r['curriculum']['length']})"
                                       for r in runs))
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", f"Curriculum: lengths {cfg.task.curriculum.start_length}..{cfg.task.curriculum.max_length}, "
                  f"advance below {cfg.task.curriculum.threshold} bits per output step over "
                  f"{cfg.task.curriculum.window} batches; a run that passes the last length stops early."]
    return "\n".join(lines) + "\n"


def plot_comparison(result: dict, path: Path) -> Path:
    """Left: the reported figure against T, a line per method. Then its course over training, per run; for the
    copy tasks also the evaluation loss at the current length (progress the length alone does not show)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    name, what, _ = metric_of(result["task"])
    text = result["task"] == "text"
    fig, axes = plt.subplots(1, 2 if text else 3, figsize=(12 if text else 17, 4.5))
    left, right = axes[0], axes[1]
    styles = {"tbptt": "-", "dni": "--", "dni+aux": ":"}
    for key in result["methods"]:
        ts = result["truncations"]
        left.plot(ts, [statistics.median(_cell(result, key, t)) for t in ts], styles.get(key, "-"), marker="o",
                  label=key)
        for t in ts:
            values = _cell(result, key, t)
            if len(values) > 1:
                left.scatter([t] * len(values), values, s=10, alpha=0.5)
    left.set_xlabel("truncation window T")
    left.set_xticks(result["truncations"])
    left.set_ylabel(what)
    colors = {t: f"C{i}" for i, t in enumerate(result["truncations"])}
    for r in result["runs"]:
        style = dict(color=colors[r["truncation"]], alpha=0.8,
                     label=f"{r['method']} T={r['truncation']}" if r["seed"] == result["seeds"][0] else None)
        if text:
            right.plot(*zip(*r["eval_history"]), styles.get(r["method"], "-"), **style)
        else:  # the curriculum's length as a step function, to the run's last step
            hist = r["curriculum"]["history"] + [[r["steps"], r["curriculum"]["length"]]]
            right.plot(*zip(*hist), styles.get(r["method"], "-"), drawstyle="steps-post", **style)
            axes[2].plot(*zip(*r["eval_history"]), styles.get(r["method"], "-"), marker=".", **style)
    right.set_ylabel("validation bits per character" if text else "curriculum length")
    if not text:
        left.yaxis.set_major_locator(MaxNLocator(integer=True))
        right.yaxis.set_major_locator(MaxNLocator(integer=True))
        axes[2].set_ylabel("evaluation bits per output step, at the current length")
        axes[2].set_yscale("log")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small" if ax is left else "x-small", ncol=1 if ax is left else 2)
        if ax is not left:
            ax.set_xlabel("training batches")
    fig.suptitle(f"{result['name']}: truncated BPTT vs synthetic gradients ({name})")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)  # readers never see half a figure
    return path
