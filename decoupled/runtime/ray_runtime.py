"""Ray runtime: one actor per stage in a placement group; the driver coordinates and logs.

The driver connects to a cluster (or starts an embedded Ray on loopback), checks that the
cluster has the resources before anything starts, reserves one bundle per stage, starts
one ``StageWorker`` actor per bundle and joins them in a torch.distributed process group
(the way Ray Train does: rank 0's address and a free port, handed to every worker).
Tensors then move between the workers over point-to-point links (links.py); Ray calls
carry only control and metrics, plus the sampled DNI triples to the coordinator.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from ..config import Config, ConfigError
from ..data import Dataset
from ..metrics import MetricsLogger
from ..pipeline import steps_per_epoch, total_steps
from .worker import StageWorker, execution_mode

_STAGE_KEYS = ("compute_s", "wait_input_s", "wait_send_s", "wait_feedback_s")


def _ray(embedded: bool = False):
    if embedded and "ray" not in sys.modules:
        # Read at import: without it Ray's processes listen on the machine's public address.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray  # imported late: the in-process runtime must not pay for it

    return ray


class RayWorkers:
    """The Ray connection, placement group and stage actors; ``compare`` reuses them across runs."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.size = cfg.split.stages
        self.started_ray = False
        self.actors: list = []
        self.pg = None
        self.device = "cpu"

    def __enter__(self) -> "RayWorkers":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        c = self.cfg.cluster
        address = c.address or os.environ.get("RAY_ADDRESS")
        ray = _ray(embedded=not address)
        self.env: dict[str, str] = {}
        if not ray.is_initialized():
            if address:
                ray.init(address=address, log_to_driver=True)
            else:  # an embedded Ray of our own, reachable from this machine only
                ray.init(_node_ip_address=c.host, include_dashboard=c.dashboard, dashboard_host=c.host,
                         log_to_driver=True, configure_logging=False)
                if c.host in ("127.0.0.1", "localhost"):  # the workers' gloo/NCCL sockets too
                    self.env = {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}
            self.started_ray = True
        gpus = self._check_resources()
        self.device = "cuda" if gpus else "cpu"
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundle = {"CPU": c.cpus_per_worker, **({"GPU": gpus} if gpus else {})}
        self.pg = placement_group([bundle] * self.size, strategy=c.strategy)
        timeout = self.cfg.links.timeout_s
        ready, _ = ray.wait([self.pg.ready()], timeout=timeout)
        if not ready:
            raise RuntimeError(f"cluster: the placement group of {self.size} x {bundle} was not ready within "
                               f"{timeout:.0f} s (links.timeout_s); resources now: {ray.available_resources()}")
        actor = ray.remote(StageWorker)
        self.actors = [
            actor.options(
                num_cpus=c.cpus_per_worker, num_gpus=gpus, max_concurrency=2,  # a second thread answers metrics()
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=k),
                runtime_env={"env_vars": self.env} if self.env else None,
            ).remote(k, self.size, self.cfg.train.threads)
            for k in range(self.size)
        ]
        where = ray.get(self.actors[0].where.remote(), timeout=timeout)
        port = ray.get(self.actors[0].open_store.remote(where["ip"], timeout), timeout=timeout)
        backend = "nccl" if gpus else "gloo"
        ray.get([a.init_process_group.remote(where["ip"], port, backend, timeout) for a in self.actors],
                timeout=timeout + 30)

    def _check_resources(self) -> int:
        """GPUs per worker; refuse, with the numbers, a request the cluster cannot meet."""
        ray = _ray()
        c, n = self.cfg.cluster, self.size
        total = ray.cluster_resources()
        cpus, gpus_total = total.get("CPU", 0.0), total.get("GPU", 0.0)
        gpus = c.gpus_per_worker if c.gpus_per_worker is not None else (1 if gpus_total >= n else 0)
        if n * c.cpus_per_worker > cpus:
            raise ConfigError(
                f"cluster.cpus_per_worker: {n} workers x {c.cpus_per_worker:g} CPUs = {n * c.cpus_per_worker:g} CPUs, "
                f"but the cluster has {cpus:g} (for a local simulation on fewer cores, use a fraction such as "
                f"cluster.cpus_per_worker={cpus / n:g})"
            )
        if n * gpus > gpus_total:
            raise ConfigError(
                f"cluster.gpus_per_worker: {n} workers x {gpus} GPUs = {n * gpus} GPUs, "
                f"but the cluster has {gpus_total:g}"
            )
        return gpus

    def stop(self) -> None:
        ray = _ray()
        if not ray.is_initialized():
            return
        for a in self.actors:
            try:
                ray.get(a.shutdown.remote(), timeout=10)
            except Exception:  # a dead or hung worker: it is killed below anyway
                pass
            ray.kill(a)
        self.actors = []
        if self.pg is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.pg)
            self.pg = None
        if self.started_ray:
            ray.shutdown()
            self.started_ray = False


