"""Discrete-event simulation of one run's steps under every schedule the runtime has (SimPy).

Each stage worker is a SimPy process that does what ``runtime/worker.py`` does, in the
same order, with measured durations instead of tensors:

- compute runs at once on a device per worker (one GPU each); where workers share a CPU
  machine's cores, every running task progresses at once, as the OS time-slices them: with n
  tasks on c cores, each at min(1, c/n) of a core, slowed by the contention measured for
  min(n, c) tasks computing at once (waiting for a core counts as compute);
- a link is a FIFO wire (latency + bytes / bandwidth per message) behind a queue of
  ``in_flight_bound(max_in_flight)`` messages: a sender blocks only when it is that far ahead;
  where workers share cores, a message's copies (gloo's threads, at both ends) take the CPU
  the profile measured per byte while it is on its way: free if a core is idle then, at the
  stages' expense if both are computing;
- lockstep schedules (GPipe, 1F1B, data parallel) meet at a barrier each step, as the
  workers' stop-flag all-reduce makes them;
- each DNI coordinator trains its predictor from the samples the next stage sends, dropping
  the oldest beyond ``predictor_max_outstanding``; its work, and answering the stages' weight
  requests, shares the same cores.

Samples/s is computed as the runtime computes it: the samples from step ``warmup`` on,
over the time from stage 0 starting that step (in a pipeline, or the last stage finishing
step ``warmup - 1`` if later) to the last worker finishing.
"""

from __future__ import annotations

import collections
import random
from dataclasses import dataclass, field

import simpy

from ..runtime.links import in_flight_bound

END = "epoch-end"  # the marker a stage sends after its last batch


