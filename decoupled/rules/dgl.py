"""Greedy local learning (DGL, Belilovsky et al. 2020): a local proxy objective per stage.

Every stage but the last trains itself and a small auxiliary classifier on its own
output with cross-entropy. Its input is detached, so no gradient ever crosses a stage
boundary and nothing has to come back: the stage updates as soon as its forward is done.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Feedback, Rule, StepResult


def auxiliary_head(shape: tuple[int, ...], num_classes: int, width: int) -> nn.Module:
    """DGL's auxiliary problem: for conv features, average-pool, 1x1 convs with BN+ReLU, pool, small MLP."""
    if len(shape) == 3:
        channels, size = shape[0], min(shape[1], shape[2])
        return nn.Sequential(
            nn.AdaptiveAvgPool2d(min(size, 4)),  # cheap: the head must cost little next to the stage
            nn.Conv2d(channels, width, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(min(size, 2)),
            nn.Flatten(),
            nn.Linear(width * min(size, 2) ** 2, width),
            nn.ReLU(),
            nn.Linear(width, num_classes),
        )
    features = 1
    for d in shape:
        features *= d
    return nn.Sequential(nn.Flatten(), nn.Linear(features, width), nn.ReLU(), nn.Linear(width, num_classes))


class DGLRule(Rule):
    name = "dgl"
    feedback = Feedback.NONE

    def attach(self, stage) -> None:
        if not stage.is_last:
            self.extra["aux_head"] = auxiliary_head(stage.output_shape, stage.num_classes, self.cfg.aux_hidden)

    def stage_parameters(self) -> list[nn.Parameter]:
        return list(self.extra.parameters())

    def step(self, stage, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        if stage.is_last:
            return self._last_stage_step(stage, x, y, send=None)
        h = stage.module(x.detach())
        loss = F.cross_entropy(self.extra["aux_head"](h), y)
        stage.backward_and_step(loss, output=h)  # h checked before the update: a NaN batch changes nothing
        return StepResult(output=h.detach(), loss=loss.detach())

    def auxiliary_logits(self, h: torch.Tensor) -> torch.Tensor | None:
        return self.extra["aux_head"](h) if "aux_head" in self.extra else None
