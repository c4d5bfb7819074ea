"""``decoupled.train``: one run, from a validated config to ``runs/<name>/summary.json``."""

from __future__ import annotations

from pathlib import Path

import yaml

from .config import Config, ConfigError, build_config
from .data import Dataset, load_dataset
from .metrics import write_json_atomic
from .pipeline import configure_threads, plan_stages, steps_per_epoch


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


def prepare(cfg: Config) -> Dataset:
    """Load the data and try the model on it before any stage is built or trained.

    A bad data file, a model that does not fit the data's shape, or a batch larger than
    the data set is an input error (exit 2), never a crash in the middle of a run.
    """
    configure_threads(cfg)
    dataset = load_dataset(cfg.data, cfg.seed)
    if steps_per_epoch(cfg, dataset) == 0:
        raise ConfigError(
            f"train.batch_size: {cfg.train.batch_size} is larger than the {len(dataset.train_y)} training samples"
        )
    try:
        plan_stages(cfg, dataset)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return dataset


def train(config: Config | dict, run_dir: Path | None = None, dataset: Dataset | None = None) -> dict:
    """Train one run and return its summary (also written to ``<run_dir>/summary.json``)."""
    cfg = as_config(config)
    dataset = dataset or prepare(cfg)
    run_dir = Path(run_dir) if run_dir is not None else new_run_dir(cfg.output.dir, cfg.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    if cfg.runtime == "inprocess":
        from .runtime.inprocess import train_inprocess

        summary = train_inprocess(cfg, run_dir, dataset)
    else:  # pragma: no cover - the config admits only known runtimes
        raise ConfigError(f"runtime: unknown runtime {cfg.runtime!r}")
    summary["run_dir"] = str(run_dir)
    write_json_atomic(run_dir / "summary.json", summary)
    return summary