@dataclass
class LinkCost:
    latency_s: float
    bandwidth_bytes_per_s: float
    # CPU each end spends per byte it sends or receives (loopback copies in gloo's threads); where
    # the workers share cores, the copies need a core while the message is on its way
    cpu_s_per_byte: float = 0.0

    @classmethod
    def from_profile(cls, link: dict) -> "LinkCost":
        """A profile's (or a stated) link; profiles saved before the copies were measured cost them nothing."""
        return cls(link["latency_s"], link["bandwidth_bytes_per_s"], link.get("cpu_s_per_byte", 0.0))

    def seconds(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.bandwidth_bytes_per_s


@dataclass
class StageTimes:
    """Durations (seconds) of one stage's tasks for one batch (``micro``: one micro-batch)."""

    fwd: float = 0.0  # forward (decoupled rules: the whole local step, see ``plan``)
    bwd: float = 0.0  # backward and update when the feedback comes (naive, dfa, local dni)
    fwd_micro: float = 0.0
    bwd_micro: float = 0.0
    opt: float = 0.0  # optimizer step (once per batch under GPipe/1F1B)
    out_bytes: float = 0.0  # one message forward (activation and labels)
    back_bytes: float = 0.0  # one message backward (gradient or output error)
    train_s: float = 0.0  # DNI: the coordinator's (or, locally, this stage's) predictor step for this boundary
    submit: float = 0.0  # DNI: sending one (h, y, dL/dh) sample to the coordinator, on the sending stage
    weights_s: float = 0.0  # DNI: asking for fresh predictor weights and loading them, on the asking stage
    weights_host_s: float = 0.0  # DNI: what answering that request costs the rest of the host (coordinator, Ray)


@dataclass
class Workload:
    """One run to simulate: the mode, per-stage times, and the run's settings."""

    mode: str  # single, ddp, naive, gpipe, 1f1b, dgl, dgl-replay, dni, dni-local, dfa
    stages: list[StageTimes]
    batch_size: int
    steps: int
    warmup: int
    max_in_flight: int = 2
    microbatches: int = 1
    allreduce_bytes: float = 0.0  # ddp: gradient bytes each step
    lockstep: float = 1.0  # ddp: its step over the replicas' unsynchronised one (profile.measure_ddp_lockstep)
    schedule_overhead: tuple[float, float] = (0.0, 0.0)  # gpipe/1f1b: the library's seconds per step, per micro-batch
    replay_capacity: int = 0
    replay_max_reuse: int = 1
    sample_rate: float = 1.0
    max_outstanding: int = 8
    push_every: int = 1  # DNI: steps between a stage's weight requests
    seed: int = 0


@dataclass
class Prediction:
    samples_per_sec: float
    idle_fraction: list[float]
    seconds: float
    coordinator_utilisation: list[float] = field(default_factory=list)
    dropped_samples: list[int] = field(default_factory=list)
    trained_samples: list[int] = field(default_factory=list)  # samples each coordinator finished training on


class _Link:
    def __init__(self, sim: "_Sim", capacity: int) -> None:
        self.sim = sim
        self.slots = simpy.Container(sim.env, capacity, init=capacity)
        self.store = simpy.Store(sim.env)
        self.wire_free = 0.0

    def send(self, item, nbytes: float):
        yield self.slots.get(1)  # blocks only when the receiver is ``capacity`` messages behind
        env = self.sim.env
        arrival = max(env.now, self.wire_free) + self.sim.link.seconds(nbytes)
        self.wire_free = arrival
        self.sim.copies(nbytes)
        self.store.put((arrival, item))

    def recv(self):
        arrival, item = yield self.store.get()
        if arrival > self.sim.env.now:
            yield self.sim.env.timeout(arrival - self.sim.env.now)
        yield self.slots.put(1)
        return item

    def poll(self):
        """The next message if it has arrived, else None (never waits)."""
        if self.store.items and self.store.items[0][0] <= self.sim.env.now:
            _, item = self.store.items.pop(0)
            self.slots.put(1)
            return item
        return None


class _Sim:
    def __init__(self, w: Workload, link: LinkCost, cores: int | None) -> None:
        self.w, self.link = w, link
        self.env = simpy.Environment()
        self.cores = cores  # None: a device per worker, compute never waits for another
        n = len(w.stages)
        self.busy = [0.0] * n
        self.end = [0.0] * n
        self.first: float | None = None  # stage 0 starts step ``warmup``
        self.warm_end = 0.0  # a pipeline's last stage finishes step ``warmup - 1``
        self.barriers: dict[int, tuple[int, simpy.Event]] = {}
        self.coord_busy: list[float] = []
        self.remaining: dict = {}  # compute tasks holding a core now -> their work left (seconds alone)
        self.rate_factor = 1.0  # how much slower than alone they all run now
        self.settled_at = 0.0
        self.contention: dict[int, float] = {}
        self.coord_dropped: list[int] = []

    def copies(self, nbytes: float) -> None:
        """A message of ``nbytes`` leaves: on shared cores its copies at the sending and at the
        receiving end each want a core for a while (they run beside the stages, in gloo's threads)."""
        if self.cores and nbytes and self.link.cpu_s_per_byte:
            for _ in range(2):
                self.env.process(self.compute(None, nbytes * self.link.cpu_s_per_byte))

    def compute(self, k: int | None, seconds: float):
        t0 = self.env.now
        if seconds > 0:
            if not self.cores:
                yield self.env.timeout(seconds)
            else:
                yield from self._shared(seconds)
        if k is not None:
            self.busy[k] += self.env.now - t0

    def _shared(self, work: float):
        """Do ``work`` seconds of one core's compute while other tasks may run beside it: every
        running task progresses at once (the OS time-slices them), re-rated whenever one starts or
        ends (a task overlapped for half its time is slowed for that half only)."""
        me = self.env.active_process
        self._settle()
        self.remaining[me] = work
        self._rerate(me)
        while True:
            try:
                yield self.env.timeout(max(0.0, self.remaining[me]) * self.rate_factor)
                break
            except simpy.Interrupt:  # a task started or ended: ``remaining`` is settled, wait anew
                continue
        self._settle()
        del self.remaining[me]
        self._rerate(me)

    def _settle(self) -> None:
        """Bring every running task's remaining work up to now at the factor it has run at."""
        elapsed = self.env.now - self.settled_at
        if elapsed > 0:
            for task in self.remaining:
                self.remaining[task] -= elapsed / self.rate_factor
        self.settled_at = self.env.now

    def _rerate(self, changed) -> None:
        """The number of running tasks changed (``changed`` started or ended): at a new rate, the
        others wait anew."""
        n = len(self.remaining)
        # n tasks on fewer cores get a share of one each; the cores they use contend as measured
        factor = self.slowdown(min(n, self.cores)) * max(1.0, n / self.cores) if n else 1.0
        if factor != self.rate_factor:
            self.rate_factor = factor
            for task in self.remaining:
                if task is not changed:
                    task.interrupt()

    def slowdown(self, running: int) -> float:
        """Linear between the measured points (1 task: 1.0 unless measured)."""
        points = sorted({1: 1.0, **self.contention}.items())
        for (n0, f0), (n1, f1) in zip(points, points[1:]):
            if running <= n1:
                return f0 + (f1 - f0) * (running - n0) / (n1 - n0)
        return points[-1][1]

    def mark(self, k: int, step: int) -> None:
        if k == 0 and step == min(self.w.warmup, self.w.steps - 1) and self.first is None:
            self.first = self.env.now

    def warmed(self, k: int, step: int) -> None:
        """Stage k has done step ``step``'s compute; the runtime's timing also waits for the last stage's warm-up."""
        if k == len(self.w.stages) - 1 and step == min(self.w.warmup, self.w.steps - 1) - 1:
            self.warm_end = self.env.now

    def barrier(self, step: int, parties: int):
        count, event = self.barriers.get(step, (0, self.env.event()))
        count += 1
        self.barriers[step] = (count, event)
        if count == parties:
            event.succeed()
        yield event
        yield self.env.timeout(self.link.latency_s)  # the one-number all-reduce

    def links(self, n: int, capacity: int) -> list[_Link]:
        return [_Link(self, capacity) for _ in range(n)]


def simulate(w: Workload, link: LinkCost, cores: int | None, contention: dict | None = None) -> Prediction:
    """Run ``w`` on workers that share ``cores`` cores (None: each has its own device).

    ``contention``: {tasks running at once: slowdown} measured on the machine (see
    ``profile.measure_runtime_contention``; 1 task: a split stage computing alone, which whole-net
    workers ignore); running tasks progress at the slowdown of how many run at once, re-rated
    whenever one starts or ends.
    """
    sim = _Sim(w, link, cores)
    sim.contention = {int(n): f for n, f in (contention or {}).items()}
    if w.mode in ("single", "ddp"):
        # the measured 1-task factor is a split stage's (``profile.stage_alone_factor``); a worker
        # holding the whole net computes as the profile timed it (single worker: -0.8..+2.2%, runs I-J)
        sim.contention[1] = 1.0
    n, env = len(w.stages), sim.env
    bound = in_flight_bound(w.max_in_flight)
    fwd = sim.links(n, bound)  # fwd[k]: stage k -> k+1
    back = sim.links(n, bound)  # back[k]: stage k+1 -> k (gradient) or last -> k (dfa error)
    runners = {
        "single": _single, "ddp": _ddp, "naive": _naive, "gpipe": _pipelined, "1f1b": _pipelined,
        "dgl": _dgl, "dgl-replay": _dgl, "dni": _dni, "dni-local": _dni, "dfa": _dfa,
    }
    if w.mode not in runners:
        raise ValueError(f"simulate: unknown mode {w.mode!r}")
    workers = 1 if w.mode == "single" else n
    if w.mode == "dni":
        sim.coord_busy, sim.coord_dropped = [0.0] * (n - 1), [0] * (n - 1)
        sim.coord_started, sim.coord_trained = [None] * (n - 1), [0] * (n - 1)
        queues = [collections.deque() for _ in range(n - 1)]
        wakeups = [env.event() for _ in range(n - 1)]
        sim.coordinator = (queues, wakeups)
        for b in range(n - 1):
            env.process(_coordinator(sim, b))
    procs = [env.process(runners[w.mode](sim, k, fwd, back)) for k in range(workers)]
    env.run(until=simpy.AllOf(env, procs))
    samples = (w.steps - min(w.warmup, w.steps - 1)) * w.batch_size * (n if w.mode == "ddp" else 1)
    span = max(sim.end[:workers]) - max(sim.first or 0.0, sim.warm_end)
    idle = [1.0 - sim.busy[k] / sim.end[k] if sim.end[k] > 0 else 0.0 for k in range(workers)]
    total = max(sim.end[:workers]) or 1.0
    for b, started in enumerate(getattr(sim, "coord_started", [])):
        if started is not None:  # a predictor step still running when the stages finished
            sim.coord_busy[b] += total - started
    return Prediction(samples / span if span > 0 else float("nan"), idle, total,
                      [min(1.0, b / total) for b in sim.coord_busy], list(sim.coord_dropped),
                      list(getattr(sim, "coord_trained", [])))


# ----------------------------------------------------------------------- schedules


def _single(sim: _Sim, k: int, fwd, back):
    s = sim.w.stages[0]
    for step in range(sim.w.steps):
        sim.mark(0, step)
        yield from sim.compute(0, s.fwd + s.bwd + s.opt)
    sim.end[0] = sim.env.now


def _ddp(sim: _Sim, k: int, fwd, back):
    w, s = sim.w, sim.w.stages[k]
    n = len(w.stages)
    ring = 2 * (n - 1) / n * w.allreduce_bytes / sim.link.bandwidth_bytes_per_s + 2 * (n - 1) * sim.link.latency_s
    ring_bytes = 2 * (n - 1) / n * w.allreduce_bytes  # each replica sends this much and receives as much
    for step in range(w.steps):
        yield from sim.barrier(step, n)
        sim.mark(k, step)
        yield from sim.compute(k, (s.fwd + s.bwd) * w.lockstep)
        t0 = sim.env.now
        yield from sim.barrier(-1 - step, n)  # gradients are averaged once every replica has them
        sim.copies(ring_bytes)  # what this replica sends in the ring, copied here and at its neighbour
        yield sim.env.timeout(ring)
        sim.busy[k] += sim.env.now - t0  # inside DDP's backward: the runtime counts it as compute
        yield from sim.compute(k, s.opt)
    sim.end[k] = sim.env.now


def _naive(sim: _Sim, k: int, fwd, back):
    """Backprop across stages, one batch at a time (also fa and sign_symmetric)."""
    w, s = sim.w, sim.w.stages[k]
    last = len(w.stages) - 1
    for step in range(w.steps):
        if k > 0:
            yield from fwd[k - 1].recv()
        sim.mark(k, step)
        yield from sim.compute(k, s.fwd)
        if k < last:
            yield from fwd[k].send(step, s.out_bytes)
            yield from back[k].recv()
        yield from sim.compute(k, s.bwd + s.opt)
        sim.warmed(k, step)
        if k > 0:
            yield from back[k - 1].send(step, w.stages[k - 1].out_bytes)
    sim.end[k] = sim.env.now


def _pipeline_order(kind: str, k: int, n: int, m: int) -> list[tuple[str, int]]:
    """The forward/backward order of torch's ScheduleGPipe and Schedule1F1B on stage ``k`` of ``n``."""
    if kind == "gpipe":
        return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]
    warm = min(m, n - k)
    order = [("F", i) for i in range(warm)]
    f, b = warm, 0
    while b < m:
        order.append(("B", b))
        b += 1
        if f < m:
            order.append(("F", f))
            f += 1
    return order


