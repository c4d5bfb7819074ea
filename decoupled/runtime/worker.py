"""One stage's process in the Ray runtime: its Stage, its links, and the loop its rule needs.

The worker learns nothing itself: ``Stage.step`` and ``Stage.apply`` (the same code as
in-process) do. What the worker adds is *when* things happen, so that no stage waits on
a later one unless its rule needs it:

- ``dgl``: step, send on, next batch (optionally fed from a replay buffer);
- ``dni``: step with the predicted gradient, send on; send (h, y, dL/dh) samples to the
  coordinator (or, ``predictor_training: local``, the gradient back upstream); pick up
  fresh predictor weights when they are there, never waiting for them;
- ``dfa``: step, send on; apply the output errors as they come back, holding at most
  ``max_in_flight`` graphs;
- ``backprop`` (naive), ``fa``, ``sign_symmetric``: wait for the gradient of each batch;
- ``backprop`` with ``gpipe``/``1f1b``/``ddp``/``single``: the synchronous schedules.

Time is accounted per stage as compute, waiting for input, waiting to send and waiting
for feedback; the driver turns it into fractions.
"""

from __future__ import annotations

import collections
import os
import random
import socket
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from .. import checkpoint
from ..config import Config, build_config
from ..data import Dataset, iterate_batches
from ..metrics import PeakMemory
from ..pipeline import build_stages, steps_per_epoch, total_steps
from ..rules import Feedback
from .links import (DATA, EPOCH_END, EVAL, EVAL_END, STOP, LinkAborted, RecvLink, SendLink, abort_waits, aborted,
                    allow_waits, link_groups)
from .replay import ReplayBuffer


def execution_mode(cfg: Config) -> str:
    """``decoupled`` for the local rules, else the E2EBP schedule (naive also serves fa/sign_symmetric)."""
    if cfg.method.name == "backprop":
        return cfg.method.schedule or ("naive" if cfg.split.stages > 1 else "single")
    if cfg.method.name in ("fa", "sign_symmetric"):
        return "naive"
    return "decoupled"


def single_stage(cfg: Config) -> Config:
    """The same config with the whole model in one stage (single-worker and data-parallel baselines)."""
    data = cfg.model_dump(mode="json")
    data["split"] = {"stages": 1, "balance": cfg.split.balance}
    data["runtime"] = "ray"
    data["method"]["schedule"] = None  # the schedule is the worker's business; the stage just does backprop
    data["compare"] = None
    return build_config(data)


