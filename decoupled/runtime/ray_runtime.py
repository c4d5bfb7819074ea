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
import shutil
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from .. import checkpoint
from ..config import Config, ConfigError
from ..data import Dataset
from ..malloc import tunables_env
from ..metrics import MetricsLogger, write_json_atomic
from ..pipeline import fixed_split, steps_per_epoch, total_steps
from ..stage import NonFiniteError
from ..stopping import RunFailed, RunStopped, StopRequest
from .links import LinkClosed, LinkTimeout
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
        self.worker_env: dict[str, str] = {}  # environment of every actor this run starts

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
        self._start_actors()

    def _start_actors(self) -> None:
        """The placement group, one actor per bundle, and their process group."""
        ray, c = _ray(), self.cfg.cluster
        gpus = self._check_resources()
        self.device = "cuda" if gpus else "cpu"
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundle = {"CPU": c.cpus_per_worker, **({"GPU": gpus} if gpus else {})}
        self.pg = placement_group([bundle] * self.size, strategy=c.strategy)
        timeout = self.cfg.cluster.start_timeout_s
        ready, _ = ray.wait([self.pg.ready()], timeout=timeout)
        if not ready:
            raise RuntimeError(f"cluster: the placement group of {self.size} x {bundle} was not ready within "
                               f"{timeout:.0f} s (cluster.start_timeout_s); resources now: {ray.available_resources()}")
        env = self.worker_env = dict(self.env)
        if self.cfg.train.keep_freed_memory:  # read when the worker process starts: it cannot come later
            env["GLIBC_TUNABLES"] = tunables_env(os.environ.get("GLIBC_TUNABLES"))
        actor = ray.remote(StageWorker)
        self.actors = [
            actor.options(
                num_cpus=c.cpus_per_worker, num_gpus=gpus, max_concurrency=2,  # a second thread answers metrics()
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=k),
                runtime_env={"env_vars": env} if env else None,
            ).remote(k, self.size, self.cfg.train.threads)
            for k in range(self.size)
        ]
        where = ray.get(self.actors[0].where.remote(), timeout=timeout)
        port = ray.get(self.actors[0].open_store.remote(where["ip"], timeout), timeout=timeout)
        backend = "nccl" if gpus else "gloo"
        # collectives (ddp) and the pipelining schedules' transfers give up after links.timeout_s
        ray.get([a.init_process_group.remote(where["ip"], port, backend, timeout, self.cfg.links.timeout_s)
                 for a in self.actors], timeout=timeout + 30)

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

    def restart(self, graceful: bool = False) -> None:
        """New actors (and a new placement group, which Ray places on the nodes still there)."""
        self._stop_actors(graceful=graceful)
        self._start_actors()

    def stop(self) -> None:
        ray = _ray()
        if not ray.is_initialized():
            return
        self._stop_actors()
        if self.started_ray:
            ray.shutdown()
            self.started_ray = False

    def _stop_actors(self, graceful: bool = True) -> None:
        ray = _ray()
        if graceful and self.actors:  # leave the process groups cleanly; a dead or hung worker is killed anyway
            ray.wait([a.shutdown.remote() for a in self.actors], num_returns=len(self.actors), timeout=10)
        for a in self.actors:
            ray.kill(a)
        self.actors = []
        if self.pg is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.pg)
            self.pg = None


# Whom a failed round blames, most certain first: a dead process, a peer whose connection to us broke
# (likely dead too), a stuck peer, a worker's own error, a worker that did not answer.
_DIED, _LOST_CONNECTION, _STUCK, _ERROR, _NO_ANSWER = range(5)


class WorkerFailure(Exception):
    """A stage worker died or failed in a way a restart from the last checkpoint can cure."""

    def __init__(self, rank: int, cause: str) -> None:
        super().__init__(f"stage {rank}: {cause}")
        self.rank, self.cause = rank, cause


