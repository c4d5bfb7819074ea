"""Feedback alignment (FA, Lillicrap et al. 2016).

Backprop's error path with every layer's W^T replaced by a fixed random matrix B of
the same shape (survey eq. 22 with W2 -> B2). Stages still wait for the error from
later stages, like backprop; FA removes weight transport, not backward locking.
"""

from __future__ import annotations

import torch
from torch import nn

from .backprop import BackpropRule
from .feedback import feedback_layers, install_feedback, random_like_init


class FeedbackAlignmentRule(BackpropRule):
    name = "fa"

    def attach(self, stage) -> None:
        matrices = nn.Module()  # buffers: saved and moved with the stage, never trained
        for key, layer in feedback_layers(stage.module):
            matrices.register_buffer(key, random_like_init(layer.weight.detach()))
        self.extra["feedback"] = matrices
        install_feedback(stage.module, self.feedback_weight, reads_data=stage.index == 0)

    def feedback_weight(self, layer: nn.Module, key: str) -> torch.Tensor:
        return self.extra["feedback"].get_buffer(key)