def _pipelined(sim: _Sim, k: int, fwd, back):
    w, s = sim.w, sim.w.stages[k]
    n, m = len(w.stages), w.microbatches
    last = n - 1
    order = _pipeline_order(w.mode, k, n, m)
    micro_out = s.out_bytes / m
    per_step, per_micro = w.schedule_overhead
    per_op = per_micro / 2  # a micro-batch is one forward and one backward op
    for step in range(w.steps):
        yield from sim.barrier(step, n)
        sim.mark(k, step)
        for op, i in order:
            if op == "F":
                if k > 0:
                    yield from fwd[k - 1].recv()
                yield from sim.compute(k, s.fwd_micro + per_op)
                if k < last:
                    sim.env.process(fwd[k].send((step, i), micro_out))  # isend: the schedule goes on
            else:
                if k < last:
                    yield from back[k].recv()
                yield from sim.compute(k, s.bwd_micro + per_op)
                if k > 0:
                    sim.env.process(back[k - 1].send((step, i), w.stages[k - 1].out_bytes / m))
        yield from sim.compute(k, s.opt + per_step)
    sim.end[k] = sim.env.now


def _dgl(sim: _Sim, k: int, fwd, back):
    """Local losses: step, send on; with a replay buffer a stage trains on recent inputs while new ones come."""
    w, s = sim.w, sim.w.stages[k]
    last = len(w.stages) - 1
    replay = w.mode == "dgl-replay" and k > 0
    buffer: dict = {"entries": [], "added": 0}  # entries: [uses, order]
    step = 0
    while (yield from (_replay_input(sim, k, fwd, buffer) if replay else _next_input(sim, k, fwd, step))):
        sim.mark(k, step)
        yield from sim.compute(k, s.fwd)
        if not replay:  # a replayed input is an older step
            sim.warmed(k, step)
        if k < last:
            yield from fwd[k].send(step, s.out_bytes)
        step += 1
    if k < last:
        yield from fwd[k].send(END, 0)
    sim.end[k] = sim.env.now


