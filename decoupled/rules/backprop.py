"""End-to-end backprop (E2EBP): the reference every decoupled rule is measured against.

Across stages it is exact backprop: stage k keeps its graph until dL/dh_k arrives from
stage k+1, then backpropagates it, steps, and passes dL/dh_{k-1} upstream.
"""

from __future__ import annotations

import torch

from .base import Feedback, Rule, StepResult


class BackpropRule(Rule):
    name = "backprop"
    feedback = Feedback.GRADIENT

    def step(self, stage, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        if stage.is_last:
            return self._last_stage_step(stage, x, y, send="input_grad")
        return self._forward_and_hold(stage, x, needs_input_grad=True)

    def apply(self, stage, signal: torch.Tensor) -> torch.Tensor | None:
        x, h = self._pop_pending(stage)
        stage.backward_and_step(h, signal)
        return x.grad  # None at stage 0, whose input is data
