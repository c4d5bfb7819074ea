"""From a config to K ready Stages: build the model, split it, give each stage its rule.

Every runtime builds its stages here, so a stage is the same object wherever it runs.
The model is built whole from the seed and then sliced, so stage k's initial weights do
not depend on which process builds it.
"""

from __future__ import annotations

import torch

from .config import Config, build_config
from .data import Dataset
from .models import build_blocks
from .rules import build_rule
from .split import StagePlan, plan_split, stage_modules
from .stage import Stage


def configure_threads(cfg: Config) -> None:
    """Pin torch's intra-op threads: oversubscribed cores make every stage crawl."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device: 'cuda' requested but torch sees no CUDA device")
    return torch.device(name)


def steps_per_epoch(cfg: Config, dataset: Dataset, replicas: int = 1) -> int:
    """Batches per epoch (of each data-parallel replica, which sees 1/replicas of the data)."""
    return len(dataset.train_y) // replicas // cfg.train.batch_size


def total_steps(cfg: Config, dataset: Dataset, replicas: int = 1) -> int:
    steps = cfg.train.epochs * steps_per_epoch(cfg, dataset, replicas)
    return min(steps, cfg.train.max_steps) if cfg.train.max_steps else steps


def plan_stages(cfg: Config, dataset: Dataset) -> tuple[list[torch.nn.Module], list[StagePlan]]:
    """The model's blocks (initialised from ``cfg.seed``) and which of them each stage holds."""
    torch.manual_seed(cfg.seed)
    blocks = build_blocks(cfg.model, dataset.input_shape, dataset.num_classes)
    sample = dataset.train_x[: cfg.train.batch_size] if cfg.split.balance == "time" else None
    return blocks, plan_split(blocks, cfg.split, dataset.input_shape, sample)


def fixed_split(cfg: Config, dataset: Dataset, plans: list[StagePlan] | None = None) -> Config:
    """``cfg`` naming its split's boundaries (``plans``, or planned now), so every worker builds the
    same stages: a time-balanced split timed in each worker could come out differently in each."""
    if plans is None:
        _, plans = plan_stages(cfg, dataset)
    data = cfg.model_dump(mode="json")
    data["split"]["boundaries"] = [p.start for p in plans[1:]]
    return build_config(data)


def build_stages(
    cfg: Config, dataset: Dataset, device: torch.device, indices: list[int] | None = None
) -> tuple[list[StagePlan], list[Stage]]:
    """All stages (in-process), or only those in ``indices`` (a worker builds just its own)."""
    blocks, plans = plan_stages(cfg, dataset)
    modules = stage_modules(blocks, plans)
    steps = total_steps(cfg, dataset)
    stages = [
        Stage(
            i,
            len(plans),
            modules[i],
            build_rule(cfg.method),
            cfg.optimizer,
            input_shape=plans[i].input_shape,
            output_shape=plans[i].output_shape,
            num_classes=dataset.num_classes,
            total_steps=steps,
            seed=cfg.seed,
            device=device,
            on_nonfinite=cfg.train.on_nonfinite,
        )
        for i in (range(len(plans)) if indices is None else indices)
    ]
    return plans, stages
