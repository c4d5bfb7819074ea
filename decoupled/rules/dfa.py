"""Direct feedback alignment (DFA, Nøkland 2016; survey eq. 23).

The last stage computes the output error e = dL/dlogits and sends it to every stage.
Stage k takes e C_k, C_k a fixed random matrix from the classes to its output, as the
gradient of its output and backpropagates that inside the stage. Every stage updates
as soon as the error is known, without waiting for the stages between.

A stage keeps forwarding while errors are on their way, so several forward passes can
be pending when an update lands. Each forward therefore runs on a copy of the weights
(weight stashing, as in PipeDream): the later backward sees the weights its forward used,
and the update still goes to the live parameters.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import Feedback, Rule, StepResult
from .feedback import random_like_init


class DirectFeedbackAlignmentRule(Rule):
    name = "dfa"
    feedback = Feedback.OUTPUT_ERROR

    def attach(self, stage) -> None:
        if stage.is_last:
            return
        projection = nn.Module()
        # Scaled like the weight of a Linear(output -> classes), as backprop's last layer would be.
        weight = torch.empty(stage.num_classes, math.prod(stage.output_shape))
        projection.register_buffer("matrix", random_like_init(weight))
        self.extra["projection"] = projection

    def step(self, stage, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        if stage.is_last:
            return self._last_stage_step(stage, x, y, send="output_error")
        weights = {n: p.detach().clone().requires_grad_(True) for n, p in stage.module.named_parameters()}
        h = torch.func.functional_call(stage.module, weights, (x.detach(),))
        self._pending.append((weights, h))
        return StepResult(output=h.detach())

    def apply(self, stage, signal: torch.Tensor) -> None:
        weights, h = self._pop_pending(stage)
        grad = (signal @ self.extra["projection"].matrix).view_as(h)
        grads = torch.autograd.grad(h, list(weights.values()), grad, allow_unused=True)
        for param, g in zip(stage.module.parameters(), grads):
            param.grad = g
        stage.optimizer_step()
        return None
