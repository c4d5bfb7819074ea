"""Models as block lists, and splitting them into stages."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from decoupled.config import DNICNNModel, MLPModel, ResNetModel, SplitConfig, VGGModel
from decoupled.models import build_blocks
from decoupled.split import describe_split, partition, plan_split, stage_modules

MODELS = [
    (MLPModel(name="mlp", hidden=[16, 12, 8]), (1, 8, 8)),
    (VGGModel(name="vgg", widths=[4, 8, 8], convs_per_block=2), (3, 16, 16)),
    (ResNetModel(name="resnet", widths=[4, 8], depths=[2, 1]), (3, 16, 16)),
    (DNICNNModel(name="dni_cnn", channels=6), (3, 32, 32)),
]


@pytest.mark.parametrize("cfg,shape", MODELS, ids=lambda v: getattr(v, "name", ""))
def test_block_count_matches_config(cfg, shape):
    assert len(build_blocks(cfg, shape, 10)) == cfg.num_blocks()


@pytest.mark.parametrize("cfg,shape", MODELS, ids=lambda v: getattr(v, "name", ""))
def test_split_then_rejoin_gives_the_original_outputs(cfg, shape):
    torch.manual_seed(0)
    blocks = build_blocks(cfg, shape, 10)
    whole = nn.Sequential(*blocks).eval()
    x = torch.randn(4, *shape)
    expected = whole(x)
    for k in range(1, len(blocks) + 1):
        plans = plan_split(blocks, SplitConfig(stages=k, balance="params"), shape)
        assert [p.start for p in plans] == sorted(p.start for p in plans) and plans[-1].stop == len(blocks)
        h = x
        for plan, module in zip(plans, stage_modules(blocks, plans)):
            assert tuple(h.shape[1:]) == plan.input_shape
            h = module.eval()(h)
            assert tuple(h.shape[1:]) == plan.output_shape
        torch.testing.assert_close(h, expected)


def brute_force_max_cost(costs, k):
    n = len(costs)
    best = float("inf")
    for cuts in itertools.combinations(range(1, n), k - 1):
        edges = [0, *cuts, n]
        best = min(best, max(sum(costs[a:b]) for a, b in zip(edges, edges[1:])))
    return best


@pytest.mark.parametrize("seed", range(5))
def test_partition_minimises_the_slowest_stage(seed):
    g = torch.Generator().manual_seed(seed)
    costs = torch.randint(1, 100, (7,), generator=g).tolist()
    for k in range(1, 8):
        bounds = partition(costs, k)
        edges = [0, *bounds, len(costs)]
        assert len(bounds) == k - 1 and all(a < b for a, b in zip(edges, edges[1:]))
        assert max(sum(costs[a:b]) for a, b in zip(edges, edges[1:])) == brute_force_max_cost(costs, k)


def test_explicit_boundaries_and_time_balance():
    torch.manual_seed(0)
    cfg = MLPModel(name="mlp", hidden=[64, 8, 8])
    blocks = build_blocks(cfg, (32,), 4)
    plans = plan_split(blocks, SplitConfig(stages=2, boundaries=[3]), (32,))
    assert [(p.start, p.stop) for p in plans] == [(0, 3), (3, 4)]
    timed = plan_split(blocks, SplitConfig(stages=2, balance="time"), (32,), sample=torch.randn(16, 32))
    assert all(p.cost > 0 for p in timed)
    text = describe_split(timed, "time")
    assert "stage" in text and "ms" in text and "slowest/mean" in text
