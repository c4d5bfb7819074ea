"""Group a model's blocks into K pipeline stages at block boundaries.

Balanced means the slowest stage is as fast as it can be: a pipeline runs at the pace
of its slowest stage, so we minimise the largest stage cost over contiguous groupings
(costs: parameter count, or measured forward+backward time).
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from .config import SplitConfig
from .models import count_parameters, output_shape


@dataclass
class StagePlan:
    """What one stage holds: blocks ``[start, stop)`` of the model."""

    index: int
    start: int
    stop: int
    params: int
    cost: float
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]


def partition(costs: list[float], k: int) -> list[int]:
    """Boundaries (first block of stages 1..k-1) of the contiguous k-way split minimising the largest group cost."""
    n = len(costs)
    if not 1 <= k <= n:
        raise ValueError(f"cannot split {n} blocks into {k} stages")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[j][i]: smallest max-cost of splitting the first i blocks into j groups
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for j in range(1, k + 1):
        for i in range(j, n - (k - j) + 1):
            for s in range(j - 1, i):
                v = max(best[j - 1][s], prefix[i] - prefix[s])
                if v < best[j][i]:
                    best[j][i], cut[j][i] = v, s
    bounds, i = [], n
    for j in range(k, 0, -1):
        i = cut[j][i]
        bounds.append(i)
    return sorted(bounds)[1:]  # drop the leading 0


def block_times(blocks: list[nn.Module], sample: torch.Tensor, repeats: int = 3) -> list[float]:
    """Median forward+backward seconds of each block on ``sample`` (a training batch).

    Timed on copies: a training-mode forward would move the real BatchNorm statistics.
    """
    times = []
    x = sample
    for block in copy.deepcopy(blocks):
        block.train()
        samples = []
        for _ in range(repeats + 1):  # the first run warms up kernels and allocator
            inp = x.detach().requires_grad_(True)
            t0 = time.perf_counter()
            out = block(inp)
            out.backward(torch.ones_like(out))
            samples.append(time.perf_counter() - t0)
        block.zero_grad(set_to_none=True)
        times.append(statistics.median(samples[1:]))
        with torch.no_grad():
            x = block(x.detach())
    return times


def plan_split(
    blocks: list[nn.Module], cfg: SplitConfig, input_shape: tuple[int, ...], sample: torch.Tensor | None = None
) -> list[StagePlan]:
    """Decide which blocks each of ``cfg.stages`` stages holds."""
    params = [count_parameters(b) for b in blocks]
    if cfg.balance == "time" and cfg.boundaries is None:
        if sample is None:
            raise ValueError("split.balance=time needs a sample batch to time the blocks")
        costs = block_times(blocks, sample)
    elif cfg.balance in ("params", "time"):  # "time" with fixed boundaries: nothing to balance, no timing
        costs = [float(p) for p in params]
    else:
        costs = [1.0] * len(blocks)
    bounds = list(cfg.boundaries) if cfg.boundaries is not None else partition(costs, cfg.stages)
    edges = [0, *bounds, len(blocks)]
    plans, shape = [], tuple(input_shape)
    for i in range(cfg.stages):
        start, stop = edges[i], edges[i + 1]
        out = output_shape(nn.Sequential(*blocks[start:stop]), shape)
        plans.append(StagePlan(i, start, stop, sum(params[start:stop]), sum(costs[start:stop]), shape, out))
        shape = out
    return plans


def stage_modules(blocks: list[nn.Module], plans: list[StagePlan]) -> list[nn.Sequential]:
    return [nn.Sequential(*blocks[p.start : p.stop]) for p in plans]


def describe_split(plans: list[StagePlan], balance: str) -> str:
    unit = {"time": "ms", "params": "params", "even": "blocks"}[balance]
    scale = 1000.0 if balance == "time" else 1.0
    rows = [f"{'stage':>5}  {'blocks':>9}  {'params':>10}  {'cost (' + unit + ')':>14}  {'input':>14}  {'output':>14}"]
    for p in plans:
        rows.append(
            f"{p.index:>5}  {f'{p.start}..{p.stop - 1}':>9}  {p.params:>10,}  {p.cost * scale:>14,.3g}"
            f"  {str(p.input_shape):>14}  {str(p.output_shape):>14}"
        )
    costs = [p.cost for p in plans]
    if max(costs) > 0:
        rows.append(f"balance: slowest/mean stage cost = {max(costs) / statistics.mean(costs):.2f} (1.00 is perfect)")
    return "\n".join(rows)