def _replay_input(sim: _Sim, k: int, fwd, buffer: dict):
    """ReplayBuffer's rules: take in everything that has arrived (the oldest goes when full), train on
    the least-used entry (newest first), wait only when every entry is used up; False at the end."""
    w, entries = sim.w, buffer["entries"]
    while (item := fwd[k - 1].poll()) is not None or not any(e[0] < w.replay_max_reuse for e in entries):
        if item is None:  # nothing usable left: wait for something new
            item = yield from fwd[k - 1].recv()
        if item == END:
            return False
        if len(entries) == w.replay_capacity:
            entries.pop(0)
        entries.append([0, buffer["added"]])
        buffer["added"] += 1
    entry = min((e for e in entries if e[0] < w.replay_max_reuse), key=lambda e: (e[0], -e[1]))
    entry[0] += 1
    return True


def _next_input(sim: _Sim, k: int, fwd, step: int):
    """Whether stage k has another batch: stage 0 until the run's steps are drawn, later stages
    until the end marker arrives (waiting for the next message)."""
    if k == 0:
        return step < sim.w.steps
    item = yield from fwd[k - 1].recv()
    return item != END


def _dni(sim: _Sim, k: int, fwd, back):
    """Synthetic gradients: step with the predicted gradient, send on, sample to the coordinator."""
    w, s = sim.w, sim.w.stages[k]
    last = len(w.stages) - 1
    rng = random.Random(w.seed * 7919 + k)
    env = sim.env
    local = w.mode == "dni-local"
    pending = 0
    step = 0
    while (yield from _next_input(sim, k, fwd, step)):
        sim.mark(k, step)
        yield from sim.compute(k, s.fwd)
        sim.warmed(k, step)
        if k < last:
            yield from fwd[k].send(step, s.out_bytes)
        if k > 0:
            if local:
                yield from back[k - 1].send(step, w.stages[k - 1].out_bytes)
            elif rng.random() < w.sample_rate:
                yield from sim.compute(k, s.submit)
                queues, wakeups = sim.coordinator
                queue = queues[k - 1]
                queue.append(step)
                while len(queue) > w.max_outstanding:
                    queue.popleft()
                    sim.coord_dropped[k - 1] += 1
                if not wakeups[k - 1].triggered:
                    wakeups[k - 1].succeed()
        if local and k < last:
            pending = yield from _drain(sim, k, back[k], pending + 1, s.train_s, block=False)
        elif k < last and step % w.push_every == 0:  # the stage asks for fresh weights; the host answers
            yield from sim.compute(k, s.weights_s)
            if s.weights_host_s > 0:
                env.process(sim.compute(None, s.weights_host_s))
        step += 1
    if local:
        while pending:
            pending = yield from _drain(sim, k, back[k], pending, s.train_s, block=True)
    if k < last:
        yield from fwd[k].send(END, 0)
    sim.end[k] = sim.env.now


