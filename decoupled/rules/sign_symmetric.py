"""Sign-concordant feedback (Liao et al. 2016; Moskovitz et al. 2018).

Like FA, but each feedback element takes the sign of the matching element of the
current forward weight: B = |R| * sign(W), R fixed random. The sign is read at every
backward pass, so the feedback tracks the weights as they learn.
"""

from __future__ import annotations

import torch
from torch import nn

from .fa import FeedbackAlignmentRule


class SignSymmetricRule(FeedbackAlignmentRule):
    name = "sign_symmetric"

    def attach(self, stage) -> None:
        super().attach(stage)
        for key, buf in self.extra["feedback"].named_buffers():
            buf.abs_()  # keep only the random magnitudes |R|

    def feedback_weight(self, layer: nn.Module, key: str) -> torch.Tensor:
        return self.extra["feedback"].get_buffer(key) * torch.sign(layer.weight.detach())
