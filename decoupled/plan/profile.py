"""What the planner knows about a machine: measured costs of every block, head, predictor and link.

A profile is plain JSON, so one measured on a GPU node (``decoupled plan --save-profile``)
plans for that node anywhere. Everything is timed with the code the trainers run: the
model's own blocks, DGL's ``auxiliary_head``, DNI's ``GradientPredictor`` and
``PredictorTrainer``, the config's optimizer, and gloo between two processes. Times are
medians of ``repeats`` after a warm-up run, on copies (BatchNorm statistics stay put).
"""

from __future__ import annotations

import copy
import math
import os
import pickle
import platform
import socket
import statistics
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..config import Config, DFAMethod, DGLMethod, DNIMethod
from ..data import Dataset
from ..malloc import children_keep_freed_memory, keep_freed_memory
from ..models import build_blocks, count_parameters, output_shape
from ..pipeline import resolve_device
from ..rules.dgl import auxiliary_head
from ..rules.dni import GradientPredictor, PredictorTrainer
from ..split import pass_times
from ..stage import build_optimizer

PROFILE_VERSION = 1


def _median_time(run: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    """Median seconds of ``run`` over ``repeats`` after a warm-up (``repeats=0``: not timed, 0.0)."""
    if repeats == 0:
        return 0.0
    run()  # warm-up: first-call allocations and kernel choice
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _flops(run: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        run()
    return int(counter.get_total_flops())


def _leaf_layers(module: nn.Module) -> int:
    return sum(1 for m in module.modules() if not list(m.children()))


def micro_sizes(cfg: Config, methods: list) -> list[int]:
    """Batch sizes the schedules run: the batch, and its micro-batches under GPipe/1F1B."""
    sizes = {cfg.train.batch_size}
    for m in methods:
        if getattr(m, "schedule", None) in ("gpipe", "1f1b"):
            sizes.add(cfg.train.batch_size // m.microbatches)
    return sorted(sizes, reverse=True)


def measure_profile(cfg: Config, dataset: Dataset, methods: list, repeats: int = 10, link: bool = True,
                    timed: bool = True, contention: bool = True, coordinator: bool | None = None) -> dict:
    """Time every block at every batch size the ``methods`` use, each rule's extra modules at every
    possible boundary, (``link``) a gloo link between two local processes, (``contention``) how
    much CPU workers sharing this machine slow each other down, and (``coordinator``, default: as
    ``link``) what DNI's samples and weight requests cost through Ray and the coordinator actor.

    ``timed=False`` only counts FLOPs (for ``assume_device``), except the DNI predictors'
    training, which the coordinator does on its CPU wherever the stages run.

    With ``train.keep_freed_memory`` (the default) a timed profile sets this process's malloc to
    keep freed memory from then on (``decoupled.malloc``), and starts its probes' processes so.
    """
    if not (cfg.train.keep_freed_memory and timed):
        return _measure_profile(cfg, dataset, methods, repeats, link, timed, contention, coordinator)
    # time the blocks, and run the probes' processes, with the malloc settings the workers run with
    keep_freed_memory()  # this process, from now on
    with children_keep_freed_memory():
        return _measure_profile(cfg, dataset, methods, repeats, link, timed, contention, coordinator)


def _measure_profile(cfg: Config, dataset: Dataset, methods: list, repeats: int, link: bool, timed: bool,
                     contention: bool, coordinator: bool | None) -> dict:
    device = resolve_device(cfg.train.device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    torch.manual_seed(cfg.seed)
    blocks = [b.to(device) for b in copy.deepcopy(build_blocks(cfg.model, dataset.input_shape, dataset.num_classes))]
    batch = cfg.train.batch_size
    sizes = micro_sizes(cfg, methods)
    x = dataset.train_x[:batch].to(device)
    y = dataset.train_y[:batch].to(device)
    if len(x) < batch:
        raise ValueError(f"train.batch_size: profiling needs {batch} training samples, the data has {len(x)}")
    out_blocks, boundaries, boundary_outputs = [], [], []
    net_input = x
    shape = tuple(dataset.input_shape)
    for j, block in enumerate(blocks):
        block.train()
        entry = {"index": j, "params": count_parameters(block), "layers": _leaf_layers(block),
                 "input_shape": list(shape), "fwd_s": {}, "bwd_s": {}, "bwd_input_s": {},
                 "flops": {str(size): _fwd_bwd_flops(block, x[:size]) for size in sizes}}
        params = [p for p in block.parameters()]
        entry["opt_s"] = _optimizer_time(block, cfg, repeats, sync) if timed else 0.0
        entry["clone_s"] = _median_time(lambda: [p.detach().clone() for p in params], repeats, sync) \
            if params and timed else 0.0
        with torch.no_grad():
            x = block(x)
        shape = output_shape(block, shape)
        entry["output_shape"] = list(shape)
        entry["output_bytes"] = math.prod(shape) * x.element_size()  # per sample
        out_blocks.append(entry)
        if j < len(blocks) - 1:
            boundary_outputs.append(x.detach())
            boundaries.append(_boundary_costs(j, x.detach(), y, methods, cfg, dataset.num_classes,
                                              repeats if timed else 0, sync))
    # Forward and backward of every block, size and variant, timed inside a pass through the whole
    # net (as a stage runs its blocks: each one's input and gradient just made by its neighbour),
    # in rounds: a machine whose speed drifts (a shared host) then shifts every block alike.
    # GPipe's micro-batches are timed a second way too, all of a batch's forwarded before their
    # backwards (``_live`` times): what the schedule keeps in memory slows its compute down
    gpipe_sizes = sorted({batch // m.microbatches for m in methods
                          if getattr(m, "schedule", None) == "gpipe" and m.microbatches > 1})
    runs = [(size, False) for size in sizes] + [(size, True) for size in gpipe_sizes]
    samples: dict[tuple[int, int, bool, bool], tuple[list[float], list[float]]] = {}
    for r in range(repeats + 1 if timed else 0):
        for size, live in runs:
            for input_grad in (False, True):
                times = pass_times(blocks, net_input[:batch if live else size], input_grad, sync,
                                   chunks=batch // size if live else 1)
                if r:  # round 0 warms up
                    for j, (fwd, bwd) in enumerate(times):
                        samples.setdefault((j, size, live, input_grad), ([], []))
                        samples[(j, size, live, input_grad)][0].append(fwd)
                        samples[(j, size, live, input_grad)][1].append(bwd)
    for j, entry in enumerate(out_blocks):
        for size, live in runs:
            values = dict.fromkeys(("fwd", "bwd", "bwd_input"), 0.0)
            if timed:
                fwd, bwd = samples[(j, size, live, False)]
                fwd_input, bwd_input = samples[(j, size, live, True)]
                values = {"fwd": statistics.median(fwd + fwd_input), "bwd": statistics.median(bwd),
                          "bwd_input": statistics.median(bwd_input)}
            for name, value in values.items():
                entry.setdefault(name + ("_live_s" if live else "_s"), {})[str(size)] = value
        blocks[j].zero_grad(set_to_none=True)
    coordinated = [m for m in methods if isinstance(m, DNIMethod) and m.predictor_training == "coordinator"]
    if (link if coordinator is None else coordinator) and timed and coordinated and boundaries:
        for label, per_boundary in measure_coordinator_path(coordinated, boundary_outputs, y, dataset.num_classes,
                                                            boundaries).items():
            for boundary, costs in zip(boundaries, per_boundary):
                boundary["methods"][label].update(costs)
    profile = {
        "version": PROFILE_VERSION,
        "timed": timed,
        "device": describe_device(device, cfg.train.threads),
        "device_type": device.type,
        "cores": _cores() if device.type == "cpu" else None,
        "threads": cfg.train.threads or torch.get_num_threads(),
        "batch_size": batch,
        "sizes": sizes,
        "model": cfg.model.model_dump(mode="json"),
        "input_shape": list(dataset.input_shape),
        "num_classes": dataset.num_classes,
        "train_samples": len(dataset.train_y),
        "blocks": out_blocks,
        "boundaries": boundaries,
        "link": measure_link() if link else None,
        # torch.distributed.pipelining's own cost per step and per micro-batch (Python, P2P bookkeeping)
        "pipeline_overhead": measure_pipeline_overhead(cfg.train.batch_size)
        if link and timed and device.type == "cpu" and any(getattr(m, "schedule", None) in ("gpipe", "1f1b")
                                                          for m in methods) else None,
        "contention": None,
        "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    # CPU workers that share a machine slow each other down (memory bandwidth, caches, SMT, and in the
    # runtime its processes' own work): two measured as the runtime runs them when a dgl method was
    # profiled, more (if the cores allow) as bare processes
    room = _cores() // (cfg.train.threads or 1)
    if contention and timed and device.type == "cpu" and room > 1:
        dgl = next((m for m in methods if isinstance(m, DGLMethod) and not m.replay_buffer), None)
        probe: dict = {}
        in_runtime = (measure_runtime_contention(cfg, dataset, profile, dgl, record=probe)
                      if dgl and len(blocks) > 1 else {})
        profile["contention_probe"] = probe or None  # the steps and overlaps the factor rests on
        if any(getattr(m, "schedule", None) == "ddp" for m in methods):
            profile["ddp_lockstep"] = measure_ddp_lockstep(cfg, dataset)
        bare = measure_contention(cfg, dataset, room) if room > 2 or not in_runtime else {}
        profile["contention"] = {**bare, **in_runtime}
        if in_runtime and str(room) in bare:  # no fewer tasks at once slow each other down more
            profile["contention"][str(room)] = max(bare[str(room)], in_runtime["2"])
    return profile


def _fwd_bwd_flops(block: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """FLOPs of the forward, of the backward, and of the backward without the input's gradient."""
    out: dict[str, int] = {}
    for input_grad in (True, False):
        inp = x.detach().requires_grad_(input_grad)
        holder: dict = {}
        out["fwd"] = _flops(lambda: holder.setdefault("out", block(inp)))
        y = holder["out"]
        out["bwd" if input_grad else "bwd_noinput"] = _flops(lambda: y.backward(torch.ones_like(y)))
        block.zero_grad(set_to_none=True)
    return out


def _optimizer_time(module: nn.Module, cfg: Config, repeats: int, sync) -> float:
    params = list(module.parameters())
    if not params:
        return 0.0
    opt = build_optimizer(params, cfg.optimizer)
    for p in params:
        p.grad = torch.zeros_like(p)

    def step() -> None:
        opt.step()
        for p in params:  # a fresh gradient each step, as after a backward (zero_grad sets None)
            p.grad = torch.zeros_like(p)

    with torch.no_grad():
        saved = [p.detach().clone() for p in params]
    t = _median_time(step, repeats, sync)
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
            p.grad = None
    return t


def _boundary_costs(j: int, h: torch.Tensor, y: torch.Tensor, methods: list, cfg: Config, classes: int,
                    repeats: int, sync) -> dict:
    """Per method label: what its rule adds at a stage whose output is ``h`` (the output of block ``j``)."""
    shape = tuple(h.shape[1:])
    out: dict = {"after_block": j, "shape": list(shape), "methods": {}}
    for m in methods:
        label = m.display_name()
        if isinstance(m, DGLMethod):
            head = auxiliary_head(shape, classes, m.aux_hidden).to(h.device)
            opt = build_optimizer(list(head.parameters()), cfg.optimizer)

            def aux_step(head=head, opt=opt) -> None:
                inp = h.detach().requires_grad_(True)  # its gradient flows on into the stage
                F.cross_entropy(head(inp), y).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            out["methods"][label] = {"aux_s": _median_time(aux_step, repeats, sync),
                                     "aux_flops": _flops(aux_step), "aux_layers": _leaf_layers(head)}
        elif isinstance(m, DNIMethod):
            hidden = m.predictor_hidden or shape[0]
            predictor = GradientPredictor(shape, classes, m.conditioned, hidden, m.predictor_layers,
                                          m.predictor_kernel_size).to(h.device)
            for p in predictor.parameters():  # not the zero init: an all-zero layer is not what runs later
                nn.init.normal_(p, std=0.01)
            trainer = PredictorTrainer(predictor, m.predictor_lr, m.predictor_optimizer)
            grad = torch.randn_like(h) / h.shape[0]

            def predict(predictor=predictor) -> None:
                with torch.no_grad():
                    predictor(h, y)

            def submit() -> None:  # what sending (h, y, dL/dh) to the coordinator serialises
                pickle.dumps((h.cpu().numpy(), y.cpu().numpy(), grad.cpu().numpy()), protocol=5)

            out["methods"][label] = {
                "predict_s": _median_time(predict, repeats, sync),
                "train_s": _median_time(lambda trainer=trainer: trainer.update(h, y, grad), max(repeats, 2), sync),
                "submit_s": _median_time(submit, repeats, lambda: None),
                "sample_bytes": 2 * h.numel() * h.element_size() + y.numel() * y.element_size(),
                "predict_flops": _flops(predict), "train_flops": _flops(lambda: trainer.update(h, y, grad)),
                "predictor_layers": _leaf_layers(predictor),
            }
        elif isinstance(m, DFAMethod):
            matrix = torch.randn(classes, math.prod(shape), device=h.device)
            error = torch.randn(h.shape[0], classes, device=h.device)
            out["methods"][label] = {"project_s": _median_time(lambda: (error @ matrix).view_as(h), repeats, sync),
                                     "project_flops": 2 * error.numel() * matrix.shape[1]}
    return out


def describe_device(device: torch.device, threads: int | None) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {cpu}, {threads or torch.get_num_threads()} thread(s) per worker, {_cores()} cores (torch {torch.__version__})"


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# ----------------------------------------------------------------------------- links


def run_gloo_pair(target, *args, timeout_s: float = 120.0) -> list:
    """Run ``target(rank, port, *args, results)`` in two spawned processes that form a gloo group;
    returns what each put on ``results`` (waiting at most ``timeout_s`` for each)."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=target, args=(rank, port, *args, results)) for rank in (0, 1)]
    for p in procs:
        p.start()
    try:
        return [results.get(timeout=timeout_s) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


def measure_link(sizes: tuple[int, ...] = (4096, 4 << 20), repeats: int = 20) -> dict:
    """One-way time of a gloo send between two processes on this machine: latency + bytes / bandwidth;
    and the CPU each end spends per byte it sends or receives (the copies through the loopback
    socket, in gloo's threads: on a machine whose cores the workers share, that time competes
    with the stages' compute)."""
    measured = run_gloo_pair(_link_peer, sizes, repeats)
    times = next(t for t, _ in measured if t is not None)
    (s0, t0), (s1, t1) = (sizes[0], times[0]), (sizes[-1], times[-1])
    bandwidth = (s1 - s0) / max(t1 - t0, 1e-9)
    latency = max(t0 - s0 / bandwidth, 0.0)
    # a round trip sends one message and receives one on each end: two messages' copies
    cpu_per_byte = statistics.mean(max(0.0, (cpu[-1] - cpu[0]) / (2 * (s1 - s0))) for _, cpu in measured)
    return {"latency_s": latency, "bandwidth_bytes_per_s": bandwidth, "cpu_s_per_byte": cpu_per_byte,
            "source": "measured: gloo, two local processes",
            "samples": {str(s): t for s, t in zip(sizes, times)}}


def _link_peer(rank: int, port: int, sizes: tuple[int, ...], repeats: int, results) -> None:
    import torch.distributed as dist

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=timedelta(seconds=60))
    out, cpu = [], []
    for size in sizes:
        buf = torch.zeros(size // 4, dtype=torch.float32)
        times, cpu_times = [], []
        for r in range(repeats + 2):
            t0, c0 = time.perf_counter(), time.process_time()  # process: gloo's threads do the copies
            if rank == 0:  # ping-pong: half the round trip is one way
                dist.send(buf, 1)
                dist.recv(buf, 1)
            else:
                dist.recv(buf, 0)
                dist.send(buf, 0)
            if r >= 2:
                times.append((time.perf_counter() - t0) / 2)
                cpu_times.append(time.process_time() - c0)
        out.append(statistics.median(times))
        cpu.append(statistics.median(cpu_times))
    results.put((out if rank == 0 else None, cpu))  # rank 0 timed the round trips; both their CPU
    dist.destroy_process_group()


def measure_contention(cfg: Config, dataset: Dataset, workers: int, rounds: int = 4,
                       phase_s: float = 1.5) -> dict[str, float]:
    """How much slower a training step runs when ``workers`` processes train at once than alone.

    One process times its steps alone (the others wait), then with all of them training, ``rounds``
    times over; the factor is the median of the rounds' ratios. Alternating keeps a host whose speed
    drifts from passing its drift off as contention (one long phase of each once measured 0.93x).
    Returns {"1": 1.0, str(workers): factor}; the simulation interpolates between them.
    """
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    args = (cfg.model.model_dump(mode="json"), tuple(dataset.input_shape), dataset.num_classes,
            cfg.train.batch_size, cfg.train.threads or 1, rounds, phase_s)
    barrier, results = ctx.Barrier(workers), ctx.Queue()
    procs = [ctx.Process(target=_contention_worker, args=(rank, *args, barrier, results)) for rank in range(workers)]
    for p in procs:
        p.start()
    try:
        reports = [results.get(timeout=300) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    alone, together = next(r for r in reports if r is not None)
    return {"1": 1.0, str(workers): statistics.median(t / a for a, t in zip(alone, together))}


def measure_runtime_contention(cfg: Config, dataset: Dataset, profile: dict, method, steps: int = 48,
                               record: dict | None = None) -> dict:
    """How much slower a split net's stages compute in the runtime's own workers than the profile
    timed their blocks in one process: one stage at a time, and two training at once.

    Both run on the profile's balanced split of two workers through the Ray runtime, ``steps``
    steps each, in fresh processes, and compare each stage's steps after warm-up (means) with the
    profile's time for them, scaled by how fast this process runs the net just before, between and
    after against when the profile timed it:

    - alone: naive model parallel, where one stage computes while the other waits. The same blocks
      split over two processes computed 1-10% slower than in one (both stages summed, runs D-J of
      docs/RESULTS.md 3a; stage 0 most: its backward comes after a wait), while a single worker
      computes as profiled;
    - two at once: ``method`` (a ``dgl`` method the profile timed: each stage computes without
      waiting for the other's backward), weighed by how much of each step the other stage was
      computing (``pair_slowdown``). Bare processes stepping at once (``measure_contention``) miss
      what the runtime adds: Ray's worker processes, the links' threads and copies, both stages'
      memory traffic.

    Returns {"1": alone, "2": two at once}; ``record``, if given, gets the numbers they rest on.
    """
    import tempfile

    from ..config import build_config
    from ..runtime.ray_runtime import RayWorkers, _ray, train_ray
    from . import balanced_split, workload

    boundaries = balanced_split(profile, 2)
    data = cfg.model_dump(mode="json")
    data.pop("compare", None)
    data.update(runtime="ray", method=method.model_dump(mode="json"))
    data["split"] = {**data["split"], "stages": 2, "boundaries": boundaries}
    data["train"] = {**data["train"], "epochs": 1, "max_steps": steps, "progress": False}
    data["checkpoint"] = {**data["checkpoint"], "enabled": False}
    tmp = tempfile.TemporaryDirectory()
    data["output"] = {**data["output"], "dir": tmp.name, "tensorboard": False}
    probe = build_config(data)
    naive = build_config({**data, "method": {"name": "backprop", "schedule": "naive"}})
    expected = [t.fwd for t in workload(profile, method, boundaries, probe, steps).stages]
    expected_alone = [t.fwd + t.bwd + t.opt for t in workload(profile, naive.method, boundaries, naive, steps).stages]
    warmup = min(probe.train.warmup_steps, steps - 1)
    # the host's speed now against when the profile timed the blocks: one pass through the net as
    # the profile timed it, around each run (a drifting host once gave 0.85x)
    net = build_blocks(cfg.model, dataset.input_shape, dataset.num_classes)  # new blocks: only timed
    x = dataset.train_x[:profile["batch_size"]]
    size = str(profile["batch_size"])
    then = sum(b["fwd_s"][size] + b["bwd_s"][size] for b in profile["blocks"])

    def speed() -> float:
        # 7 passes: single passes of the benchmark's nets spread +-4% (VGG, 17:45, ad hoc), and this
        # ratio scales both factors
        passes = [sum(f + b for f, b in pass_times(net, x, input_grad=False)) for _ in range(8)]
        for block in net:
            block.zero_grad(set_to_none=True)
        return statistics.median(passes[1:]) / then  # the first warms up

    with tmp, RayWorkers(probe) as workers:
        before = speed()
        train_ray(naive, Path(tmp.name) / "alone", dataset, workers)
        computed = _ray().get([a.steps_compute.remote() for a in workers.actors], timeout=probe.links.timeout_s)
        between = speed()
        workers.restart(graceful=True)  # fresh processes, as ``decoupled compare`` runs each method
        train_ray(probe, Path(tmp.name) / "probe", dataset, workers)
        after = speed()
        timelines = _ray().get([a.steps_timeline.remote() for a in workers.actors], timeout=probe.links.timeout_s)
    alone = stage_alone_factor(computed, expected_alone, (before + between) / 2, warmup)
    overlaps, speed = step_overlaps(timelines, warmup), (between + after) / 2
    if record is not None:  # what the factors rest on, for the profile's reader
        record.update(step_s=[d for d, _ in overlaps], overlapped=[o for _, o in overlaps], expected_s=expected,
                      host_speed=speed, plain_ratio=sum(d for d, _ in overlaps) / (sum(expected) * speed),
                      alone_compute_s=[_mean_after(log, warmup) for log in computed],
                      alone_expected_s=expected_alone, alone_host_speed=(before + between) / 2,
                      host_speeds=[before, between, after])
    return {"1": alone, "2": pair_slowdown(overlaps, expected, speed, alone)}


def _mean_after(log: list[tuple[int, float]], warmup: int) -> float:
    return statistics.mean(seconds for step, seconds in log if step >= warmup)


def stage_alone_factor(computed: list[list[tuple[int, float]]], expected: list[float], speed: float,
                       warmup: int) -> float:
    """How much slower the stages computed, one at a time, than the profile's times for them
    (``expected``, scaled by the host's ``speed`` then): their mean seconds per step from
    ``warmup`` on (``computed``: each stage's (step, seconds), from ``steps_compute``), summed,
    over the profile's. Never under 1: the runtime adds work, it cannot take the blocks' away."""
    return max(1.0, sum(_mean_after(log, warmup) for log in computed) / (sum(expected) * speed))


def step_overlaps(timelines: list[list[tuple[int, float, float]]], warmup: int) -> list[tuple[float, float]]:
    """Per stage: its mean step (seconds, from ``warmup`` on) and the fraction of that time another
    stage was computing beside it (timelines: (step, start, end) on one clock).

    The mean, not the median: throughput pays for the occasional slow step too, and on cores that
    both stages keep busy those come from everything else on the host (Ray's own processes)."""
    out = []
    for k, timeline in enumerate(timelines):
        others = [(start, end) for j, tl in enumerate(timelines) if j != k for _, start, end in tl]
        steps = [(start, end) for step, start, end in timeline if step >= warmup and end > start]
        total = sum(end - start for start, end in steps)
        beside = sum(max(0.0, min(end, o_end) - max(start, o_start))
                     for start, end in steps for o_start, o_end in others)
        out.append((total / len(steps), beside / total))
    return out


def pair_slowdown(overlaps: list[tuple[float, float]], expected: list[float], speed: float,
                  alone: float = 1.0) -> float:
    """The slowdown of two tasks at once that turns the profile's step times (``expected``, scaled
    by the host's ``speed`` now) into the steps measured (``step_overlaps``), in the simulation's
    terms: a task progresses at 1/f while the other stage computes and at 1/``alone`` (the stages'
    factor one at a time, ``stage_alone_factor``) while it computes alone.

    A stage that waits for its input is overlapped for only part of its step; taking the whole
    step as slowed would understate what two stages computing all the time (data parallel, replay)
    lose. Where the steps cannot be read that way, the plain ratio of the whole steps: hardly
    overlapped (under 20%), or as slow alone as the profile's whole step, or a factor over 2 (two
    tasks on two cores run no slower than sharing one: past that, what slows them is overhead
    outside the overlap, as in a tiny net's steps on a loaded host).
    """
    beside = sum(d * o for d, o in overlaps)
    alone_s = sum(d * (1 - o) for d, o in overlaps)
    work = sum(expected) * speed  # the steps' compute at the host's speed now: what they take alone
    plain = (alone_s + beside) / work
    done_alone = alone_s / alone  # of ``work``, what the stages did while the other one waited
    if beside < 0.2 * (alone_s + beside) or work <= done_alone:
        return plain
    factor = beside / (work - done_alone)
    return factor if factor <= 2.0 else plain


def _contention_worker(rank: int, model: dict, shape: tuple, classes: int, batch: int, threads: int, rounds: int,
                       phase_s: float, barrier, results) -> None:
    from pydantic import TypeAdapter

    from ..config import ModelConfig

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = nn.Sequential(*build_blocks(TypeAdapter(ModelConfig).validate_python(model), shape, classes))
    x, y = torch.randn(batch, *shape), torch.randint(0, classes, (batch,))

    def median_step() -> float:
        steps, t0 = [], time.perf_counter()
        while time.perf_counter() - t0 < phase_s or len(steps) < 3:
            t = time.perf_counter()
            F.cross_entropy(net(x), y).backward()
            steps.append(time.perf_counter() - t)
        return statistics.median(steps)

    F.cross_entropy(net(x), y).backward()  # warm-up
    alone, together = [], []
    for _ in range(rounds):
        barrier.wait()
        if rank == 0:  # the others wait at the next barrier meanwhile
            alone.append(median_step())
        barrier.wait()  # all start together, so the steps overlap
        together.append(median_step())
    results.put((alone, together) if rank == 0 else None)


def measure_ddp_lockstep(cfg: Config, dataset: Dataset, rounds: int = 3, steps: int = 8) -> float:
    """How much longer torch's DDP steps take than the same two processes stepping the whole net
    at once without synchronising, its gradient all-reduce aside (the simulation adds the ring).

    Replicas in lockstep wait for the slower one each step, and two processes run the same step
    at speeds 4-6% apart (docs/RESULTS.md 3a); DDP's own work (buckets, hooks) comes on top. On this
    machine's benchmarks that made DDP 1.02-1.20x the unsynchronised step, what the contention probes
    (different stages, or the same net unsynchronised) do not see. Measured on two gloo processes,
    ``rounds`` times in turn, ``steps`` mean steps each: the median round's slower DDP replica over
    the replicas' unsynchronised mean. Never under 1.
    """
    measured = run_gloo_pair(_ddp_lockstep_peer, cfg.model.model_dump(mode="json"), tuple(dataset.input_shape),
                             dataset.num_classes, cfg.train.batch_size, cfg.train.threads or 1, rounds, steps,
                             timeout_s=600)
    ratios = [(max(r["ddp"][i] for r in measured) - statistics.median(measured[0]["allreduce"]))
              / statistics.mean(r["together"][i] for r in measured) for i in range(rounds)]
    return max(1.0, statistics.median(ratios))


def _ddp_lockstep_peer(rank: int, port: int, model: dict, shape: tuple, classes: int, batch: int, threads: int,
                       rounds: int, steps: int, results, alone: bool = False) -> None:
    """Mean seconds per step of the whole net, per round: both replicas unsynchronised ("together"),
    through DDP with the stop flag ("ddp"), one all-reduce of the gradients ("allreduce"), and with
    ``alone`` each replica with its peer waiting ("alone"; benchmarks/pipeline_in_situ.py)."""
    import torch.distributed as dist
    from pydantic import TypeAdapter
    from torch.nn.parallel import DistributedDataParallel

    from ..config import ModelConfig

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=timedelta(seconds=300))
    net = nn.Sequential(*build_blocks(TypeAdapter(ModelConfig).validate_python(model), shape, classes))
    ddp = DistributedDataParallel(net)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    x, y = torch.randn(batch, *shape), torch.randint(0, classes, (batch,))
    grads = torch.zeros(sum(p.numel() for p in net.parameters()))

    def mean_step(model: nn.Module, lockstep: bool, together: bool = True) -> float:
        if together:  # both start at once
            dist.barrier()
        t0 = time.perf_counter()
        for _ in range(steps):
            if lockstep:  # the runtime's per-step stop flag
                dist.all_reduce(torch.zeros(1))
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return (time.perf_counter() - t0) / steps

    mean_step(ddp, True)  # warm-up
    report: dict = {"rank": rank, "alone": [], "together": [], "ddp": [], "allreduce": []}
    for _ in range(rounds):
        for who in (0, 1) if alone else ():
            dist.barrier()
            if rank == who:  # the peer waits at the next barrier
                report["alone"].append(mean_step(net, False, together=False))
        report["together"].append(mean_step(net, False))
        report["ddp"].append(mean_step(ddp, True))
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(grads)
        report["allreduce"].append(time.perf_counter() - t0)
    results.put(report)
    dist.destroy_process_group()


def measure_pipeline_overhead(batch: int, microbatches: tuple[int, int] = (2, 8), steps: int = 30) -> dict:
    """Seconds torch's GPipe and 1F1B schedules spend per step beyond the model's compute, as
    ``per_step_s + per_microbatch_s * M``: measured with a one-Linear model on two gloo processes,
    so what remains is the schedules' own work (micro-batch bookkeeping, P2P calls, waits)."""
    measured = run_gloo_pair(_pipeline_peer, batch, microbatches, steps)
    out = {}
    m0, m1 = microbatches
    for kind in ("gpipe", "1f1b"):
        t0 = max(r[f"{kind}-{m0}"] for r in measured)
        t1 = max(r[f"{kind}-{m1}"] for r in measured)
        per_micro = max(0.0, (t1 - t0) / (m1 - m0))
        out[kind] = {"per_step_s": max(0.0, t0 - per_micro * m0), "per_microbatch_s": per_micro}
    out["source"] = "measured: torch.distributed.pipelining, a one-Linear model on two gloo processes"
    return out


def _pipeline_peer(rank: int, port: int, batch: int, microbatches: tuple[int, ...], steps: int, results) -> None:
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=timedelta(seconds=60))
    out = {}
    x, y = torch.randn(batch, 16), torch.randint(0, 16, (batch,))
    for kind, schedule in (("gpipe", ScheduleGPipe), ("1f1b", Schedule1F1B)):
        for m in microbatches:
            micro = batch // m
            stage = PipelineStage(nn.Linear(16, 16), rank, 2, torch.device("cpu"),
                                  input_args=torch.empty(micro, 16, requires_grad=rank > 0),
                                  output_args=torch.empty(micro, 16, requires_grad=True))
            run = schedule(stage, m, loss_fn=F.cross_entropy, scale_grads=True)
            times = []
            for i in range(steps + 3):
                t0 = time.perf_counter()
                run.step(x) if rank == 0 else run.step(target=y, losses=[])
                if i >= 3:
                    times.append(time.perf_counter() - t0)
            out[f"{kind}-{m}"] = statistics.median(times)
    results.put(out)
    dist.destroy_process_group()


def gpu_cluster_link(bandwidth_gbytes: float = 25.0, latency_us: float = 10.0) -> dict:
    """A stated link model: the default is a 200 Gb/s InfiniBand HDR path between nodes (25 GB/s)
    with 10 us of latency per message, GPU-direct (no host copies)."""
    return {"latency_s": latency_us * 1e-6, "bandwidth_bytes_per_s": bandwidth_gbytes * 1e9,
            "source": f"assumed: {bandwidth_gbytes:g} GB/s, {latency_us:g} us per message"}


# --------------------------------------------------------------- DNI's Ray path


def _host_busy_s() -> float | None:
    """CPU-seconds every process on this host has used (Linux /proc/stat; None elsewhere)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def measure_coordinator_path(methods: list, outputs: list[torch.Tensor], y: torch.Tensor, classes: int,
                             boundaries: list[dict], samples: int = 8, requests: int = 16,
                             idle_s: float = 2.0) -> dict[str, list[dict]]:
    """What DNI's coordinator traffic costs on this machine, per boundary and method, through the
    same Ray calls and ``PredictorCoordinator`` the runtime uses (an embedded Ray is started if none is).

    Per sample: ``ray_submit_s``, the sending stage's time in ``submit.remote`` (serialising
    (h, y, dL/dh) into Ray's object store), and ``coordinator_sample_s``, the CPU the rest of the
    host spends on it (the coordinator's receive and training step, Ray's own processes). Per
    weights request: ``weights_request_s``, the asking stage's CPU (request, reply, loading), and
    ``weights_host_s``, the rest. Host CPU is read from /proc/stat net of what the host used while
    idle just before; without /proc/stat only the coordinator process is counted.

    Training on the coordinator measured 57 ms of CPU per sample where the same step in-process took
    33 ms, and each weights request ~12 ms of CPU in all: profiling the training step alone missed it.
    """
    from ..runtime.coordinator import PredictorCoordinator
    from ..runtime.ray_runtime import _ray

    ray = _ray(embedded=True)
    started = not ray.is_initialized()
    if started:
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, configure_logging=False,
                 log_to_driver=False, num_cpus=_cores())
    out: dict[str, list[dict]] = {}
    try:
        for m in methods:
            label = m.display_name()
            env = {"GLIBC_TUNABLES": os.environ["GLIBC_TUNABLES"]} if "GLIBC_TUNABLES" in os.environ else None
            coordinator = ray.remote(PredictorCoordinator).options(  # started as the runtime starts its own
                num_cpus=0, max_concurrency=4, runtime_env={"env_vars": env} if env else None).remote(
                m.model_dump(mode="json"), classes)
            out[label] = []
            for b, (h, boundary) in enumerate(zip(outputs, boundaries)):
                shape = tuple(h.shape[1:])
                hidden = m.predictor_hidden or shape[0]
                predictor = GradientPredictor(shape, classes, m.conditioned, hidden, m.predictor_layers,
                                              m.predictor_kernel_size)
                ray.get(coordinator.register.remote(b, shape, hidden, predictor.state_dict()), timeout=120)
                h, labels = h.cpu().contiguous(), y.cpu()
                grad = torch.randn_like(h) / h.shape[0]
                # one warm-up of each call: first-call costs are not the steady state
                ray.get(coordinator.submit.remote(b, h, labels, grad), timeout=120)
                ray.get(coordinator.weights.remote(b, -1), timeout=120)
                pause = 0.05 + 4 * boundary["methods"][label]["train_s"]  # each sample trained before the next
                time.sleep(pause)
                idle = _cpu_rates(ray, coordinator, idle_s)

                def submit() -> float:
                    t0 = time.perf_counter()
                    ref = coordinator.submit.remote(b, h, labels, grad)
                    caller = time.perf_counter() - t0
                    ray.get(ref, timeout=120)
                    time.sleep(pause)
                    return caller

                def ask() -> float:
                    reply = ray.get(coordinator.weights.remote(b, -1), timeout=120)
                    predictor.load_state_dict(reply[1])
                    return 0.0

                per_sample, caller = _host_cpu_per_call(ray, coordinator, submit, samples, idle)
                per_request, _ = _host_cpu_per_call(ray, coordinator, ask, requests, idle)
                out[label].append({
                    "ray_submit_s": caller,
                    "coordinator_sample_s": max(per_sample["host"] - caller, per_sample["coordinator"]),
                    "weights_request_s": per_request["stage"],
                    "weights_host_s": max(per_request["host"] - per_request["stage"], per_request["coordinator"]),
                })
            ray.kill(coordinator)
    finally:
        if started:
            ray.shutdown()
    return out


def _cpu_rates(ray, coordinator, seconds: float) -> dict[str, float]:
    """CPU-seconds per second the host and the coordinator use while nothing is sent."""
    host0, coord0, t0 = _host_busy_s(), ray.get(coordinator.cpu_seconds.remote(), timeout=60), time.perf_counter()
    time.sleep(seconds)
    host1, coord1 = _host_busy_s(), ray.get(coordinator.cpu_seconds.remote(), timeout=60)
    wall = time.perf_counter() - t0
    return {"host": (host1 - host0) / wall if host0 is not None else None, "coordinator": (coord1 - coord0) / wall}


def _host_cpu_per_call(ray, coordinator, call: Callable[[], float], n: int, idle: dict) -> tuple[dict, float]:
    """CPU-seconds per ``call``: this process's (``stage``), the coordinator's, and the host's, each net of
    its idle rate; and the median of what ``call`` returned."""
    host0, coord0 = _host_busy_s(), ray.get(coordinator.cpu_seconds.remote(), timeout=60)
    own0, t0 = time.process_time(), time.perf_counter()
    returned = [call() for _ in range(n)]
    wall = time.perf_counter() - t0
    own = (time.process_time() - own0) / n
    coord = max(0.0, (ray.get(coordinator.cpu_seconds.remote(), timeout=60) - coord0 - idle["coordinator"] * wall) / n)
    host1 = _host_busy_s()
    host = coord + own if host0 is None or idle["host"] is None else \
        max(coord + own, (host1 - host0 - idle["host"] * wall) / n)
    return {"stage": own, "coordinator": coord, "host": host}, statistics.median(returned)


# ----------------------------------------------------------------- assumed devices


def assume_device(profile: dict, tflops: float, overhead_us: float, memory_gbytes: float = 2000.0,
                  name: str | None = None) -> dict:
    """The profile as a device we do not have would run it: every time becomes its counted FLOPs at
    ``tflops`` achieved, plus ``overhead_us`` per layer and pass (kernel launches); updates and weight
    copies move their bytes at ``memory_gbytes`` GB/s. The DNI coordinator's predictor training keeps
    its measured time: the runtime trains predictors on the coordinator's CPU.
    """
    rate, over, mem = tflops * 1e12, overhead_us * 1e-6, memory_gbytes * 1e9
    out = copy.deepcopy(profile)
    out["device"] = name or f"assumed device: {tflops:g} TFLOP/s achieved, {overhead_us:g} us per layer and pass, " \
                            f"{memory_gbytes:g} GB/s memory"
    out["device_type"] = "assumed"
    out["timed"] = True  # every time is now set
    out["cores"] = None
    out.pop("ddp_lockstep", None)  # this machine's processes and gloo, not the device's
    for blk in out["blocks"]:
        for size, f in blk["flops"].items():
            blk["fwd_s"][size] = f["fwd"] / rate + blk["layers"] * over
            blk["bwd_input_s"][size] = f["bwd"] / rate + blk["layers"] * over
            blk["bwd_s"][size] = f["bwd_noinput"] / rate + blk["layers"] * over
        for name in ("fwd_live_s", "bwd_live_s", "bwd_input_live_s"):  # this machine's memory effect
            blk.pop(name, None)
        blk["opt_s"] = 16 * blk["params"] / mem + 3 * over  # read weight, gradient, momentum; write two
        blk["clone_s"] = 8 * blk["params"] / mem + over
    for boundary in out["boundaries"]:
        for extra in boundary["methods"].values():
            if "aux_flops" in extra:
                extra["aux_s"] = extra["aux_flops"] / rate + 2 * extra["aux_layers"] * over
            if "predict_flops" in extra:
                extra["predict_s"] = extra["predict_flops"] / rate + extra["predictor_layers"] * over
                # the sample leaves the GPU for the coordinator: a host copy at PCIe speed (25 GB/s)
                extra["submit_s"] = extra["sample_bytes"] / 25e9 + over
            if "project_flops" in extra:
                extra["project_s"] = extra["project_flops"] / rate + over
    return out


def merge_profiles(profiles: list[dict]) -> dict:
    """Several profiles of the same model (say, taken before and after a benchmark on a shared
    host whose speed drifts) as one: each time is the median of theirs."""
    if len(profiles) == 1:
        return profiles[0]
    first = profiles[0]
    for p in profiles[1:]:
        if p["model"] != first["model"] or p["batch_size"] != first["batch_size"] or p["sizes"] != first["sizes"]:
            raise ValueError("--profile: the profiles describe different models, batch sizes or micro-batch sizes")

    def merge(values: list):
        head = values[0]
        if isinstance(head, dict):
            return {k: merge([v[k] for v in values]) if all(isinstance(v, dict) and k in v for v in values) else
                    head[k] for k in head}
        if isinstance(head, list) and all(isinstance(v, list) and len(v) == len(head) for v in values):
            return [merge(list(items)) for items in zip(*values)]
        if isinstance(head, float) and all(isinstance(v, float) for v in values):
            return statistics.median(values)
        return head

    out = merge(profiles)
    out["merged_from"] = [p.get("measured") for p in profiles]
    return out
