"""``decoupled.compare``: several methods on one config, side by side, one run directory each."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from .config import Config, ConfigError
from .metrics import write_json_atomic
from .train import as_config, prepare, new_run_dir, train


def _ray_workers(cfg: Config):
    from .runtime.ray_runtime import RayWorkers

    return RayWorkers(cfg)


def comparison_table(runs: list[dict]) -> str:
    """Markdown: samples/s, accuracy, and each run's speed relative to every backprop baseline."""
    baselines = [r["label"] for r in runs if r["method"] == "backprop"]
    head = ["run", "method", "stages", "samples/s", "test accuracy", "peak MiB per stage"]
    head += [f"× {b}" for b in baselines]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        memory = " / ".join(f"{s['peak_memory_mb']:.0f}" for s in r["stage_stats"]) if "stage_stats" in r else (
            f"{r['peak_memory_mb']:.0f} (all)")
        cells = [r["label"], r["method"], str(r["stages"]), f"{r['samples_per_sec']:.0f}", f"{r['test_accuracy']:.4f}",
                 memory]
        cells += [f"{r['speed_ratio'][b]:.2f}" for b in baselines]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compare(config: Config | dict, parent: Path | None = None) -> dict:
    """Run every method in ``config.compare.methods``; returns the comparison (also ``comparison.json``)."""
    cfg = as_config(config)
    if cfg.compare is None:
        raise ConfigError("compare: the config has no 'compare' section listing the methods to run")
    cfg, dataset = prepare(cfg)
    configs = [cfg.with_method(m) for m in cfg.compare.methods]  # all validated before the first run starts
    parent = Path(parent) if parent is not None else new_run_dir(cfg.output.dir, cfg.name)
    runs = []
    # One set of Ray workers for every run: the methods are measured on the same processes and bundles.
    on_ray = any(c.resolved_runtime() == "ray" for c in configs)
    with _ray_workers(cfg) if on_ray else contextlib.nullcontext() as workers:
        for method, run_cfg in zip(cfg.compare.methods, configs):
            runs.append(train(run_cfg, parent / method.display_name(), dataset, workers))
            if cfg.train.progress:
                r = runs[-1]
                print(f"{r['label']}: test accuracy {r['test_accuracy']:.4f}, {r['samples_per_sec']:.0f} samples/s, "
                      f"{r['wall_seconds']:.1f} s", file=sys.stderr, flush=True)
    baselines = [r for r in runs if r["method"] == "backprop"]
    for r in runs:
        r["speed_ratio"] = {b["label"]: r["samples_per_sec"] / b["samples_per_sec"] for b in baselines}
    table = comparison_table(runs)  # reads speed_ratio
    result = {"name": cfg.name, "parent": str(parent), "runs": runs, "table": table}
    write_json_atomic(parent / "comparison.json", result)
    (parent / "comparison.md").write_text(f"# {cfg.name}\n\n{table}")
    return result