class StageWorker:
    """Runs inside a Ray actor (see ray_runtime.py); one per stage."""

    def __init__(self, rank: int, world_size: int, threads: int | None) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.rank, self.world_size = rank, world_size
        self.groups: dict = {}
        self.links: dict[str, object] = {}
        self.stats: dict = {}
        self.epoch_lock = threading.Lock()  # held while an epoch runs: ``rescue`` reads the state only without it

    # ------------------------------------------------------------------ set-up

    def where(self) -> dict:
        gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
        return {"pid": os.getpid(), "node": socket.gethostname(), "node_id": _node_id(), "ip": _node_ip(),
                "gpus": gpus, "glibc_tunables": os.environ.get("GLIBC_TUNABLES")}

    def open_store(self, address: str, timeout_s: float) -> int:
        """Rank 0: the rendezvous store, listening on ``address`` only (not every interface); returns its port.

        The socket is bound here and handed to the store, so no other process can take the port between.
        """
        self.store_socket = socket.socket()
        self.store_socket.bind((address, 0))
        self.store_socket.listen()
        port = self.store_socket.getsockname()[1]
        self.store = dist.TCPStore(address, port, self.world_size, True, timedelta(seconds=timeout_s),
                                   wait_for_workers=False, master_listen_fd=self.store_socket.fileno())
        return port

    def init_process_group(self, address: str, port: int, backend: str, start_timeout_s: float,
                           op_timeout_s: float) -> None:
        timeout = timedelta(seconds=start_timeout_s)
        store = self.store if self.rank == 0 else dist.TCPStore(address, port, self.world_size, False, timeout)
        dist.init_process_group(backend, store=store, rank=self.rank, world_size=self.world_size,
                                timeout=timedelta(seconds=op_timeout_s))
        self.groups = link_groups(self.world_size)
        # lockstep schedules agree on a stop over this (gloo: a one-number all-reduce per step)
        self.control = dist.new_group(backend="gloo", timeout=timedelta(seconds=op_timeout_s))

    def setup_run(self, cfg_data: dict, dataset: Dataset, coordinators: list | None = None,
                  run_dir: str | None = None, resume_dir: str | None = None) -> dict:
        """Build this worker's stage for one run and open the links its mode needs.

        ``run_dir``: where checkpoints go (None: none); ``resume_dir``: a checkpoint to start from.
        """
        self.cfg = cfg = build_config(cfg_data)
        self.mode = execution_mode(cfg)
        allow_waits()
        self.device = _device(cfg)
        self.dataset = dataset
        self.coordinators = coordinators or []  # DNI: the predictor coordinator of each boundary
        self.active = self.mode not in ("single",) or self.rank == 0
        self.step_count = 0
        self.generator = torch.Generator().manual_seed(cfg.seed)  # the same batch order as in-process
        self.rng = random.Random(cfg.seed * 7919 + self.rank)  # which steps DNI samples to the coordinator
        self.stats = _new_stats()
        self.outstanding: list = []  # coordinator submissions not yet done (bounded: never wait for them)
        self.weights_ref = None
        self.predictor_version = 0
        self.predictor_fingerprint = None
        self.step_log: collections.deque = collections.deque(maxlen=100_000)  # (step, start, end) wall times
        # (step, seconds computed in it): a pipeline stage's whole share of the step, naive's backward too
        self.compute_log: collections.deque = collections.deque(maxlen=100_000)
        self.run_dir = Path(run_dir) if run_dir and cfg.checkpoint.enabled else None
        self.saved: collections.deque = collections.deque(maxlen=32)  # steps_done of the checkpoints written
        self.stop_requested = False  # request_stop: end the epoch after the current step
        self.skip = 0  # batches of the current epoch trained before the checkpoint resumed from
        self.epoch_generator = self.generator.get_state()
        self.last_step = -1  # global id of the last step this worker finished
        if not self.active:
            return self.where()
        stage_cfg = single_stage(cfg) if self.mode in ("single", "ddp") else cfg
        index = 0 if self.mode in ("single", "ddp") else self.rank
        self.plans, (self.stage,) = build_stages(stage_cfg, dataset, self.device, [index])
        self.total_steps = total_steps(cfg, dataset, self.replicas)
        self.per_epoch = steps_per_epoch(cfg, dataset, self.replicas)
        self.memory = PeakMemory(self.device, process_peak=True)
        self._open_links()
        if self.mode in ("gpipe", "1f1b"):
            from .schedules import PipelineSchedule

            self.schedule = PipelineSchedule(self.mode, self.stage, cfg.method.microbatches, cfg.train.batch_size)
        elif self.mode == "ddp":
            from .schedules import DataParallel

            self.schedule = DataParallel(self.stage)
        self.replay = None
        if cfg.method.name == "dgl" and cfg.method.replay_buffer and self.rank > 0:
            self.replay = ReplayBuffer(cfg.method.replay_buffer, cfg.method.replay_max_reuse)
        if resume_dir is not None:  # before DNI registers its predictor: the coordinator starts from these weights
            self._restore(Path(resume_dir))
        if cfg.method.name == "dni" and not self.stage.is_last:
            local = cfg.method.predictor_training == "local"
            self.stage.rule.train_predictor_locally = local
            if not local:
                import ray

                predictor = self.stage.rule.extra["predictor"]
                state = {k: v.cpu() for k, v in predictor.state_dict().items()}
                coordinator = self.coordinators[self.stage.index]
                ray.get(coordinator.register.remote(self.stage.index, predictor.shape, predictor.hidden, state),
                        timeout=cfg.links.timeout_s)
                self.predictor_fingerprint = self._fingerprint()
        return {**self.where(), "device": _describe(self.device), "index": self.rank}

    def _open_links(self) -> None:
        cfg, k, last = self.cfg, self.rank, self.world_size - 1
        m, t, dev = cfg.links.max_in_flight, cfg.links.timeout_s, self.device
        if self.mode in ("single", "ddp"):
            return
        plan = self.plans[k]
        feedback = self.stage.rule.feedback
        backward = self.mode == "naive" or (
            feedback is Feedback.PREDICTOR_TARGET and cfg.method.predictor_training == "local"
        )
        links: dict[str, object] = {}
        if k > 0:
            links["fwd_in"] = RecvLink(f"stage{k - 1}->stage{k}", k - 1, self.groups[("fwd", k - 1)], m, t,
                                       plan.input_shape, labels=True, device=dev)
        if k < last:
            links["fwd_out"] = SendLink(f"stage{k}->stage{k + 1}", k + 1, self.groups[("fwd", k)], m, t)
        if backward and k < last:
            links["bwd_in"] = RecvLink(f"stage{k + 1}->stage{k} (gradient)", k + 1, self.groups[("bwd", k)], m, t,
                                       plan.output_shape, device=dev)
        if backward and k > 0:
            links["bwd_out"] = SendLink(f"stage{k}->stage{k - 1} (gradient)", k - 1, self.groups[("bwd", k - 1)],
                                        m, t)
        if feedback is Feedback.OUTPUT_ERROR and self.mode == "decoupled":
            classes = (self.dataset.num_classes,)
            if k == last:
                for j in range(last):
                    links[f"err_out{j}"] = SendLink(f"stage{last}->stage{j} (error)", j, self.groups[("err", j)],
                                                    m, t)
            else:
                links["err_in"] = RecvLink(f"stage{last}->stage{k} (error)", last, self.groups[("err", k)], m, t,
                                           classes, device=dev)
        if self.mode in ("gpipe", "1f1b") and k in (0, last):
            group = self.groups[("labels", 0)]
            links["labels"] = (SendLink("labels stage0->last", last, group, m, t) if k == 0 else
                               RecvLink("labels stage0->last", 0, group, m, t, (), torch.int64, device=dev))
        self.links = links

    def teardown_run(self) -> None:
        """Stop every link (STOP goes out on each send link; receive threads end on the peer's STOP)."""
        for link in self.links.values():
            if isinstance(link, SendLink):
                link.close()
        for link in self.links.values():
            if isinstance(link, RecvLink):
                msg = link.recv(timeout_s=self.cfg.links.timeout_s)
                while msg.kind != STOP:
                    msg = link.recv(timeout_s=self.cfg.links.timeout_s)
        self.links = {}

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    # ---------------------------------------------------------------- metrics

    def metrics(self) -> dict:
        """A snapshot of this stage's counters (read while the stage trains: the actor is threaded)."""
        snap = dict(self.stats)
        if not self.active:
            return snap
        snap["checkpoints"] = list(self.saved)
        snap["last_step"] = self.last_step
        snap["queue_depth"] = self.links["fwd_in"].depth if "fwd_in" in self.links else 0
        snap["stage_metrics"] = {k: float(v) for k, v in list(self.stage.metrics.items())}
        snap["predictor_version"] = self.predictor_version
        self.memory.sample()
        snap["peak_memory_mb"] = self.memory.mb
        return snap

    def steps_timeline(self) -> list[tuple[int, float, float]]:
        """(step, start, end) wall-clock times of this stage's training steps in the last run."""
        return list(self.step_log)

    def steps_compute(self) -> list[tuple[int, float]]:
        """(step, seconds) this pipeline stage computed in each training step of the last run (naive
        model parallel: its forward, backward and update; waits not counted)."""
        return list(self.compute_log)

    # ---------------------------------------------------------------- training

    def train_epoch(self, epoch: int) -> dict:
        """Run one epoch; returns this stage's timings for the driver's throughput figure."""
        if not self.active:
            return {}
        self.stats["epoch_first"] = None
        steps = self._epoch_steps()
        with self.epoch_lock:
            if aborted():  # a rescue came first: this epoch must not touch the state it saves
                raise LinkAborted(f"stage {self.rank}: stopped before epoch {epoch}")
            if self.mode == "decoupled" or self.mode == "naive":
                self._train_pipeline(steps)
            elif self.mode in ("gpipe", "1f1b"):
                self._train_schedule(steps)
            else:  # single, ddp
                self._train_local(steps)
        if self.device.type == "cuda":  # this thread's stream only: a link thread may have a receive posted
            torch.cuda.current_stream(self.device).synchronize()
        self.stats["epoch_end"] = time.time()
        self.skip = 0
        if self.run_dir is not None and self.last_step >= 0:  # the epoch's end, or where request_stop ended it
            self._save_checkpoint(self.last_step + 1)  # (nothing if its last step already wrote it)
        return {**self.stats, "last_step": self.last_step}

    def request_stop(self) -> None:
        """End the current epoch after the step now running (stage 0 decides for the pipelines, all
        workers together for the lockstep schedules); later stages end with it. The epoch's end
        writes a checkpoint."""
        self.stop_requested = True

    def rescue(self, directory: str, wait_s: float) -> int | None:
        """A peer failed: end this worker's epoch and save its in-memory state to ``directory``.

        Decoupled stages owe their neighbours nothing, so a survivor keeps what it learned
        since the last checkpoint (feedback still owed for earlier steps is dropped: it will
        not come). Returns the steps this state has done, or None if it cannot be saved
        (another mode, or the epoch did not end within ``wait_s``).
        """
        if not self.active or self.mode != "decoupled":
            return None
        abort_waits()  # every link wait of the epoch ends now; the step being computed finishes first
        if not self.epoch_lock.acquire(timeout=wait_s):
            return None
        try:
            steps_done = self.last_step + 1
            self.stage.drop_pending()
            checkpoint.save_worker(Path(directory), self.rank, self._state(steps_done))
            return steps_done
        finally:
            self.epoch_lock.release()

    def _keep_going(self) -> bool:
        """Whether to start another step: called once per step by every worker that draws steps."""
        if self.mode not in ("gpipe", "1f1b", "ddp"):
            return not self.stop_requested
        # lockstep: every worker must stop after the same step, so they agree (MAX of the flags)
        flag = torch.tensor([int(self.stop_requested)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.control)
        return not bool(flag.item())

    @property
    def replicas(self) -> int:
        return self.world_size if self.mode == "ddp" else 1

    def _epoch_steps(self) -> int:
        """Batches stage 0 (each replica, for ddp) draws this epoch: the same count on every worker."""
        return max(0, min(self.per_epoch - self.skip, self.total_steps - self.step_count))

    def _loader(self, steps: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Stage 0's batches (data-parallel workers: their shard of each epoch's permutation)."""
        d, bs = self.dataset, self.cfg.train.batch_size
        x, y = d.train_x, d.train_y
        self.epoch_generator = self.generator.get_state()  # a checkpoint mid-epoch resumes from here
        if self.mode == "ddp":
            order = torch.randperm(len(y), generator=self.generator)[self.rank :: self.world_size]
            x, y = x[order], y[order]
        batches = iterate_batches(x, y, bs, shuffle=self.mode != "ddp", generator=self.generator,
                                  augment=d.augment, drop_last=True)
        for _ in range(self.skip):  # resumed mid-epoch: the same order, minus the batches already trained on
            next(batches, None)
        for _, (xb, yb) in zip(range(steps), batches):
            if not self._keep_going():
                return
            yield self.step_count, xb.to(self.device), yb.to(self.device)
            self.step_count += 1

    def _timed(self, key: str, start: float) -> float:
        now = time.perf_counter()
        self.stats[key] += now - start
        return now

    def _count_step(self, step: int, samples: int) -> None:
        """Count a finished step; steps from ``warmup_steps`` on count toward throughput."""
        s = self.stats
        s["steps"] += 1
        s["samples"] += samples
        warmup = min(self.cfg.train.warmup_steps, self.total_steps - 1)
        if step >= warmup:
            if s["epoch_first"] is None:
                s["epoch_first"] = s["step_started"]
            s["timed_samples"] += samples
        elif step == warmup - 1 and self.mode in ("decoupled", "naive") and self.replay is None:
            # a later pipeline stage's own first steps are slow too (a ResNet's last stage: 0.5 s against
            # 0.12 s), and stage 0 may be steps ahead of it: the timing waits until it is warm as well
            s["warm_end"] = time.time()

    def _inputs(self, steps: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """This stage's training inputs for one epoch, with the time spent waiting for them."""
        if self.rank == 0:
            t = time.perf_counter()
            for step, x, y in self._loader(steps):
                t = self._timed("wait_input_s", t)
                self.stats["step_started"] = time.time()
                yield step, x, y
                t = time.perf_counter()
            return
        link = self.links["fwd_in"]
        while True:
            t = time.perf_counter()
            msg = self._next_input(link)
            self._timed("wait_input_s", t)
            if msg is None:
                return
            self.stats["step_started"] = time.time()
            yield msg

    def _next_input(self, link) -> tuple[int, torch.Tensor, torch.Tensor] | None:
        """The next (step, x, y), from the link or the replay buffer; None at the epoch's end."""
        if self.replay is None:
            msg = link.recv(step=self.stats["steps"])
            if msg.kind == EPOCH_END:
                self.last_step = msg.step  # the epoch's (or the stop's) last step, from stage 0
                return None
            _expect(msg.kind, DATA, self.rank)
            return msg.step, msg.tensor, msg.labels
        while True:
            while (msg := link.poll()) is not None:  # everything fresh goes into the buffer first
                if msg.kind == EPOCH_END:
                    self.last_step = msg.step  # the epoch's (or the stop's) last step, from stage 0
                    return None
                _expect(msg.kind, DATA, self.rank)
                self.replay.add((msg.step, msg.tensor, msg.labels))
            taken = self.replay.take()
            if taken is not None:
                item, used_before = taken
                self.stats["replayed_steps"] += used_before > 0
                self.fresh = used_before == 0
                return item
            msg = link.recv(step=self.stats["steps"])  # all used up: wait for something new
            if msg.kind == EPOCH_END:
                self.last_step = msg.step
                return None
            _expect(msg.kind, DATA, self.rank)
            self.replay.add((msg.step, msg.tensor, msg.labels))

    def _train_pipeline(self, steps: int) -> None:
        stage, links, last = self.stage, self.links, self.stage.is_last
        feedback = stage.rule.feedback
        pending = 0  # forward passes still waiting for their feedback (dfa, local dni)
        step = -1
        delay = self.cfg.train.stage_delay_s.get(self.rank, 0.0)
        for step, x, y in self._inputs(steps):
            computed = self.stats["compute_s"]
            t = time.perf_counter()
            result = stage.step(x, y)
            if delay:
                time.sleep(delay)  # a simulated straggler: counts as compute
            t = self._timed("compute_s", t)
            if self.mode == "decoupled":  # the update is in: a rescue from here on keeps this step
                self.last_step = max(self.last_step, step)  # (a replayed input is an older step)
            self.step_log.append((step, self.stats["step_started"], time.time()))
            if not last:
                self.stats["wait_send_s"] += links["fwd_out"].send(step, result.output, y)
            self._count_step(step, x.shape[0])
            if self.mode == "naive":
                self._naive_backward(step, result)
            elif feedback is Feedback.OUTPUT_ERROR:
                pending = self._dfa_feedback(step, result, pending)
            elif feedback is Feedback.PREDICTOR_TARGET:
                pending = self._dni_feedback(step, x, y, result, pending)
            if self._checkpoint_due(step) and (self.replay is None or self.fresh):
                while pending:  # a checkpoint holds no half-done step: apply the feedback still owed
                    pending = self._drain_feedback(pending, block=True)
                self._save_checkpoint(step + 1)
            if self.mode == "naive":  # its backward is done too
                self.last_step = step
            self.compute_log.append((step, self.stats["compute_s"] - computed))
        # the epoch's end: apply what is still owed, then tell the next stage
        while pending:
            pending = self._drain_feedback(pending, block=True)
        if not last:
            links["fwd_out"].mark(EPOCH_END, self.last_step)  # stage 0's last step, passed on as received

    def _naive_backward(self, step: int, result) -> None:
        links = self.links
        if self.stage.is_last:
            self.stats["wait_send_s"] += links["bwd_out"].send(step, result.feedback)
            return
        t = time.perf_counter()
        msg = links["bwd_in"].recv(step=step)
        t = self._timed("wait_feedback_s", t)
        grad = self.stage.apply(msg.tensor)
        self._timed("compute_s", t)
        if "bwd_out" in links:
            self.stats["wait_send_s"] += links["bwd_out"].send(step, grad)

    def _dfa_feedback(self, step: int, result, pending: int) -> int:
        if self.stage.is_last:
            for name, link in self.links.items():
                if name.startswith("err_out"):
                    self.stats["wait_send_s"] += link.send(step, result.feedback)
            return 0
        return self._drain_feedback(pending + 1, block=False)

    def _dni_feedback(self, step: int, x: torch.Tensor, y: torch.Tensor, result, pending: int) -> int:
        cfg, k = self.cfg.method, self.stage.index
        if k > 0:  # our input gradient is predictor k-1's training target
            if cfg.predictor_training == "local":
                self.stats["wait_send_s"] += self.links["bwd_out"].send(step, result.feedback)
            elif self.rng.random() < cfg.predictor_sample_rate:
                self._submit_sample(k - 1, x, y, result.feedback)
        if self.stage.is_last:
            return 0
        if cfg.predictor_training == "local":
            return self._drain_feedback(pending + 1, block=False)
        self._pick_up_predictor(ask=self.stats["steps"] % cfg.predictor_push_every == 0)
        return 0

    def _drain_feedback(self, pending: int, block: bool) -> int:
        """Apply arrived feedback; wait only while more than ``max_in_flight`` graphs are held (or ``block``)."""
        link = self.links.get("err_in") or self.links["bwd_in"]
        bound = self.cfg.links.max_in_flight
        while pending:
            must_wait = block or pending > bound
            t = time.perf_counter()
            msg = link.recv(step=self.stats["steps"]) if must_wait else link.poll()
            t = self._timed("wait_feedback_s", t)
            if msg is None:
                break
            _expect(msg.kind, DATA, self.rank)
            self.stage.apply(msg.tensor)
            self._timed("compute_s", t)
            pending -= 1
        return pending

    # ------------------------------------------------------- DNI coordinator

    def _submit_sample(self, boundary: int, h: torch.Tensor, y: torch.Tensor, grad: torch.Tensor) -> None:
        """Send a (h, y, dL/dh) triple to the coordinator; drop it if earlier ones are still queued."""
        import ray

        if self.outstanding:
            _, self.outstanding = ray.wait(self.outstanding, num_returns=len(self.outstanding), timeout=0)
        if len(self.outstanding) >= self.cfg.method.predictor_max_outstanding:
            self.stats["dropped_samples"] += 1
            return
        self.outstanding.append(self.coordinators[boundary].submit.remote(boundary, h.cpu(), y.cpu(), grad.cpu()))
        self.stats["sent_samples"] += 1

    def _fingerprint(self) -> float:
        return float(sum(p.detach().double().sum() for p in self.stage.rule.extra["predictor"].parameters()))

    def _pick_up_predictor(self, ask: bool) -> None:
        """Load the weights an earlier request brought back, and (``ask``) request newer ones; never wait.

        Asking again right after a load makes the next reply ready a step later rather than
        two: every step of lag is a step of staleness in the synthetic gradients. The
        predictor must change only here: a fingerprint taken after each load is checked
        before the next one, and a mismatch is counted (``predictor_local_changes``).
        """
        import ray

        if self.weights_ref is not None:
            ready, _ = ray.wait([self.weights_ref], timeout=0)
            if not ready:
                return
            self._load_predictor(ray.get(self.weights_ref))
            self.weights_ref = None
        if ask:
            self.weights_ref = self.coordinators[self.stage.index].weights.remote(self.stage.index, self.predictor_version)

    def _load_predictor(self, reply) -> None:
        if reply is not None:
            version, state = reply
            if self._fingerprint() != self.predictor_fingerprint:
                self.stats["predictor_local_changes"] += 1
            self.stage.rule.extra["predictor"].load_state_dict(state)
            self.predictor_version = version
            self.predictor_fingerprint = self._fingerprint()
            self.stats["predictor_loads"] += 1

    # ------------------------------------------------------------ checkpoints

    def _checkpoint_due(self, step: int) -> bool:
        return self.run_dir is not None and checkpoint.is_checkpoint_step(
            step, self.cfg.checkpoint.every_steps, self.per_epoch, self.total_steps)

    def _finish_step(self, step: int) -> None:
        """Lockstep schedules and single workers: the step is whole on every worker here."""
        self.last_step = step
        if self._checkpoint_due(step):
            self._save_checkpoint(step + 1)

    def _save_checkpoint(self, steps_done: int) -> None:
        """This worker's file of the checkpoint after ``steps_done`` steps; the driver writes the manifest."""
        if self.saved and steps_done <= self.saved[-1]:
            return  # a replay stage meeting an older step again: that checkpoint is written (and may be complete)
        t = time.perf_counter()
        checkpoint.save_worker(checkpoint.step_dir(self.run_dir, steps_done), self.rank, self._state(steps_done))
        self.saved.append(steps_done)
        self.stats["checkpoint_s"] += time.perf_counter() - t

    def _state(self, steps_done: int) -> dict:
        return {
            "rank": self.rank, "mode": self.mode, "steps_done": steps_done,
            "stages": [self.stage.state_dict()],
            # at an epoch's end the next epoch's order comes from the generator as it is now
            "epoch_generator": self.generator.get_state() if steps_done % self.per_epoch == 0 else self.epoch_generator,
            "sample_rng": list(self.rng.getstate()[1]),  # which steps DNI samples: a tuple of ints
            "replay": self.replay.state_dict() if self.replay is not None else None,
        }

    def _restore(self, directory: Path) -> None:
        state = checkpoint.load_worker(directory, self.rank)
        if state["mode"] != self.mode:
            raise checkpoint.CheckpointError(f"{directory}: worker {self.rank} was saved in {state['mode']} mode, "
                                             f"this run is {self.mode}")
        self.stage.load_state_dict(state["stages"][0])
        self.step_count = state["steps_done"]
        self.last_step = self.step_count - 1
        self.skip = self.step_count % self.per_epoch
        self.generator.set_state(state["epoch_generator"])
        self.rng.setstate((3, tuple(state["sample_rng"]), None))
        if self.replay is not None and state["replay"] is not None:
            self.replay.load_state_dict(state["replay"])

    # ----------------------------------------------------- E2EBP schedules

    def _train_schedule(self, steps: int) -> None:
        """GPipe / 1F1B: every worker runs the same number of steps; labels go from stage 0 to the last."""
        k, last = self.rank, self.world_size - 1
        source = self._loader(steps) if k == 0 else self._step_ids(steps)
        t = time.perf_counter()
        for step, x, y in source:
            if k == 0:
                self.stats["wait_send_s"] += self.links["labels"].send(step, y)
            elif k == last:
                y = self.links["labels"].recv(step=step).tensor
            self.stats["step_started"] = time.time()
            t = self._timed("wait_input_s", t)
            loss = self.schedule.step(x, y)
            t = self._timed("compute_s", t)
            self.step_log.append((step, self.stats["step_started"], time.time()))
            if k != 0:
                self.step_count += 1
            if loss is not None:
                self.stage.metrics["loss"] = loss
            self._count_step(step, self.cfg.train.batch_size)
            self._finish_step(step)

    def _step_ids(self, steps: int) -> Iterator[tuple[int, None, None]]:
        """Pipeline ranks after the first: this epoch's step ids (the data comes through the schedule)."""
        first = self.step_count  # read once: the schedule loop advances step_count
        for i in range(steps):
            if not self._keep_going():
                return
            yield first + i, None, None

    def _train_local(self, steps: int) -> None:
        """The whole model on this worker: single-worker baseline, or one data-parallel replica."""
        t = time.perf_counter()
        for step, x, y in self._loader(steps):
            self.stats["step_started"] = time.time()
            t = self._timed("wait_input_s", t)
            if self.mode == "ddp":
                self.schedule.step(x, y)
            else:
                self.stage.step(x, y)
            t = self._timed("compute_s", t)
            self.step_log.append((step, self.stats["step_started"], time.time()))
            self._count_step(step, x.shape[0])
            self._finish_step(step)

    # -------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Test-set pass through the pipeline: correct counts of the final output and of each local classifier."""
        if not self.active or (self.mode == "ddp" and self.rank != 0):
            return {}
        stage, d = self.stage, self.dataset
        stage.eval()
        correct = aux_correct = count = 0
        has_aux = False
        whole_model = self.mode in ("single", "ddp")
        if self.rank == 0:
            batches = ((0, x.to(self.device), y.to(self.device))
                       for x, y in iterate_batches(d.test_x, d.test_y, self.cfg.train.eval_batch_size, shuffle=False))
        else:
            batches = self._eval_inputs()
        for step, x, y in batches:
            h, aux = stage.predict(x)
            if stage.is_last or whole_model:
                correct += int((h.argmax(1) == y).sum())
            elif aux is not None:
                has_aux = True
                aux_correct += int((aux.argmax(1) == y).sum())
            if not (stage.is_last or whole_model):
                self.links["fwd_out"].send(step, h, y, kind=EVAL)
            count += y.shape[0]
        if not (stage.is_last or whole_model):
            self.links["fwd_out"].mark(EVAL_END, 0)
        stage.train()
        return {"index": self.rank, "correct": correct, "aux_correct": aux_correct, "count": count,
                "is_last": stage.is_last or whole_model, "has_aux": has_aux}

    def _eval_inputs(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        link = self.links["fwd_in"]
        while True:
            msg = link.recv()
            if msg.kind == EVAL_END:
                return
            _expect(msg.kind, EVAL, self.rank)
            yield msg.step, msg.tensor, msg.labels


# ------------------------------------------------------------------ helpers


def _new_stats() -> dict:
    return {
        "steps": 0, "samples": 0, "timed_samples": 0, "compute_s": 0.0, "wait_input_s": 0.0, "wait_send_s": 0.0,
        "wait_feedback_s": 0.0, "replayed_steps": 0, "sent_samples": 0, "dropped_samples": 0, "predictor_loads": 0,
        "predictor_local_changes": 0, "checkpoint_s": 0.0,
        "epoch_first": None, "epoch_end": None, "step_started": None, "warm_end": None,
    }


def _expect(kind: int, wanted: int, rank: int) -> None:
    if kind != wanted:
        names = {DATA: "DATA", STOP: "STOP", EPOCH_END: "EPOCH_END", EVAL: "EVAL", EVAL_END: "EVAL_END"}
        raise RuntimeError(f"stage {rank}: expected a {names[wanted]} message, got {names.get(kind, kind)}")


def _device(cfg: Config) -> torch.device:
    """The GPU Ray gave this worker, else the CPU: a worker without a GPU bundle must not touch
    the machine's GPUs (gloo would be handed device memory)."""
    import ray

    if ray.get_gpu_ids() and cfg.train.device in ("auto", "cuda"):
        return torch.device("cuda", 0)  # Ray sets CUDA_VISIBLE_DEVICES to this worker's GPU
    if cfg.train.device == "cuda":
        raise RuntimeError(f"train.device: cuda requested but worker pid {os.getpid()} was given no GPU "
                           "(cluster.gpus_per_worker)")
    return torch.device("cpu")


def _describe(device: torch.device) -> str:
    return f"cuda:0 ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu"


def _node_id() -> str | None:
    """Ray's id of this worker's node (several nodes can share one host name)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # outside Ray (tests)
        return None


def _node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # outside Ray (tests)
        return "127.0.0.1"