def train_ray(cfg: Config, run_dir: Path, dataset: Dataset, workers: RayWorkers | None = None,
              resume: tuple[Path, dict] | None = None) -> dict:
    """Train ``cfg`` with one Ray actor per stage; returns the run's summary.

    ``resume``: a checkpoint (directory, manifest) of ``run_dir`` to continue from.
    """
    if cfg.split.stages > 1 and cfg.split.boundaries is None:  # (``train.prepare`` has fixed it already)
        cfg = fixed_split(cfg, dataset)  # once, here: workers timing the blocks each could split differently
    if workers is None:
        with RayWorkers(cfg) as own:
            return train_ray(cfg, run_dir, dataset, own, resume)
    return _RayRun(cfg, Path(run_dir), dataset, workers).run(resume)


class _RayRun:
    """One run on started workers: epochs, checkpoints, and recovery from a lost worker.

    Recovery: when a worker dies (or fails so that its peers cannot go on), every worker is
    restarted (a new placement group, so stages of a lost node land on the nodes left) and
    the run continues from the newest complete checkpoint; at most one checkpoint interval
    of steps is trained again.
    """

    def __init__(self, cfg: Config, run_dir: Path, dataset: Dataset, workers: RayWorkers) -> None:
        # absolute: workers on other nodes resolve paths against their own working directory
        self.cfg, self.run_dir, self.dataset, self.workers = cfg, run_dir.resolve(), dataset, workers
        run_dir.mkdir(parents=True, exist_ok=True)
        self.ray = _ray()
        self.mode = execution_mode(cfg)
        self.timeout = cfg.links.timeout_s
        self.coordinators: list = []
        self.restarts = [0] * workers.size
        self.failures: list[dict] = []
        self.evals: list[dict] = []
        self.steps_done = 0
        self.resumed_from: int | None = None
        self.timed_samples, self.timed_seconds = 0, 0.0
        self.logger: MetricsLogger | None = None
        self.manifests: set[int] = set()
        self.progress = 0  # steps every worker has finished, as last seen

    # ------------------------------------------------------------------ set-up

    def _setup(self, resume: tuple[Path, dict] | None, rescued: dict[int, tuple[Path, int]] | None = None) -> None:
        """Build every worker's stage (from ``resume``'s checkpoint, if any) and the DNI coordinators.

        ``rescued``: rank -> (directory, steps done) of workers whose in-memory state outlived a failure;
        they start from it rather than from the checkpoint.
        """
        rescued = rescued or {}
        ray, cfg = self.ray, self.cfg
        for coordinator in self.coordinators:
            ray.kill(coordinator)
        self.coordinators = []
        if cfg.method.name == "dni" and cfg.method.predictor_training == "coordinator" and cfg.split.stages > 1:
            from .coordinator import PredictorCoordinator

            # One actor per boundary, so no predictor waits behind another's training (or its GIL).
            # num_cpus=0: they share the workers' cores rather than holding cores of their own.
            env = self.workers.worker_env  # the workers' environment (sockets, malloc): they share their cores
            self.coordinators = [ray.remote(PredictorCoordinator).options(
                num_cpus=0, max_concurrency=4, runtime_env={"env_vars": env} if env else None).remote(
                cfg.method.model_dump(mode="json"), self.dataset.num_classes) for _ in range(cfg.split.stages - 1)]
        # Only workers that read inputs get the data; the others get shapes and labels (for step counts).
        full, light = ray.put(self.dataset), ray.put(self.dataset.without_inputs())
        actors = self.workers.actors
        reads = [k == 0 or self.mode in ("ddp", "single") for k in range(len(actors))]
        dirs = [str(rescued[k][0]) if k in rescued else str(resume[0]) if resume is not None else None
                for k in range(len(actors))]
        refs = [a.setup_run.remote(cfg.model_dump(mode="json"), full if r else light, self.coordinators,
                                   str(self.run_dir), d) for a, r, d in zip(actors, reads, dirs)]
        self.infos = self._get_all(refs, cfg.cluster.start_timeout_s, step=None)
        self.active = [a for a, info in zip(actors, self.infos) if "index" in info]
        # which process and node runs each stage now (operators look here; it changes on a restart)
        write_json_atomic(self.run_dir / "workers.json", {
            "stages": [{k: info[k] for k in ("index", "pid", "node", "node_id", "ip", "device")} for info in self.infos
                       if "index" in info],
            "restarts": self.restarts})
        self.per_epoch = steps_per_epoch(cfg, self.dataset, len(self.active) if self.mode == "ddp" else 1)
        self.total = total_steps(cfg, self.dataset, len(self.active) if self.mode == "ddp" else 1)
        # stage 0 reads the data: where it stands is where the run stands
        self.steps_done = rescued[0][1] if 0 in rescued else resume[1]["steps_done"] if resume is not None else 0
        self.progress = self.steps_done
        if not rescued:  # after a rescue the driver's own list stands: it lived through the failure
            self.evals = list(resume[1]["evals"]) if resume is not None else []
        if self.logger is not None:
            self.logger.close()
        # on resume, TensorBoard drops what was logged after the checkpoint: the curves continue from it
        self.logger = MetricsLogger(self.run_dir, cfg.output.tensorboard,
                                    purge_step=self.steps_done + 1 if self.steps_done else None)

    # -------------------------------------------------------------- the run

    def run(self, resume: tuple[Path, dict] | None) -> dict:
        start = time.perf_counter()
        self.resumed_from = resume[1]["steps_done"] if resume is not None else None
        if resume is not None and len(resume[1].get("restarts", [])) == len(self.restarts):
            self.restarts = list(resume[1]["restarts"])  # max_restarts counts over the whole run
        cfg = self.cfg
        try:
            self._setup(resume)
            with StopRequest() as stop:
                while True:
                    try:
                        final_metrics = self._train(stop)
                        break
                    except WorkerFailure as failure:
                        self._recover(failure)
            try:
                self._get_all([a.teardown_run.remote() for a in self.active], self.timeout + 30, self.steps_done)
            except WorkerFailure as failure:  # the training is done and evaluated: say so, keep the results
                print(f"decoupled: {failure} while closing the links; the run itself is complete",
                      file=sys.stderr, flush=True)
        finally:
            if self.logger is not None:
                self.logger.close()
            for coordinator in self.coordinators:
                self.ray.kill(coordinator)
        final = self.evals[-1]
        stage_stats = [_stage_summary(k, s) for k, s in enumerate(final_metrics)]
        losses = [s.get("stage_metrics", {}).get("loss") for s in final_metrics]
        mode = self.mode
        return {
            "name": cfg.name,
            "method": cfg.method.name,
            "label": cfg.method.display_name(),
            "schedule": cfg.method.schedule or mode if cfg.method.name == "backprop" else None,
            "runtime": "ray",
            "stages": cfg.split.stages if mode not in ("single", "ddp") else 1,
            "workers": len(self.active),
            "split": [{"index": k, "blocks": b} for k, b in enumerate(_blocks(cfg))],
            "epochs": len(self.evals),
            "steps": self.steps_done,
            "batch_size": cfg.train.batch_size,
            "samples_per_sec": self.timed_samples / self.timed_seconds if self.timed_seconds > 0 else float("nan"),
            "test_accuracy": final["test_accuracy"],
            "aux_accuracy": final["aux_accuracy"],
            "test_accuracy_per_epoch": [e["test_accuracy"] for e in self.evals],
            "final_loss": next((x for x in reversed(losses) if x is not None), None),
            "wall_seconds": time.perf_counter() - start,
            "peak_memory_mb": max(s["peak_memory_mb"] for s in stage_stats),
            "stage_stats": stage_stats,
            "stage_info": [{k: info[k] for k in ("index", "pid", "node", "node_id", "device")} for info in self.infos
                           if "index" in info],
            "restarts": list(self.restarts),
            "failures": self.failures,
            "resumed_from_step": self.resumed_from,
        }

    def _train(self, stop: StopRequest) -> list[dict]:
        """Epochs from ``steps_done`` to the end; returns the workers' final metrics."""
        ray, cfg = self.ray, self.cfg
        epochs = _epochs(cfg, self.dataset, self.mode, len(self.active))
        progress = tqdm(total=self.total, initial=self.steps_done, desc=f"{cfg.method.display_name()} ray x"
                        f"{len(self.active)}", unit="step", disable=None if cfg.train.progress else True, leave=False)
        epoch_stats: list[dict] = []
        stopping = False
        try:
            owed = epochs if self.steps_done >= self.total else self.steps_done // self.per_epoch
            if len(self.evals) < owed:  # a failure hit while the last epoch was being evaluated
                self.evals.append(_evaluate(lambda refs: self._get_all(refs, self.timeout, self.steps_done),
                                            self.active))
            for epoch in range(self.steps_done // self.per_epoch, epochs):
                if self.steps_done >= self.total:
                    break
                refs = [a.train_epoch.remote(epoch) for a in self.active]
                pending = list(refs)
                while pending:
                    ready, pending = ray.wait(pending, num_returns=len(pending), timeout=cfg.train.metrics_every_s)
                    if ready:
                        self._get_all(ready, self.timeout, self.progress, refs)  # a failure is seen now
                    snapshots = self._get_all([a.metrics.remote() for a in self.active], self.timeout,
                                              self.progress)
                    step = _log_progress(self.logger, snapshots, self.coordinators)
                    self.progress = max(self.progress, min(s.get("last_step", -1) for s in snapshots) + 1)
                    progress.update(max(0, step - progress.n))
                    self._write_manifests(snapshots)
                    if stop.requested and not stopping:
                        stopping = True
                        self._request_stop()
                before = epoch_stats
                epoch_stats = self._get_all(refs, self.timeout, self.progress)
                self.steps_done = min(s["last_step"] for s in epoch_stats) + 1
                if stopping and self.steps_done % self.per_epoch and self.steps_done != self.total:
                    self._manifest(self.steps_done)  # mid-epoch: no evaluation until the epoch is done
                    raise RunStopped(self.run_dir, self.steps_done if self.cfg.checkpoint.enabled else None)
                samples, seconds = _epoch_throughput(epoch_stats, before, self.mode)
                self.timed_samples += samples
                self.timed_seconds += seconds
                result = _evaluate(lambda refs: self._get_all(refs, self.timeout, self.steps_done), self.active)
                self.evals.append(result)
                values = {"test/accuracy": result["test_accuracy"]}
                if seconds > 0:
                    values["throughput/samples_per_sec"] = samples / seconds
                values.update({f"test/aux_accuracy_stage{k}": a for k, a in enumerate(result["aux_accuracy"])
                               if a is not None})
                values.update({f"recovery/restarts_stage{k}": n for k, n in enumerate(self.restarts)})
                self.logger.scalars(self.steps_done, values)
                progress.set_description(f"{cfg.method.display_name()} ray x{len(self.active)} "
                                         f"test acc {result['test_accuracy']:.3f}")
                self._manifest(self.steps_done)  # the epoch's end, with its evaluation
                if stop.requested and self.steps_done < self.total:
                    raise RunStopped(self.run_dir, self.steps_done if self.cfg.checkpoint.enabled else None)
            return self._get_all([a.metrics.remote() for a in self.active], self.timeout, self.steps_done)
        finally:
            progress.close()

    # ------------------------------------------------------------ checkpoints

    def _write_manifests(self, snapshots: list[dict]) -> None:
        """Mid-epoch checkpoints that every worker has written become complete (epoch ends wait for
        their evaluation)."""
        if not self.cfg.checkpoint.enabled or not snapshots or not all(s for s in snapshots):
            return
        common = set.intersection(*(set(s.get("checkpoints", ())) for s in snapshots))
        for steps_done in sorted(common - self.manifests):
            if steps_done % self.per_epoch and steps_done != self.total:
                self._manifest(steps_done)

    def _manifest(self, steps_done: int) -> None:
        if not self.cfg.checkpoint.enabled or steps_done in self.manifests:
            return
        checkpoint.write_manifest(self.run_dir, steps_done, len(self.active), runtime="ray", mode=self.mode,
                                  method=self.cfg.method.display_name(), evals=self.evals,
                                  restarts=self.restarts)
        self.manifests.add(steps_done)
        checkpoint.prune(self.run_dir, self.cfg.checkpoint.keep)

    def _request_stop(self) -> None:
        """Ask the workers to end the epoch after the current step; the epoch's end writes the checkpoint."""
        self._get_all([a.request_stop.remote() for a in self.active], self.timeout, self.progress)

    # --------------------------------------------------------------- failures

    def _get_all(self, refs: list, timeout: float, step: int | None, all_refs: list | None = None) -> list:
        """``ray.get`` that turns a lost or failed worker into ``WorkerFailure`` (or re-raises what a restart
        cannot cure: bad input, non-finite numbers), blaming a dead process over the peers it left waiting."""
        ray = self.ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        try:
            return ray.get(refs, timeout=timeout)
        except (RayActorError, RayTaskError, GetTimeoutError):
            pass
        # find the culprit: give every call of this round a moment to finish or fail
        candidates = all_refs or refs
        ray.wait(candidates, num_returns=len(candidates), timeout=min(5.0, timeout))
        ranks = [self._rank_of(i, len(candidates)) for i in range(len(candidates))]
        failures = [f for ref, rank in zip(candidates, ranks) if (f := self._failure_of(ref, rank)) is not None]
        if failures and min(failures)[0] == _LOST_CONNECTION:
            # A peer's connection to us broke, but its own call has not failed (yet): Ray can take longer
            # than the moment above to notice a killed process on a loaded host. Wait for it to say so.
            blamed = min(failures)[1]
            own = [ref for ref, rank in zip(candidates, ranks) if rank == blamed]
            if own and not ray.wait(own, timeout=0)[0]:
                ray.wait(own, timeout=min(30.0, timeout))
                if (seen := self._failure_of(own[0], blamed)) is not None:
                    failures.append(seen)
        if not failures:  # nobody failed, somebody did not answer: blame the first of those
            late = next((i for i, ref in enumerate(candidates) if not ray.wait([ref], timeout=0)[0]), 0)
            failures.append((_NO_ANSWER, ranks[late], f"no answer within {timeout:g} s"))
        _, rank, cause = min(failures)
        raise WorkerFailure(rank, f"{cause} (at step {step})" if step is not None else cause)

    def _failure_of(self, ref, rank: int) -> tuple[int, int, str] | None:
        """(blame priority, blamed rank, cause) of a failed call; None while it runs or when it
        succeeded. Raises what a restart cannot cure."""
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        try:
            self.ray.get(ref, timeout=0)
        except RayActorError as err:
            return _DIED, rank, f"worker process died ({type(err).__name__}: {_first_line(err)})"
        except RayTaskError as err:
            cause = err.cause
            if isinstance(cause, (NonFiniteError, ConfigError, checkpoint.CheckpointError, RunFailed)):
                raise cause from None
            if isinstance(cause, LinkTimeout) and cause.peer is not None:  # the stuck peer is to blame
                return _STUCK, cause.peer, f"stuck: {cause}"
            if isinstance(cause, LinkClosed) and cause.peer is not None:  # its connection to us broke
                return _LOST_CONNECTION, cause.peer, f"connection lost: {cause}"
            return _ERROR, rank, f"{type(cause).__name__}: {cause}"
        except GetTimeoutError:
            return None
        return None

    def _rank_of(self, i: int, n: int) -> int:
        if n == len(self.workers.actors):
            return i
        ranks = [k for k, info in enumerate(getattr(self, "infos", [])) if "index" in info] or list(range(n))
        return ranks[i] if i < len(ranks) else i

    def _recover(self, failure: WorkerFailure) -> None:
        """Restart every worker and go on from the newest checkpoint (and the survivors' own state).

        A failure while restarting counts as one more failure of the stage it names."""
        rescued = self._rescue(failure.rank)
        while True:
            rank = failure.rank
            self.restarts[rank] += 1
            found = checkpoint.latest(self.run_dir) if self.cfg.checkpoint.enabled else None
            self.failures.append({"stage": rank, "steps_done": self.progress, "cause": failure.cause,
                                  "checkpoint_step": found[1]["steps_done"] if found else 0,
                                  "kept_in_memory": sorted(rescued), "time": time.time()})
            limit = self.cfg.recovery.max_restarts
            if self.restarts[rank] > limit:
                raise RunFailed(f"stage {rank} failed {self.restarts[rank]} times (recovery.max_restarts: {limit}); "
                                f"last failure near step {self.progress}: {failure.cause}")
            where = f"the checkpoint after step {found[1]['steps_done']}" if found else "the start (no checkpoint yet)"
            if rescued:
                where = f"{where}; stage(s) {sorted(rescued)} keep their in-memory state"
            print(f"decoupled: {failure}; restarting the workers from {where} "
                  f"(restart {self.restarts[rank]} of {limit} for stage {rank})", file=sys.stderr, flush=True)
            try:
                self.workers.restart()
            except ConfigError as err:  # a lost node took resources the run needs
                raise RunFailed(f"stage {rank} failed near step {self.progress} ({failure.cause}) and the "
                                f"cluster can no longer hold the run: {err}") from None
            except RuntimeError as err:
                raise RunFailed(f"stage {rank} failed near step {self.progress} ({failure.cause}); "
                                f"restarting the workers failed: {err}") from None
            self.manifests.clear()
            try:
                self._setup(found, rescued)
                break
            except WorkerFailure as again:
                failure = again
        for directory, _ in rescued.values():
            shutil.rmtree(directory, ignore_errors=True)

    def _rescue(self, failed: int) -> dict[int, tuple[Path, int]]:
        """Decoupled modes: save the surviving workers' in-memory state (newer than any checkpoint)."""
        if self.mode != "decoupled" or not self.cfg.checkpoint.enabled:
            return {}
        directory = checkpoint.root(self.run_dir) / f"rescue-{sum(self.restarts)}"
        refs = {k: a.rescue.remote(str(directory), 10.0) for k, a in enumerate(self.active) if k != failed}
        self.ray.wait(list(refs.values()), num_returns=len(refs), timeout=30)  # all together, not one by one
        out = {}
        for k, ref in refs.items():
            try:
                steps_done = self.ray.get(ref, timeout=0)
            except Exception:  # lost as well (or too slow): it starts from the checkpoint
                continue
            if steps_done is not None:
                out[k] = (directory, steps_done)
        return out


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
    """Samples after warm-up and the wall time they took: from stage 0's first timed step (and, in a
    pipeline, the last stage's last warm-up step: ``warm_end``) to the last stage's end."""
    prev = [s["timed_samples"] for s in before] if before else [0] * len(stats)
    firsts = [s["epoch_first"] for s in stats if s.get("epoch_first") is not None]
    if not firsts:
        return 0, 0.0
    end = max(s["epoch_end"] for s in stats)
    if mode == "ddp":  # every replica draws its own samples
        return sum(s["timed_samples"] - p for s, p in zip(stats, prev)), end - min(firsts)
    if stats[0].get("epoch_first") is None:
        return 0, 0.0
    start = max(stats[0]["epoch_first"], stats[-1].get("warm_end") or 0.0)  # an earlier epoch's is older
    return stats[0]["timed_samples"] - prev[0], end - start


def _evaluate(get, actors: list) -> dict:
    results = [r for r in get([a.evaluate.remote() for a in actors]) if r]
    final = next(r for r in results if r["is_last"])
    aux = [r["aux_correct"] / r["count"] if r["has_aux"] else None for r in results if not r["is_last"]]
    return {"test_accuracy": final["correct"] / final["count"], "aux_accuracy": aux}


def _fractions(s: dict) -> dict[str, float]:
    total = sum(s[k] for k in _STAGE_KEYS) or 1.0
    return {f"{k[:-2]}_fraction": s[k] / total for k in _STAGE_KEYS}  # compute_s -> compute_fraction


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _log_progress(logger: MetricsLogger, snapshots: list[dict], coordinators: list) -> int:
    """Write each stage's counters to TensorBoard at stage 0's step; returns that step."""
    step = snapshots[0].get("last_step", -1) + 1  # the run's step (it goes on across resumes and restarts)
    values: dict[str, float] = {}
    coord = {}
    for k, coordinator in enumerate(coordinators):
        try:
            coord.update(_ray().get(coordinator.stats.remote(), timeout=30))
        except Exception as err:  # its stage k learns nothing more: restart like a lost worker
            raise WorkerFailure(k, f"the DNI coordinator of boundary {k} failed: {_first_line(err)}") from None
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
