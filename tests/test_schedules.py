"""E2EBP baselines across processes (GPipe, 1F1B, DDP) against unsplit backprop in the parent.

Three CPU processes (gloo on 127.0.0.1) run every job once per module; each builds its stage the
way the engine does, trains, and saves what it saw to a temporary folder for the parent to check.
"""

from __future__ import annotations

import datetime
import socket
import traceback
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from decoupled.config import BackpropMethod, OptimizerConfig
from decoupled.rules import build_rule
from decoupled.runtime.schedules import DataParallel, PipelineSchedule
from decoupled.stage import Stage

LR = 0.1
PLAIN_SGD = OptimizerConfig(name="sgd", lr=LR, momentum=0.0, weight_decay=0.0, schedule="constant")
SHAPES = [(6,), (8,), (8,), (4,)]  # input of each block, then the logits
BATCH = 8
STEPS = 2
JOIN_TIMEOUT_S = 150


def blocks() -> list[nn.Module]:
    """A BatchNorm-free MLP, identical in every process."""
    torch.manual_seed(0)
    return [
        nn.Sequential(nn.Linear(6, 8), nn.Tanh()),
        nn.Sequential(nn.Linear(8, 8), nn.Tanh()),
        nn.Sequential(nn.Linear(8, 4)),
    ]


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 6, generator=g), torch.randint(0, 4, (BATCH,), generator=g)) for _ in range(STEPS)]


def split_points(num_stages: int) -> list[int]:
    """Index of each stage's first block, plus the end: 2 stages -> [0, 2, 3], 3 stages -> [0, 1, 2, 3]."""
    return {1: [0, 3], 2: [0, 2, 3], 3: [0, 1, 2, 3]}[num_stages]


def make_stage(index: int, num_stages: int) -> Stage:
    cut = split_points(num_stages)
    module = nn.Sequential(*blocks()[cut[index]: cut[index + 1]])
    return Stage(
        index,
        num_stages,
        module,
        build_rule(BackpropMethod(name="backprop")),
        PLAIN_SGD,
        input_shape=SHAPES[cut[index]],
        output_shape=SHAPES[cut[index + 1]],
        num_classes=4,
        total_steps=1,
    )


def reference(steps: int) -> tuple[list[float], list[list[torch.Tensor]]]:
    """Losses and per-block parameters of unsplit, full-batch backprop with plain SGD."""
    model = nn.Sequential(*blocks())
    losses, params = [], []
    for x, y in batches()[:steps]:
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= LR * p.grad
        losses.append(loss.item())
        params.append([p.detach().clone() for p in model.parameters()])
    return losses, params


def assert_close(actual: list[torch.Tensor], expected: list[torch.Tensor], what: str) -> None:
    assert len(actual) == len(expected), what
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5, msg=lambda m: f"{what}: {m}")


# ------------------------------------------------------------------ processes

