"""Does the planner's schedule model hold for GPipe/1F1B (and DDP) on real stages? (docs/RESULTS.md 3a)

Two gloo processes run a config's model, split at ``--boundary``, through
torch.distributed.pipelining, in rounds that alternate:

- alone: each stage in turn does one step's micro-batch forwards and backwards in GPipe order
  with no pipeline and its peer waiting (the profile's view of its compute: wall time, and
  main-thread CPU time);
- in situ: both run the real schedule; each step's main-thread CPU time is the stage's compute
  there (waits for the peer sleep, so they do not count).

Then the planner's simulation (``decoupled.plan.simulate``) is given each stage's in-situ compute
and, separately, its alone compute, and its step time is printed beside the measured one (the
median step wall time of the in-situ phases), with each stage's CPU milliseconds per step alone
and in situ.

    python benchmarks/pipeline_in_situ.py --config configs/bench_cpu.yaml --boundary 2 \
        --schedules gpipe-2,gpipe-8,1f1b-8

``--schedules ddp`` does the same for data parallel on the whole net (no ``--boundary``): each
replica's step alone, both replicas stepping at once unsynchronised, and torch's DDP with the
runtime's per-step stop-flag all-reduce (mean steps; the planner's DDP lockstep probe).

    python benchmarks/pipeline_in_situ.py --config configs/bench_cpu.yaml --schedules ddp --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from datetime import timedelta

import torch
import torch.nn.functional as F
from torch import nn


def _peer(rank: int, port: int, config: str, boundary: int, kind: str, m: int, rounds: int, steps: int, pin: bool,
          results):
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    from decoupled.config import load_config
    from decoupled.models import build_blocks
    from decoupled.train import prepare

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if pin:  # this process (and the threads it starts: gloo's) on one core of its own
        os.sched_setaffinity(0, {rank % len(os.sched_getaffinity(0))})
    cfg, dataset = prepare(load_config(config))
    torch.set_num_threads(cfg.train.threads or 1)
    torch.manual_seed(cfg.seed)
    blocks = build_blocks(cfg.model, dataset.input_shape, dataset.num_classes)
    batch, micro = cfg.train.batch_size, cfg.train.batch_size // m
    x, y = dataset.train_x[:batch], dataset.train_y[:batch]
    with torch.no_grad():
        h = nn.Sequential(*blocks[:boundary])(x)
    module = nn.Sequential(*(blocks[:boundary] if rank == 0 else blocks[boundary:]))
    inp = x if rank == 0 else h
    store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=timedelta(seconds=300))
    out_shape = tuple(h.shape[1:]) if rank == 0 else (dataset.num_classes,)
    stage = PipelineStage(module, rank, 2, torch.device("cpu"),
                          input_args=torch.empty(micro, *inp.shape[1:], requires_grad=rank > 0),
                          output_args=torch.empty(micro, *out_shape, requires_grad=True))
    schedule = (ScheduleGPipe if kind == "gpipe" else Schedule1F1B)(stage, m, loss_fn=F.cross_entropy,
                                                                     scale_grads=True)

    def alone() -> tuple[float, float, float]:
        """Seconds of this stage's forwards and of its backwards for one step, GPipe order, and their CPU time."""
        c0, t0 = time.thread_time(), time.perf_counter()
        outs = [module(inp[i * micro:(i + 1) * micro].detach().requires_grad_(rank > 0)) for i in range(m)]
        t1 = time.perf_counter()
        for i, o in enumerate(outs):
            (F.cross_entropy(o, y[i * micro:(i + 1) * micro]) if rank == 1 else o.mean()).backward()
        module.zero_grad(set_to_none=True)
        return t1 - t0, time.perf_counter() - t1, time.thread_time() - c0

    def in_situ() -> tuple[float, float]:
        """Main-thread CPU seconds and wall seconds of one pipelined step."""
        module.zero_grad(set_to_none=True)
        c0, t0 = time.thread_time(), time.perf_counter()
        schedule.step(x) if rank == 0 else schedule.step(target=y, losses=[])
        return time.thread_time() - c0, time.perf_counter() - t0

    in_situ(), alone()  # warm-up
    report = {"alone_fwd": [], "alone_bwd": [], "alone_cpu": [], "in_situ": [], "step": []}
    for _ in range(rounds):
        for who in (0, 1):  # one stage at a time: the other waits at the barrier
            dist.barrier()
            if rank == who:
                fwd, bwd, cpu = zip(*(alone() for _ in range(steps)))
                report["alone_fwd"].append(statistics.median(fwd))
                report["alone_bwd"].append(statistics.median(bwd))
                report["alone_cpu"].append(statistics.median(cpu))
        dist.barrier()
        cpu, wall = zip(*(in_situ() for _ in range(steps)))
        report["in_situ"].append(statistics.median(cpu))
        report["step"].append(statistics.median(wall))
    results.put((rank, {k: statistics.median(v) for k, v in report.items()}))
    dist.destroy_process_group()