def train_ray(cfg: Config, run_dir: Path, dataset: Dataset, workers: RayWorkers | None = None) -> dict:
    """Train ``cfg`` with one Ray actor per stage; returns the run's summary."""
    if workers is None:
        with RayWorkers(cfg) as own:
            return train_ray(cfg, run_dir, dataset, own)
    ray = _ray()
    start = time.perf_counter()
    timeout = cfg.links.timeout_s
    mode = execution_mode(cfg)
    coordinators: list = []
    if cfg.method.name == "dni" and cfg.method.predictor_training == "coordinator" and cfg.split.stages > 1:
        from .coordinator import PredictorCoordinator

        # One actor per boundary, so no predictor waits behind another's training (or its GIL).
        # num_cpus=0: they share the workers' cores rather than holding cores of their own.
        coordinators = [ray.remote(PredictorCoordinator).options(num_cpus=0, max_concurrency=4).remote(
            cfg.method.model_dump(mode="json"), dataset.num_classes) for _ in range(cfg.split.stages - 1)]
    # Only workers that read inputs get the data; the others get shapes and labels (for step counts).
    full, light = ray.put(dataset), ray.put(dataset.without_inputs())
    actors = workers.actors
    reads = [k == 0 or mode in ("ddp", "single") for k in range(len(actors))]
    infos = ray.get([a.setup_run.remote(cfg.model_dump(mode="json"), full if r else light, coordinators)
                     for a, r in zip(actors, reads)], timeout=timeout + 60)
    active = [a for a, info in zip(actors, infos) if "index" in info]
    logger = MetricsLogger(run_dir, cfg.output.tensorboard)
    steps = total_steps(cfg, dataset, len(active) if mode == "ddp" else 1)
    progress = tqdm(total=steps, desc=f"{cfg.method.display_name()} ray x{len(active)}", unit="step",
                    disable=None if cfg.train.progress else True, leave=False)
    evals, timed_samples, timed_seconds = [], 0, 0.0
    epoch_stats: list[dict] = []
    try:
        for epoch in range(_epochs(cfg, dataset, mode, len(active))):
            refs = [a.train_epoch.remote(epoch) for a in active]
            pending = list(refs)
            while pending:
                ready, pending = ray.wait(pending, num_returns=len(pending), timeout=cfg.train.metrics_every_s)
                ray.get(ready)  # a stage that failed is reported now, not when its peers time out
                snapshots = ray.get([a.metrics.remote() for a in active], timeout=timeout)
                step = _log_progress(logger, snapshots, coordinators)
                progress.update(max(0, step - progress.n))
            before = epoch_stats
            epoch_stats = ray.get(refs, timeout=timeout)  # raises here if a worker failed, naming its error
            samples, seconds = _epoch_throughput(epoch_stats, before, mode)
            timed_samples += samples
            timed_seconds += seconds
            result = _evaluate(ray, active, timeout)
            evals.append(result)
            values = {"test/accuracy": result["test_accuracy"]}
            if seconds > 0:
                values["throughput/samples_per_sec"] = samples / seconds
            values.update({f"test/aux_accuracy_stage{k}": a for k, a in enumerate(result["aux_accuracy"])
                           if a is not None})
            logger.scalars(epoch_stats[0]["steps"], values)
            progress.set_description(f"{cfg.method.display_name()} ray x{len(active)} "
                                     f"test acc {result['test_accuracy']:.3f}")
        final_metrics = ray.get([a.metrics.remote() for a in active], timeout=timeout)
        ray.get([a.teardown_run.remote() for a in active], timeout=timeout + 30)
    finally:
        progress.close()
        logger.close()
        for coordinator in coordinators:
            ray.kill(coordinator)
    final = evals[-1]
    stage_stats = [_stage_summary(k, s) for k, s in enumerate(final_metrics)]
    losses = [s.get("stage_metrics", {}).get("loss") for s in final_metrics]
    return {
        "name": cfg.name,
        "method": cfg.method.name,
        "label": cfg.method.display_name(),
        "schedule": cfg.method.schedule or mode if cfg.method.name == "backprop" else None,
        "runtime": "ray",
        "stages": cfg.split.stages if mode not in ("single", "ddp") else 1,
        "workers": len(active),
        "split": [{"index": k, "blocks": b} for k, b in enumerate(_blocks(cfg))],
        "epochs": len(evals),
        "steps": final_metrics[0]["steps"],
        "batch_size": cfg.train.batch_size,
        "samples_per_sec": timed_samples / timed_seconds if timed_seconds > 0 else float("nan"),
        "test_accuracy": final["test_accuracy"],
        "aux_accuracy": final["aux_accuracy"],
        "test_accuracy_per_epoch": [e["test_accuracy"] for e in evals],
        "final_loss": next((x for x in reversed(losses) if x is not None), None),
        "wall_seconds": time.perf_counter() - start,
        "peak_memory_mb": max(s["peak_memory_mb"] for s in stage_stats),
        "stage_stats": stage_stats,
        "stage_info": [{k: info[k] for k in ("index", "pid", "node", "device")} for info in infos if "index" in info],
    }


