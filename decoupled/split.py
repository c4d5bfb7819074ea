"""Group a model's blocks into K pipeline stages at block boundaries.

Balanced means the slowest stage is as fast as it can be: a pipeline runs at the pace
of its slowest stage, so we minimise the largest stage cost over contiguous groupings
(costs: parameter count, or measured forward+backward time).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
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


def pass_times(blocks: list[nn.Module], x: torch.Tensor, input_grad: bool,
               sync: Callable[[], None] = lambda: None, chunks: int = 1) -> list[tuple[float, float]]:
    """Seconds of each block's forward and backward in one pass through all of them: forwards in
    order, each on its predecessor's output, then backwards in reverse, each on its successor's
    gradient (``input_grad``: every block also computes dL/dinput; else each gets a gradient of
    ones). Timed one block at a time on inputs made long before, the same work measured 2-4% slower
    (VGG on CPU at batch 64-128); this pass's sum came within -3.5%..+2.5% of one backward through
    the whole net (VGG and ResNet, batch 16-128).

    ``chunks``: ``x`` split into that many micro-batches, all forwarded (their tensors kept) before
    the first backward, micro-batch 0's first, as GPipe runs them; the times are per micro-batch.
    Memory still in use cannot be reused while it is in cache: a VGG stage's 4-8 micro-batches
    of 16-32 took 5-12% longer so than one at a time on CPU (in this whole-net pass, -1..+7%).
    """
    kept, fwd = [], [0.0] * len(blocks)
    for part in x.chunk(chunks):
        inputs, outputs = [], []
        h = part
        for j, block in enumerate(blocks):
            inp = h.detach().requires_grad_(input_grad)
            sync()
            t0 = time.perf_counter()
            h = block(inp)
            sync()
            fwd[j] += time.perf_counter() - t0
            inputs.append(inp)
            outputs.append(h)
        kept.append((inputs, outputs))
    bwd = [0.0] * len(blocks)
    for inputs, outputs in kept:
        grad = torch.ones_like(outputs[-1])
        for j in reversed(range(len(blocks))):
            # let go of each block's tensors once it is done, as one backward through the net does:
            # holding them all made the ResNet's pass 7% slower than a training step (fresh pages)
            out, inp = outputs.pop(), inputs.pop()
            sync()
            t0 = time.perf_counter()
            out.backward(grad)
            sync()
            bwd[j] += time.perf_counter() - t0
            del out
            if j:
                grad = inp.grad if input_grad else torch.ones_like(outputs[-1])
            del inp
    n = len(kept)
    return [(f / n, b / n) for f, b in zip(fwd, bwd)]


def block_times(blocks: list[nn.Module], sample: torch.Tensor, repeats: int = 3) -> list[float]:
    """Median forward+backward seconds of each block on ``sample`` (a training batch), in passes
    through all of them as a stage runs them (``pass_times``; the first pass warms up).

    Timed on copies: a training-mode forward would move the real BatchNorm statistics.
    """
    copies = copy.deepcopy(blocks)
    for block in copies:
        block.train()
    passes = []
    for _ in range(repeats + 1):
        passes.append(pass_times(copies, sample, input_grad=True))
        for block in copies:  # each pass starts without gradients, as a training step does
            block.zero_grad(set_to_none=True)
    return [statistics.median(sum(times[j]) for times in passes[1:]) for j in range(len(copies))]


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
