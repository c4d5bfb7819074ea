"""Metrics out: TensorBoard scalars and atomically written JSON files."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write to a temporary file beside ``path`` and rename: readers never see half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class MetricsLogger:
    """TensorBoard scalars for one run (a no-op when TensorBoard is switched off)."""

    def __init__(self, log_dir: Path, enabled: bool = True, purge_step: int | None = None) -> None:
        """``purge_step``: on resume, TensorBoard hides what the interrupted run logged from this step on,
        so the curves continue from the checkpoint instead of doubling back."""
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when used

            self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def scalars(self, step: int, values: dict[str, float | torch.Tensor]) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, float(value), step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Throughput:
    """Samples/s over the training steps, leaving out the first ``warmup`` steps.

    The first steps pay one-off costs (CUDA kernel selection, allocator growth, lazy
    initialisation) that would otherwise favour whichever method runs second. Device
    work is synchronised before each reading. Evaluation is never timed.
    """

    def __init__(self, warmup: int, device: torch.device) -> None:
        self.warmup, self.device = warmup, device
        self.steps, self.samples, self.seconds = 0, 0, 0.0
        self._t0: float | None = None
        self._epoch_samples = 0

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def begin_epoch(self) -> None:
        self._epoch_samples = 0
        self._t0 = self._now() if self.steps >= self.warmup else None

    def step(self, samples: int) -> None:
        self.steps += 1
        if self._t0 is not None:
            self._epoch_samples += samples
        elif self.steps == self.warmup:
            self._t0 = self._now()

    def end_epoch(self) -> float | None:
        """This epoch's samples/s (None while still warming up)."""
        if self._t0 is None or self._epoch_samples == 0:
            return None
        seconds = self._now() - self._t0
        self.seconds += seconds
        self.samples += self._epoch_samples
        return self._epoch_samples / seconds

    @property
    def samples_per_sec(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else float("nan")


class PeakMemory:
    """Peak memory of one run: torch's peak GPU allocation; on CPU, with ``process_peak``, the
    kernel's record of this process's largest resident size (right for a process started for
    the run: ``compare`` gives each CPU run fresh Ray workers), else the largest resident size
    sampled during the run (the in-process runner's process also ran whatever came before)."""

    def __init__(self, device: torch.device, process_peak: bool = False) -> None:
        self.device = device
        self.process_peak = process_peak
        self.peak_rss = 0.0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self.sample()

    def sample(self) -> None:
        if self.device.type != "cuda":
            self.peak_rss = max(self.peak_rss, _peak_rss_mb() if self.process_peak else _resident_mb())

    @property
    def mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        self.sample()
        return self.peak_rss


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _resident_mb() -> float:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):  # not Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
