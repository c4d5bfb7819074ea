"""``decoupled.compare``: several methods on one config, side by side, one run directory each."""

from __future__ import annotations

import contextlib
import statistics
import sys
from pathlib import Path

from .config import Config, ConfigError
from .metrics import write_json_atomic
from .train import as_config, prepare, new_run_dir, train


def _ray_workers(cfg: Config):
    from .runtime.ray_runtime import RayWorkers

    return RayWorkers(cfg)


def comparison_table(runs: list[dict]) -> str:
    """Markdown: samples/s, idle time, accuracy, memory, and each run's speed relative to every backprop baseline."""
    baselines = [r["label"] for r in runs if r["method"] == "backprop"]
    head = ["run", "method", "stages", "samples/s", "idle per stage", "test accuracy", "peak MiB per stage"]
    head += [f"× {b}" for b in baselines]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        memory = " / ".join(f"{s['peak_memory_mb']:.0f}" for s in r["stage_stats"]) if "stage_stats" in r else (
            f"{r['peak_memory_mb']:.0f} (all)")
        speed = f"{r['samples_per_sec']:.0f}"
        if len(r["samples_per_sec_runs"]) > 1:
            speed += f" ({min(r['samples_per_sec_runs']):.0f}–{max(r['samples_per_sec_runs']):.0f})"
        idle = " / ".join(f"{x:.2f}" for x in r["idle_fraction"]) if r["idle_fraction"] else "–"
        cells = [r["label"], r["method"], str(r["stages"]), speed, idle, f"{r['test_accuracy']:.4f}", memory]
        cells += [f"{r['speed_ratio'][b]:.2f}" for b in baselines]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compare(config: Config | dict, parent: Path | None = None) -> dict:
    """Run every method in ``config.compare.methods`` (``repeats`` rounds); returns the comparison (also
    ``comparison.json``, ``comparison.md``, ``comparison.png`` and, over several epochs,
    ``learning_curves.png``)."""
    cfg = as_config(config)
    if cfg.compare is None:
        raise ConfigError("compare: the config has no 'compare' section listing the methods to run")
    cfg, dataset = prepare(cfg)
    methods, repeats = cfg.compare.methods, cfg.compare.repeats
    configs = [cfg.with_method(m) for m in methods]  # all validated before the first run starts
    parent = Path(parent) if parent is not None else new_run_dir(cfg.output.dir, cfg.name)
    rounds: list[list[dict]] = []
    # One RayWorkers for every run (on CPU it gives each run fresh processes, see below).
    # Rounds interleave the methods, so a machine that slows down slows them all alike.
    on_ray = any(c.resolved_runtime() == "ray" for c in configs)
    with _ray_workers(cfg) if on_ray else contextlib.nullcontext() as workers:
        for rep in range(repeats):
            rounds.append([])
            for method, run_cfg in zip(methods, configs):
                run_dir = parent / method.display_name() / (f"rep-{rep}" if repeats > 1 else "")
                if workers is not None and workers.device == "cpu" and (rep or rounds[-1]):
                    # fresh processes: a CPU worker's peak memory is its process's, and the
                    # allocator would otherwise carry the last run's peak (and its heap) into this one
                    workers.restart(graceful=True)
                rounds[-1].append(train(run_cfg, run_dir, dataset, workers))
                if cfg.train.progress:
                    r = rounds[-1][-1]
                    print(f"{r['label']}{f' (round {rep + 1}/{repeats})' if repeats > 1 else ''}: test accuracy "
                          f"{r['test_accuracy']:.4f}, {r['samples_per_sec']:.0f} samples/s, {r['wall_seconds']:.1f} s",
                          file=sys.stderr, flush=True)
    runs = [_aggregate(rounds, i) for i in range(len(methods))]
    table = comparison_table(runs)
    result = {"name": cfg.name, "parent": str(parent), "repeats": repeats, "runs": runs, "table": table}
    from .plots import plot_comparison, plot_learning_curves

    result["plots"] = [str(plot_comparison(result, parent / "comparison.png"))]
    if any(len(r["test_accuracy_per_epoch"]) > 1 for r in runs):
        result["plots"].append(str(plot_learning_curves(runs, parent / "learning_curves.png",
                                                        f"{cfg.name}: test accuracy")))
    write_json_atomic(parent / "comparison.json", result)
    (parent / "comparison.md").write_text(f"# {cfg.name}\n\n{table}")
    return result


def _aggregate(rounds: list[list[dict]], i: int) -> dict:
    """Method ``i`` over all rounds: its median-speed run's summary, with medians in place of single figures."""
    mine = [rnd[i] for rnd in rounds]
    baselines = [b for b, r in enumerate(rounds[0]) if r["method"] == "backprop"]
    speeds = [r["samples_per_sec"] for r in mine]
    middle = sorted(mine, key=lambda r: r["samples_per_sec"])[(len(mine) - 1) // 2]
    out = dict(middle)
    out.update(
        samples_per_sec=statistics.median(speeds),
        samples_per_sec_runs=speeds,
        test_accuracy=statistics.median(r["test_accuracy"] for r in mine),
        test_accuracy_runs=[r["test_accuracy"] for r in mine],
        run_dirs=[r["run_dir"] for r in mine],
        # idle: any time a stage is not computing (waiting for input, to send, for feedback)
        idle_fraction=[statistics.median(1.0 - r["stage_stats"][k]["compute_fraction"] for r in mine)
                       for k in range(len(middle["stage_stats"]))] if "stage_stats" in middle else None,
        # a ratio is taken within a round (same conditions), then the median over rounds
        speed_ratio={rounds[0][b]["label"]: statistics.median(rnd[i]["samples_per_sec"] / rnd[b]["samples_per_sec"]
                                                              for rnd in rounds)
                     for b in baselines},
    )
    return out
