"""E2EBP baselines that run inside one stage's process (torch.distributed already initialised).

``PipelineSchedule``: GPipe or 1F1B over K processes (one stage each, rank == stage index)
through ``torch.distributed.pipelining``. ``DataParallel``: every process holds the whole
model and DDP averages the gradients. Both keep the Stage's optimizer and scheduler, so a
baseline differs from the decoupled rules only in how the gradient is obtained.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
from torch.nn.parallel import DistributedDataParallel

from ..stage import Stage

ScheduleKind = Literal["gpipe", "1f1b"]
_SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


def _check_microbatches(kind: ScheduleKind, microbatches: int, batch_size: int, num_stages: int) -> None:
    if microbatches < 1:
        raise ValueError(f"method.microbatches: must be at least 1, got {microbatches}")
    if batch_size % microbatches:
        raise ValueError(
            f"method.microbatches: {microbatches} does not divide the batch size {batch_size} "
            "(micro-batches must be equal for their mean losses to average to the batch's)"
        )
    # torch's Schedule1F1B refuses fewer micro-batches than stages (its warm-up needs one per stage).
    if kind == "1f1b" and microbatches < num_stages:
        raise ValueError(f"method.microbatches: 1f1b needs at least one per stage ({num_stages}), got {microbatches}")


class PipelineSchedule:
    """E2EBP with M micro-batches through torch.distributed.pipelining (GPipe or 1F1B), inside one stage's process."""

    def __init__(
        self,
        kind: ScheduleKind,
        stage: Stage,
        microbatches: int,
        batch_size: int,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        if kind not in _SCHEDULES:
            raise ValueError(f"schedule: expected one of {', '.join(_SCHEDULES)}, got {kind!r}")
        _check_microbatches(kind, microbatches, batch_size, stage.num_stages)
        # A single-stage torch schedule maps stage i to group rank i and needs exactly one stage per rank.
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        if world != stage.num_stages or rank != stage.index:
            raise ValueError(
                f"stage {stage.index} of {stage.num_stages} runs on rank {rank} of a group of {world}: "
                "pipelining needs rank == stage index and one process per stage"
            )
        self.stage = stage
        self.batch_size = batch_size
        micro = batch_size // microbatches
        # Example tensors make torch's metadata STATIC: no shape-inference forward/backward round trip
        # at the first step. requires_grad marks what carries a gradient across the boundary: every
        # stage's output, and every input but the data's.
        example_input = torch.empty(micro, *stage.input_shape, device=stage.device, requires_grad=stage.index > 0)
        example_output = torch.empty(micro, *stage.output_shape, device=stage.device, requires_grad=True)
        self._pipe_stage = PipelineStage(
            stage.module,
            stage.index,
            stage.num_stages,
            stage.device,
            input_args=example_input,
            output_args=example_output,
            group=group,
        )
        # Each micro-batch's loss is a mean over its samples and torch sums their gradients;
        # scale_grads divides by M, so with equal micro-batches the result is the full-batch mean gradient.
        self._schedule = _SCHEDULES[kind](self._pipe_stage, microbatches, loss_fn=F.cross_entropy, scale_grads=True)

    def step(self, x: torch.Tensor | None, y: torch.Tensor | None) -> torch.Tensor | None:
        """One training step on one batch: x is needed on the first stage, y on the last (ignored elsewhere).

        Returns the batch's mean loss (detached) on the last stage, None elsewhere.
        """
        stage = self.stage
        x = x if stage.index == 0 else None  # other stages receive their input from the pipeline
        y = y if stage.is_last else None
        needed = (("x", stage.index == 0, x), ("y", stage.is_last, y))
        missing = [name for name, need, t in needed if need and t is None]
        if missing:
            raise ValueError(f"stage {stage.index}: {' and '.join(missing)} missing (x: first stage, y: last stage)")
        for name, t in (("x", x), ("y", y)):
            # Buffers were sized for batch_size at construction: another size would not match the peers'.
            if t is not None and t.shape[0] != self.batch_size:
                raise ValueError(f"stage {stage.index}: {name} has {t.shape[0]} samples, expected {self.batch_size}")
        # torch accumulates micro-batch gradients into .grad and then scales it: it must start empty.
        stage.optimizer.zero_grad(set_to_none=True)
        args = () if x is None else (x.to(stage.device, non_blocking=True),)
        target = None if y is None else y.to(stage.device, non_blocking=True)
        losses: list[torch.Tensor] | None = [] if stage.is_last else None
        self._schedule.step(*args, target=target, losses=losses, return_outputs=False)
        stage.optimizer_step()
        stage.steps += 1
        if losses is None:
            return None
        loss = torch.stack(losses).detach().mean()  # equal micro-batches: the mean of means is the batch mean
        stage.metrics["loss"] = loss
        return loss


class DataParallel:
    """Data-parallel E2EBP: every process holds the whole model (a K=1 Stage); DDP averages gradients over `group`."""

    def __init__(self, stage: Stage, group: dist.ProcessGroup | None = None) -> None:
        if stage.num_stages != 1:
            raise ValueError(f"data parallel holds the whole model: expected a single stage, got {stage.num_stages}")
        self.stage = stage
        self._module = stage.module
        device_ids = [stage.device] if stage.device.type == "cuda" else None
        # DDP shares the module's parameters, so the stage's optimizer already steps the right tensors.
        self._ddp = DistributedDataParallel(self._module, device_ids=device_ids, process_group=group)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Train on this worker's shard of the batch; returns its loss. All workers must call it together."""
        # The rule calls stage.module: the DDP wrapper stands in only for this step, so that
        # state_dict, checkpoints and evaluation keep seeing the plain module (no "module." prefix).
        self.stage.module = self._ddp
        try:
            result = self.stage.step(x, y)
        finally:
            self.stage.module = self._module
        assert result.loss is not None  # a single stage is the last one: it always computes the loss
        return result.loss