# One spawn of 3 ranks runs every job in turn (starting processes is most of the cost): the 2-rank
# jobs use a group of ranks 0 and 1, which also exercises the ``group`` argument.
JOBS = {"gpipe-2": ("gpipe", 2), "1f1b-2": ("1f1b", 2), "1f1b-3": ("1f1b", 3), "ddp-2": ("ddp", 2)}
WORLD = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, port: int, out: Path) -> None:
    """One rank: join the group, run every job it takes part in, save results (or tracebacks) for the parent."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=30),  # a lost peer fails the job instead of hanging it
    )
    pair = dist.new_group([0, 1])  # collective: every rank creates it, members or not
    results: dict[str, dict] = {}
    try:
        for job, (kind, world) in JOBS.items():
            if rank >= world:
                continue
            group = pair if world == 2 else None
            run = _data_parallel if kind == "ddp" else partial(_pipeline, kind=kind)
            try:
                results[job] = run(rank, world, group=group)
            except Exception:
                results[job] = {"error": traceback.format_exc()}
    finally:
        dist.destroy_process_group()
        torch.save(results, out / f"rank{rank}.pt")


def _pipeline(rank: int, world: int, kind: str, group: dist.ProcessGroup | None) -> dict:
    stage = make_stage(rank, world)
    schedule = PipelineSchedule(kind, stage, 4, BATCH, group=group)
    losses, params = [], []
    for step, (x, y) in enumerate(batches()):
        # step 1: x and y only where they are used; step 2: y everywhere, as a worker that reads labels may pass it
        loss = schedule.step(x if rank == 0 else None, y if stage.is_last or step == 1 else None)
        losses.append(None if loss is None else loss.item())
        params.append([p.detach().clone() for p in stage.module.parameters()])
    return {"losses": losses, "params": params}


def _data_parallel(rank: int, world: int, group: dist.ProcessGroup | None) -> dict:
    stage = make_stage(0, 1)
    ddp = DataParallel(stage, group=group)
    x, y = batches()[0]
    shard = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    loss = ddp.step(x[shard], y[shard])
    # parameters read through the stage: DataParallel must leave the plain module (and its keys) in place
    return {"loss": loss.item(), "params": [p.detach().clone() for p in stage.module.parameters()],
            "keys": list(stage.state_dict()["module"])}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, list[dict]]:
    """Each job's results, one dict per rank that took part."""
    out = tmp_path_factory.mktemp("ranks")
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_child, args=(r, port, out)) for r in range(WORLD)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=JOIN_TIMEOUT_S)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
    assert all(p.exitcode == 0 for p in procs), f"exit codes {[p.exitcode for p in procs]} (None: timed out)"
    per_rank = [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]
    return {job: [per_rank[r][job] for r in range(world)] for job, (_, world) in JOBS.items()}


def job_results(runs: dict[str, list[dict]], job: str) -> list[dict]:
    errors = [f"rank {r}:\n{res['error']}" for r, res in enumerate(runs[job]) if "error" in res]
    assert not errors, "\n".join(errors)
    return runs[job]


# ---------------------------------------------------------------------- tests


@pytest.mark.parametrize("job", ["gpipe-2", "1f1b-2", "1f1b-3"])
def test_pipeline_schedule_equals_full_batch_backprop(runs, job):
    results = job_results(runs, job)
    ref_losses, ref_params = reference(STEPS)
    assert results[-1]["losses"] == pytest.approx(ref_losses, abs=1e-5)
    assert all(loss is None for r in results[:-1] for loss in r["losses"])
    cut = split_points(len(results))
    for step in range(STEPS):  # two steps in a row: the second reuses the schedule's buffers
        for k, r in enumerate(results):
            expected = ref_params[step][2 * cut[k]: 2 * cut[k + 1]]  # weight and bias of each Linear
            assert_close(r["params"][step], expected, f"{job}, step {step + 1}, stage {k}")


def test_data_parallel_equals_full_batch_backprop(runs):
    results = job_results(runs, "ddp-2")
    ref_losses, ref_params = reference(1)
    # each worker's loss is its half's mean: their mean is the batch's
    assert sum(r["loss"] for r in results) / 2 == pytest.approx(ref_losses[0], abs=1e-5)
    for rank, r in enumerate(results):
        assert_close(r["params"], ref_params[0], f"ddp rank {rank}")
        assert not any(key.startswith("module.") for key in r["keys"]), r["keys"]


@pytest.mark.parametrize(
    "kind,microbatches,stages,match",
    [
        ("gpipe", 0, 2, "at least 1"),
        ("gpipe", 3, 2, "does not divide"),
        ("1f1b", 1, 2, "at least one per stage"),
    ],
)
def test_bad_microbatches_are_rejected(kind, microbatches, stages, match):
    stage = make_stage(0, stages)
    with pytest.raises(ValueError, match=rf"method\.microbatches: .*{match}"):
        PipelineSchedule(kind, stage, microbatches, BATCH)


def test_reference_is_what_the_in_process_engine_computes():
    """Guards the reference itself: the in-process engine's backprop gives the same first step."""
    from decoupled.runtime.inprocess import train_batch

    stages = [make_stage(k, 3) for k in range(3)]
    x, y = batches()[0]
    train_batch(stages, x, y)
    _, ref_params = reference(1)
    assert_close([p.detach() for s in stages for p in s.module.parameters()], ref_params[0], "in-process")