def measure(config: str, boundary: int, kind: str, m: int, rounds: int, steps: int,
            pin: bool = False) -> dict[int, dict]:
    from decoupled.plan.profile import run_gloo_pair

    return dict(run_gloo_pair(_peer, config, boundary, kind, m, rounds, steps, pin, timeout_s=1800))


def simulated_step(kind: str, m: int, batch: int, per_stage: list[tuple[float, float]], out_bytes: float,
                   link) -> float:
    """The planner's step time for stages whose step does (forwards, backwards) seconds of compute."""
    from decoupled.plan.simulate import LinkCost, StageTimes, Workload, simulate

    stages = [StageTimes(fwd_micro=f / m, bwd_micro=b / m, out_bytes=out_bytes if k == 0 else 0.0)
              for k, (f, b) in enumerate(per_stage)]
    w = Workload(kind, stages, batch, steps=40, warmup=5, microbatches=m)
    p = simulate(w, LinkCost.from_profile(link), cores=2, contention=None)
    return batch / p.samples_per_sec


def _print_ddp(config: str, rounds: int, steps: int) -> None:
    """One line per round and replica: alone, together unsynchronised, and DDP mean step ms (the
    planner's DDP lockstep probe, ``measure_ddp_lockstep``, with each replica also timed alone)."""
    import functools

    from decoupled.config import load_config
    from decoupled.plan.profile import _ddp_lockstep_peer, run_gloo_pair
    from decoupled.train import prepare

    cfg, dataset = prepare(load_config(config))
    peer = functools.partial(_ddp_lockstep_peer, alone=True)
    reports = run_gloo_pair(peer, cfg.model.model_dump(mode="json"), tuple(dataset.input_shape), dataset.num_classes,
                            cfg.train.batch_size, cfg.train.threads or 1, rounds, steps, timeout_s=1800)
    r = {report["rank"]: report for report in reports}
    print("\n| ddp round | replica | step alone ms | both at once, unsynchronised | DDP with the stop flag | DDP / at once |")
    print("|---|---|---|---|---|---|")
    for i in range(rounds):
        for k in (0, 1):
            a, t, d = (1e3 * r[k][key][i] for key in ("alone", "together", "ddp"))
            print(f"| {i + 1} | {k} | {a:.0f} | {t:.0f} | {d:.0f} | {d / t:.2f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--boundary", type=int, help="first block of stage 1 (GPipe/1F1B)")
    ap.add_argument("--schedules", default="gpipe-2,gpipe-8,1f1b-8", help="KIND-M,... (gpipe or 1f1b), or ddp")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5, help="steps per phase of a round")
    ap.add_argument("--pin-cores", action="store_true", help="pin each process to a core of its own (Linux)")
    args = ap.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from decoupled.config import load_config
    from decoupled.models import build_blocks
    from decoupled.plan.profile import measure_link
    from decoupled.train import prepare

    pipelined = [spec for spec in args.schedules.split(",") if spec != "ddp"]
    if pipelined and args.boundary is None:
        ap.error(f"--boundary: needed by {', '.join(pipelined)}")
    if not pipelined:
        _print_ddp(args.config, args.rounds, args.steps)
        return
    cfg, dataset = prepare(load_config(args.config))
    blocks = build_blocks(cfg.model, dataset.input_shape, dataset.num_classes)
    with torch.no_grad():
        h = nn.Sequential(*blocks[:args.boundary])(dataset.train_x[:1])
    out_bytes = cfg.train.batch_size * (h.numel() * h.element_size() + 8) + 24
    link = measure_link()
    print(f"link: {1e6 * link['latency_s']:.0f} us + {link['bandwidth_bytes_per_s'] / 1e9:.2f} GB/s")
    print("| schedule | measured step ms | simulated from in-situ compute | from alone compute | "
          "CPU ms per step alone, stage 0 / 1 | in situ, stage 0 / 1 |")
    print("|---|---|---|---|---|---|")
    for spec in args.schedules.split(","):
        if spec == "ddp":
            _print_ddp(args.config, args.rounds, args.steps)
            continue
        kind, m = spec.split("-")
        m = int(m)
        r = measure(args.config, args.boundary, kind, m, args.rounds, args.steps, args.pin_cores)
        alone = [(r[k]["alone_fwd"], r[k]["alone_bwd"]) for k in (0, 1)]
        # in-situ compute, split into forwards and backwards as the stage's alone compute is
        situ = [(r[k]["in_situ"] * f / (f + b), r[k]["in_situ"] * b / (f + b)) for k, (f, b) in enumerate(alone)]
        measured = max(r[0]["step"], r[1]["step"])
        print(f"| {spec} | {1e3 * measured:.0f} | {1e3 * simulated_step(kind, m, cfg.train.batch_size, situ, out_bytes, link):.0f} | "
              f"{1e3 * simulated_step(kind, m, cfg.train.batch_size, alone, out_bytes, link):.0f} | "
              + " | ".join(" / ".join(f"{1e3 * r[k][key]:.0f}" for k in (0, 1)) for key in ("alone_cpu", "in_situ"))
              + " |", flush=True)


if __name__ == "__main__":
    main()
