"""``decoupled dashboard RUN_DIR``: TensorBoard on loopback, laid out for comparing methods.

TensorBoard shows each run (a method's folder in a comparison) as its own line, but the
custom-scalars plugin filters charts by tag, not by run. So that a chart can put one
decoupled method beside the E2EBP baselines, the dashboard mirrors every run's throughput
and accuracy into ``dashboard/<run>`` under per-method tags (``samples_per_sec/<run>``; a
run of its own, so each method keeps its own colour), appending new points while it
serves, and writes a layout (in ``dashboard/``) whose charts pick those tags.
"""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from .config import ConfigError

DASHBOARD_RUN = "dashboard"
# what each run logs (decoupled/runtime) -> the per-method tag the dashboard run mirrors it to
MIRRORED = {"throughput/samples_per_sec": "samples_per_sec", "test/accuracy": "test_accuracy"}
STAGE_CHARTS = {
    "compute fraction (1 - idle)": r"stage\d+/compute_fraction",
    "waiting for input": r"stage\d+/wait_input_fraction",
    "waiting to send (in-flight bound)": r"stage\d+/wait_send_fraction",
    "waiting for feedback (backprop, DFA, DNI)": r"stage\d+/wait_feedback_fraction",
    "queue depth": r"stage\d+/queue_depth",
    "samples/s per stage": r"stage\d+/samples_per_sec",
    "peak memory (MiB)": r"stage\d+/peak_memory_mb",
}
LEARNING_CHARTS = {
    "test accuracy (every run)": r"test/accuracy",
    "auxiliary heads' test accuracy (DGL)": r"test/aux_accuracy_stage\d+",
    "loss per stage": r"stage\d+/loss",
    "predictor cosine to the true gradient (DNI)": r"stage\d+/predictor_cosine",
    "predictor MSE (DNI)": r"stage\d+/predictor_mse",
    "predictor staleness in steps (DNI)": r"stage\d+/predictor_staleness",
}


@dataclass(frozen=True)
class Run:
    name: str  # its path under the dashboard's directory, as TensorBoard names it
    path: Path
    method: str
    schedule: str | None

    @property
    def e2ebp(self) -> bool:
        return self.method == "backprop"


def find_runs(root: Path) -> list[Run]:
    """Every run under ``root`` (a run folder or a comparison): folders with a config.yaml and events."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"RUN_DIR: {root} is not a directory")
    runs = []
    for config_file in sorted(root.rglob("config.yaml")):
        folder = config_file.parent
        if DASHBOARD_RUN in folder.relative_to(root).parts or not any(folder.glob("events.out.tfevents.*")):
            continue
        method = (yaml.safe_load(config_file.read_text()) or {}).get("method") or {}
        name = folder.relative_to(root).as_posix()
        runs.append(Run(name if name != "." else folder.name, folder, method.get("name", "?"), method.get("schedule")))
    if not runs:
        raise ConfigError(f"RUN_DIR: {root} holds no runs (folders with config.yaml and TensorBoard events); "
                          "give a run directory or a comparison's directory")
    return runs


def layout(runs: list[Run]) -> dict:
    """The custom-scalars layout: {category: {chart: ["Multiline", [tag regexes]]}}."""
    baselines = [r.name for r in runs if r.e2ebp]
    throughput = {"samples/s, every run": ["Multiline", [r"samples_per_sec/.*"]]}
    accuracy = {"test accuracy, every run": ["Multiline", [r"test_accuracy/.*"]]}
    for run in runs:
        if run.e2ebp:
            continue
        names = "|".join(re.escape(n) for n in [run.name, *baselines])
        title = f"{run.name} ({run.method}) vs E2EBP" if baselines else f"{run.name} ({run.method})"
        throughput[f"samples/s: {title}"] = ["Multiline", [rf"samples_per_sec/({names})$"]]
        accuracy[f"test accuracy: {title}"] = ["Multiline", [rf"test_accuracy/({names})$"]]
    return {
        "Throughput: decoupled vs E2EBP": throughput,
        "Accuracy: decoupled vs E2EBP": accuracy,
        "Stages: idle and waiting": {title: ["Multiline", [regex]] for title, regex in STAGE_CHARTS.items()},
        "Learning signals": {title: ["Multiline", [regex]] for title, regex in LEARNING_CHARTS.items()},
    }


class DashboardWriter:
    """Writes the layout once, then mirrors new points of every run on each ``update``."""

    def __init__(self, root: Path) -> None:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when used

        self.root = Path(root)
        self.runs = find_runs(self.root)
        self.layout = layout(self.runs)
        # derived from the runs: rewritten whole, so a second start neither doubles points nor layouts
        shutil.rmtree(self.root / DASHBOARD_RUN, ignore_errors=True)
        self.layout_writer = SummaryWriter(log_dir=str(self.root / DASHBOARD_RUN))
        self.layout_writer.add_custom_scalars(self.layout)
        self.layout_writer.flush()
        self.writers = {run.name: SummaryWriter(log_dir=str(self.root / DASHBOARD_RUN / run.name)) for run in self.runs}
        # one reader per run: each Reload() reads only what was appended since the last one
        self.readers = {run.name: EventAccumulator(str(run.path), size_guidance={"scalars": 0}) for run in self.runs}
        self.last_step: dict[str, int] = {}

    def update(self) -> int:
        """Mirror the points logged since the last update; returns how many."""
        written = 0
        for run in self.runs:
            events = self.readers[run.name]
            events.Reload()
            tags = set(events.Tags()["scalars"])
            for source, prefix in MIRRORED.items():
                if source not in tags:
                    continue
                tag = f"{prefix}/{run.name}"
                for event in events.Scalars(source):
                    if event.step > self.last_step.get(tag, -1):
                        self.writers[run.name].add_scalar(tag, event.value, event.step, walltime=event.wall_time)
                        self.last_step[tag] = event.step
                        written += 1
            self.writers[run.name].flush()
        return written

    def close(self) -> None:
        for writer in [self.layout_writer, *self.writers.values()]:
            writer.close()


def serve(root: Path, host: str = "127.0.0.1", port: int = 6006, refresh_s: float = 15.0,
          ready=None) -> None:
    """Start TensorBoard on ``root`` and keep the dashboard run current until interrupted.

    ``ready(url)`` is called once TensorBoard answers (the CLI prints the address)."""
    from tensorboard import program

    dashboard = DashboardWriter(root)
    dashboard.update()
    board = program.TensorBoard()
    # --reload_interval: TensorBoard picks up new points as quickly as the dashboard mirrors them;
    # load_fast=false: no separate data-server process to outlive us
    board.configure(logdir=str(root), host=host, port=port, reload_interval=min(refresh_s, 5.0), load_fast="false")
    try:
        url = board.launch()
    except program.TensorBoardServerException as err:
        dashboard.close()
        raise ConfigError(f"--port: TensorBoard cannot listen on {host}:{port}: {err.msg}") from None
    if ready is not None:
        ready(url)
    try:
        while True:
            time.sleep(refresh_s)
            dashboard.update()
    finally:
        dashboard.close()