def _epochs(cfg: Config, dataset: Dataset, mode: str, workers: int) -> int:
    """Epochs to run: all of ``train.epochs``, or fewer when ``train.max_steps`` ends the run first."""
    per_epoch = steps_per_epoch(cfg, dataset, workers if mode == "ddp" else 1)
    if cfg.train.max_steps is None:
        return cfg.train.epochs
    return min(cfg.train.epochs, math.ceil(cfg.train.max_steps / per_epoch))


def _blocks(cfg: Config) -> list[list[int]]:
    b = cfg.split.boundaries or []
    return [[start, stop] for start, stop in zip([0, *b], [*b, cfg.model.num_blocks()])]


def _epoch_throughput(stats: list[dict], before: list[dict], mode: str) -> tuple[int, float]:
    """Samples after warm-up and the wall time they took: from stage 0's first timed step to the last stage's end."""
    prev = [s["timed_samples"] for s in before] if before else [0] * len(stats)
    firsts = [s["epoch_first"] for s in stats if s.get("epoch_first") is not None]
    if not firsts:
        return 0, 0.0
    end = max(s["epoch_end"] for s in stats)
    if mode == "ddp":  # every replica draws its own samples
        return sum(s["timed_samples"] - p for s, p in zip(stats, prev)), end - min(firsts)
    if stats[0].get("epoch_first") is None:
        return 0, 0.0
    return stats[0]["timed_samples"] - prev[0], end - stats[0]["epoch_first"]


def _evaluate(ray, actors: list, timeout: float) -> dict:
    results = [r for r in ray.get([a.evaluate.remote() for a in actors], timeout=timeout) if r]
    final = next(r for r in results if r["is_last"])
    aux = [r["aux_correct"] / r["count"] if r["has_aux"] else None for r in results if not r["is_last"]]
    return {"test_accuracy": final["correct"] / final["count"], "aux_accuracy": aux}


def _fractions(s: dict) -> dict[str, float]:
    total = sum(s[k] for k in _STAGE_KEYS) or 1.0
    return {f"{k[:-2]}_fraction": s[k] / total for k in _STAGE_KEYS}  # compute_s -> compute_fraction


def _log_progress(logger: MetricsLogger, snapshots: list[dict], coordinators: list) -> int:
    """Write each stage's counters to TensorBoard at stage 0's step; returns that step."""
    step = snapshots[0].get("steps", 0)
    values: dict[str, float] = {}
    coord = {}
    for stats in _ray().get([c.stats.remote() for c in coordinators], timeout=30):
        coord.update(stats)
    for k, s in enumerate(snapshots):
        if not s:
            continue
        busy = sum(s[key] for key in _STAGE_KEYS)
        values.update({f"stage{k}/{name}": v for name, v in _fractions(s).items()})
        if busy > 0:
            values[f"stage{k}/samples_per_sec"] = s["samples"] / busy
        values[f"stage{k}/queue_depth"] = s.get("queue_depth", 0)
        values[f"stage{k}/peak_memory_mb"] = s.get("peak_memory_mb", 0.0)
        values.update({f"stage{k}/{name}": v for name, v in s.get("stage_metrics", {}).items()})
        if k in coord:
            values[f"stage{k}/predictor_staleness"] = coord[k]["version"] - s.get("predictor_version", 0)
            values[f"stage{k}/predictor_dropped_samples"] = coord[k]["dropped"]
            for name in ("predictor_mse", "predictor_cosine"):
                if name in coord[k]:
                    values[f"stage{k}/{name}"] = coord[k][name]
    if values:
        logger.scalars(step, values)
    return step


def _stage_summary(k: int, s: dict) -> dict:
    busy = sum(s[key] for key in _STAGE_KEYS)
    out = {"index": k, "steps": s["steps"], "samples_per_sec": s["samples"] / busy if busy else None,
           **{name: round(v, 4) for name, v in _fractions(s).items()},
           "peak_memory_mb": s.get("peak_memory_mb", 0.0)}
    for key in ("replayed_steps", "sent_samples", "dropped_samples", "predictor_loads", "predictor_local_changes",
                "predictor_version"):
        if s.get(key):
            out[key] = s[key]
    return out
