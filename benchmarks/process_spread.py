"""How much does the same training step's speed differ between processes? (docs/RESULTS.md 3a)

The planner times a model in one process and predicts workers that are other processes. This
runs the config's whole model through the single worker's training step (forward, loss,
backward, optimizer step, on the data set's batches in turn) in ``--processes`` fresh processes,
one after another so they never share the cores, and prints each one's median step time. With
``--ray`` every other process is a Ray worker process (one CPU, as the runtime's stage actors
have; a fresh one each time), so the two environments alternate.

    python benchmarks/process_spread.py --config configs/bench_cpu.yaml --processes 6 --ray
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def median_step_ms(config: str, steps: int, warmup: int, seed: int) -> float:
    import torch
    import torch.nn.functional as F
    from torch import nn

    from decoupled.config import load_config
    from decoupled.models import build_blocks
    from decoupled.stage import build_optimizer
    from decoupled.train import prepare

    cfg, dataset = prepare(load_config(config))
    torch.set_num_threads(cfg.train.threads or 1)
    torch.manual_seed(seed)
    net = nn.Sequential(*build_blocks(cfg.model, dataset.input_shape, dataset.num_classes))
    opt = build_optimizer(list(net.parameters()), cfg.optimizer)
    bs, n = cfg.train.batch_size, len(dataset.train_y)
    times = []
    for i in range(warmup + steps):
        lo = (i * bs) % (n - bs + 1)
        x, y = dataset.train_x[lo:lo + bs], dataset.train_y[lo:lo + bs]
        t = time.perf_counter()
        F.cross_entropy(net(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times[warmup:])


def _in_process(config: str, steps: int, warmup: int, seed: int, out) -> None:
    out.put(median_step_ms(config, steps, warmup, seed))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--processes", type=int, default=6)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per process")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--ray", action="store_true", help="every other process is a Ray worker")
    args = ap.parse_args()

    import torch.multiprocessing as mp

    config = os.path.abspath(args.config)
    ctx = mp.get_context("spawn")
    remote = None
    if args.ray:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # bind loopback only
        import ray

        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
        remote = ray.remote(num_cpus=1, max_calls=1)(median_step_ms)  # max_calls=1: a fresh process each time
    rows = []
    try:
        for i in range(args.processes):
            if remote is not None and i % 2:
                ms = ray.get(remote.remote(config, args.steps, args.warmup, 0), timeout=600)
                rows.append(("Ray worker", ms))
                continue
            out = ctx.Queue()
            p = ctx.Process(target=_in_process, args=(config, args.steps, args.warmup, 0, out))
            p.start()
            try:
                rows.append(("process", out.get(timeout=600)))
            finally:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
    finally:
        if remote is not None:
            ray.shutdown()
    print("\n| # | kind | median step ms |\n|---|---|---|")
    for i, (kind, ms) in enumerate(rows):
        print(f"| {i} | {kind} | {ms:.1f} |")
    for kind in sorted({k for k, _ in rows}):
        ms = [m for k, m in rows if k == kind]
        print(f"{kind}: median {statistics.median(ms):.1f} ms, range {min(ms):.1f}-{max(ms):.1f} "
              f"({max(ms) / min(ms) - 1:+.1%} slowest over fastest)")


if __name__ == "__main__":
    main()
