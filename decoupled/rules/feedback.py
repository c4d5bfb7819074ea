"""Shared machinery of the feedback-alignment family: swap W^T for another matrix in backward.

A full backward hook on every Linear and Conv2d replaces the gradient it passes to its
input (grad_out @ W) with grad_out @ B, B chosen by the rule. The weight gradient is
untouched (delta x input), as FA prescribes, and BatchNorm and skip paths stay exact.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

FeedbackWeight = Callable[[nn.Module, str], torch.Tensor]


def feedback_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers whose backward is replaced, with a buffer-safe key for each."""
    return [
        (name.replace(".", "_") or "root", layer)
        for name, layer in module.named_modules()
        if isinstance(layer, (nn.Linear, nn.Conv2d))
    ]


def random_like_init(weight: torch.Tensor) -> torch.Tensor:
    """A fresh random matrix with the distribution PyTorch gives a new layer's weight."""
    b = torch.empty_like(weight)
    nn.init.kaiming_uniform_(b, a=math.sqrt(5))
    return b


def input_gradient(layer: nn.Module, weight: torch.Tensor, grad_out: torch.Tensor, input_shape) -> torch.Tensor:
    """What backward would pass to ``layer``'s input if its weight were ``weight``."""
    if isinstance(layer, nn.Linear):
        return grad_out @ weight
    return torch.nn.grad.conv2d_input(
        input_shape, weight, grad_out, layer.stride, layer.padding, layer.dilation, layer.groups
    )


def install_feedback(module: nn.Module, feedback_weight: FeedbackWeight, reads_data: bool) -> None:
    """Hook every Linear/Conv2d of ``module`` so its input gradient uses ``feedback_weight(layer, key)``.

    ``reads_data``: the module's first layer sees the data, whose gradient nobody needs;
    it is left unhooked (torch warns at every step about hooks on inputs without grad).
    """
    for i, (key, layer) in enumerate(feedback_layers(module)):
        if reads_data and i == 0:
            continue

        def hook(layer, grad_input, grad_output, key=key):
            if grad_input[0] is None:  # the input needs no gradient (e.g. data at stage 0)
                return None
            return (input_gradient(layer, feedback_weight(layer, key), grad_output[0], grad_input[0].shape),)

        layer.register_full_backward_hook(hook)
