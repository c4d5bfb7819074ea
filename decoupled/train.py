"""``decoupled.train``: one run, from a validated config to ``runs/<name>/summary.json``."""

from __future__ import annotations

from pathlib import Path

import yaml
from torch import nn

from . import checkpoint
from .config import Config, ConfigError, build_config, load_config
from .data import Dataset, load_dataset
from .metrics import write_json_atomic
from .pipeline import configure_threads, fixed_split, plan_stages, resolve_device, steps_per_epoch


def as_config(config: Config | dict) -> Config:
    return config if isinstance(config, Config) else build_config(config)


def new_run_dir(parent: Path, name: str) -> Path:
    """``parent/name``, or ``parent/name-2``, ``-3``... if taken: a run never overwrites another."""
    parent.mkdir(parents=True, exist_ok=True)
    path, n = parent / name, 1
    while True:
        try:
            path.mkdir()
            return path
        except FileExistsError:
            n += 1
            path = parent / f"{name}-{n}"


def prepare(cfg: Config) -> tuple[Config, Dataset]:
    """Check everything that can be checked before a stage is built, and fix the split.

    Loads the data and tries the model on it: a bad data file, a model that does not fit
    the data, a device that is not there or a batch that does not fit is an input error
    (exit 2), never a crash in the middle of a run. The returned config names the split's
    boundaries, so every run and every worker uses the same split (a time-balanced split
    is measured once, here).
    """
    configure_threads(cfg)
    if cfg.resolved_runtime() == "inprocess":
        try:
            resolve_device(cfg.train.device)
        except RuntimeError as err:
            raise ConfigError(str(err)) from None
    dataset = load_dataset(cfg.data, cfg.seed)
    if steps_per_epoch(cfg, dataset) == 0:
        raise ConfigError(
            f"train.batch_size: {cfg.train.batch_size} is larger than the {len(dataset.train_y)} training samples"
        )
    try:
        blocks, plans = plan_stages(cfg, dataset)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if cfg.train.batch_size < 2 and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for b in blocks for m in b.modules()):
        raise ConfigError("train.batch_size: BatchNorm needs at least 2 samples per batch")
    return fixed_split(cfg, dataset, plans), dataset


def train(config: Config | dict, run_dir: Path | None = None, dataset: Dataset | None = None, workers=None,
          resume: tuple[Path, dict] | None = None) -> dict:
    """Train one run and return its summary (also written to ``<run_dir>/summary.json``).

    ``dataset`` (with a config from ``prepare``) skips the checks and ``workers`` (a started
    ``RayWorkers``) the start-up: ``compare`` does both once for all its runs. ``resume``
    (a checkpoint of ``run_dir``, see ``resume``) continues that run.
    """
    cfg = as_config(config)
    if dataset is None:
        cfg, dataset = prepare(cfg)
    if cfg.resolved_runtime() == "ray" and workers is None:
        from .runtime.ray_runtime import RayWorkers

        with RayWorkers(cfg) as workers:  # the cluster is checked before the run directory exists
            return train(cfg, run_dir, dataset, workers, resume)
    run_dir = Path(run_dir) if run_dir is not None else new_run_dir(cfg.output.dir, cfg.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume is None:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    if cfg.resolved_runtime() == "ray":
        from .runtime.ray_runtime import train_ray

        summary = train_ray(cfg, run_dir, dataset, workers, resume)
    else:
        from .runtime.inprocess import train_inprocess

        summary = train_inprocess(cfg, run_dir, dataset, resume)
    summary["run_dir"] = str(run_dir)
    write_json_atomic(run_dir / "summary.json", summary)
    return summary


def resume(run_dir: Path | str) -> dict:
    """Continue the run in ``run_dir`` from its latest complete checkpoint, with the config it started with."""
    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise ConfigError(f"--resume: {run_dir} is not a run directory (no config.yaml)")
    cfg = load_config(config_file)
    found = checkpoint.latest(run_dir)
    if found is None:
        raise ConfigError(f"--resume: {run_dir} has no complete checkpoint (checkpoints/step-*/manifest.json)")
    directory, manifest = found
    runtime = cfg.resolved_runtime()
    if manifest.get("runtime") != runtime:
        raise ConfigError(f"--resume: {directory} was written by the {manifest.get('runtime')} runtime, "
                          f"the config runs {runtime}")
    return train(cfg, run_dir, resume=found)
