"""Resumable checkpoints: one file per worker, then a manifest that makes them a checkpoint.

Layout, under ``<run_dir>/checkpoints``::

    step-00000120/worker-0.pt     each worker's state after it finished global step 119
    step-00000120/worker-1.pt
    step-00000120/manifest.json   written last: only a directory with a manifest counts

Every file is written to a temporary name and renamed into place, so a crash mid-write
leaves the previous checkpoint as the latest. Files are read with
``torch.load(weights_only=True)``: tensors and plain containers only, never arbitrary
pickled objects.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from .metrics import write_json_atomic

MANIFEST = "manifest.json"
FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint to resume from is missing, incomplete or does not belong to this run."""


def root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir(run_dir: Path, steps_done: int) -> Path:
    """Where the checkpoint taken after ``steps_done`` steps lives."""
    return root(run_dir) / f"step-{steps_done:08d}"


def is_checkpoint_step(step: int, every: int | None, per_epoch: int, total: int) -> bool:
    """Whether the state after global step ``step`` (0-based) is checkpointed: every
    ``every`` steps, at each epoch's end and at the run's end."""
    done = step + 1
    return (every is not None and done % every == 0) or done % per_epoch == 0 or done == total


def worker_file(directory: Path, rank: int) -> Path:
    return Path(directory) / f"worker-{rank}.pt"


def save_worker(directory: Path, rank: int, state: dict) -> Path:
    """Write one worker's state atomically (temporary file, fsync, rename)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = worker_file(directory, rank)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_worker(directory: Path, rank: int) -> dict:
    path = worker_file(directory, rank)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (the checkpoint is incomplete)") from None
    except Exception as err:  # truncated or foreign file
        raise CheckpointError(f"{path}: cannot load: {type(err).__name__}: {err}") from None


def write_manifest(run_dir: Path, steps_done: int, workers: int, **info) -> Path:
    """Make ``step_dir(steps_done)`` a checkpoint, once every worker's file is there."""
    directory = step_dir(run_dir, steps_done)
    missing = [r for r in range(workers) if not worker_file(directory, r).exists()]
    if missing:
        raise CheckpointError(f"{directory}: no file from worker(s) {missing}")
    manifest = {"format": FORMAT, "steps_done": steps_done, "workers": workers, "time": time.time(), **info}
    write_json_atomic(directory / MANIFEST, manifest)
    return directory


def latest(run_dir: Path) -> tuple[Path, dict] | None:
    """The newest complete checkpoint (a directory with a readable manifest), or None."""
    for directory in sorted(root(run_dir).glob("step-*"), reverse=True):
        try:
            manifest = json.loads((directory / MANIFEST).read_text())
        except (OSError, ValueError):
            continue  # no manifest yet (or a crash before it): not a checkpoint
        if all(worker_file(directory, r).exists() for r in range(manifest["workers"])):
            return directory, manifest
    return None


def prune(run_dir: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest complete checkpoints, and unfinished ones older than those."""
    complete: list[Path] = []
    for directory in sorted(root(run_dir).glob("step-*"), reverse=True):
        if (directory / MANIFEST).exists():
            complete.append(directory)
            if len(complete) > keep:
                shutil.rmtree(directory, ignore_errors=True)
        elif complete:  # older than a complete checkpoint and never finished: a crash's leftover
            shutil.rmtree(directory, ignore_errors=True)