def _coordinator(sim: _Sim, b: int):
    queues, wakeups = sim.coordinator
    queue = queues[b]
    train = sim.w.stages[b].train_s
    while True:
        if not queue:
            wakeups[b] = sim.env.event()
            yield wakeups[b]
        queue.popleft()
        t0 = sim.coord_started[b] = sim.env.now
        yield from sim.compute(None, train)
        sim.coord_busy[b] += sim.env.now - t0
        sim.coord_started[b] = None
        sim.coord_trained[b] += 1


def _drain(sim: _Sim, k: int, link: _Link, pending: int, seconds: float, block: bool):
    """Apply arrived feedback; wait only while more than ``max_in_flight`` graphs are held (or ``block``)."""
    while pending:
        if block or pending > sim.w.max_in_flight:
            yield from link.recv()
        elif link.poll() is None:
            break
        yield from sim.compute(k, seconds)
        pending -= 1
    return pending


def _dfa(sim: _Sim, k: int, fwd, back):
    """Direct feedback alignment: forward and send on; the output error comes back from the last stage."""
    w, s = sim.w, sim.w.stages[k]
    last = len(w.stages) - 1
    pending = 0
    step = 0
    while (yield from _next_input(sim, k, fwd, step)):
        sim.mark(k, step)
        yield from sim.compute(k, s.fwd)
        sim.warmed(k, step)
        if k < last:
            yield from fwd[k].send(step, s.out_bytes)
            pending = yield from _drain(sim, k, back[k], pending + 1, s.bwd + s.opt, block=False)
        else:
            for j in range(last):
                yield from back[j].send(step, s.back_bytes)
        step += 1
    while pending:
        pending = yield from _drain(sim, k, back[k], pending, s.bwd + s.opt, block=True)
    if k < last:
        yield from fwd[k].send(END, 0)
    sim.end[k] = sim.env.now
