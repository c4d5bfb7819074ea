"""Models as ordered lists of blocks.

A model is never one ``nn.Module`` here: it is a list of blocks that ``split`` groups
into pipeline stages. ``nn.Sequential(*blocks)`` is the whole model, so splitting and
re-joining give back the same function. ReLUs are not in-place: feedback-alignment
rules hook layer backward passes, which in-place ops would break.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import DNICNNModel, MLPModel, ModelConfig, ResNetModel, VGGModel


def build_blocks(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> list[nn.Module]:
    """Build the blocks of ``cfg`` for inputs of ``input_shape`` (without the batch dimension)."""
    if isinstance(cfg, MLPModel):
        blocks = _mlp(cfg, input_shape)
    elif isinstance(cfg, VGGModel):
        blocks = _vgg(cfg, _image_shape(input_shape, cfg.name))
    elif isinstance(cfg, ResNetModel):
        blocks = _resnet(cfg, _image_shape(input_shape, cfg.name))
    elif isinstance(cfg, DNICNNModel):
        blocks = _dni_cnn(cfg, _image_shape(input_shape, cfg.name))
    else:  # pragma: no cover - the config union is closed
        raise TypeError(f"unknown model config {cfg!r}")
    features = output_shape(nn.Sequential(*blocks), input_shape)
    # The DNI paper's CNN classifies the flattened features; the others average over space first.
    blocks.append(_classifier(features, num_classes, pool=not isinstance(cfg, DNICNNModel)))
    return blocks


def output_shape(module: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of ``module``'s output for one input of ``input_shape`` (batch dimension dropped)."""
    was_training = module.training
    module.eval()  # BatchNorm in train mode refuses a batch of one and would update its statistics
    try:
        with torch.no_grad():
            param = next(module.parameters(), None)
            device = param.device if param is not None else "cpu"
            out = module(torch.zeros(1, *input_shape, device=device))
    finally:
        module.train(was_training)
    return tuple(out.shape[1:])


def _image_shape(input_shape: tuple[int, ...], model: str) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ValueError(f"model.name: '{model}' needs image inputs (C, H, W), the data gives shape {input_shape}")
    return input_shape  # type: ignore[return-value]


def _classifier(features: tuple[int, ...], num_classes: int, pool: bool) -> nn.Module:
    if len(features) == 3 and pool:
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(features[0], num_classes))
    if len(features) == 3:
        return nn.Sequential(nn.Flatten(), nn.Linear(features[0] * features[1] * features[2], num_classes))
    return nn.Linear(features[0], num_classes)


def _mlp(cfg: MLPModel, input_shape: tuple[int, ...]) -> list[nn.Module]:
    width = 1
    for d in input_shape:
        width *= d
    blocks: list[nn.Module] = []
    for i, hidden in enumerate(cfg.hidden):
        layers: list[nn.Module] = [nn.Flatten()] if i == 0 else []
        layers.append(nn.Linear(width, hidden))
        if cfg.batch_norm:
            layers.append(nn.BatchNorm1d(hidden))
        layers.append(nn.ReLU())
        blocks.append(nn.Sequential(*layers))
        width = hidden
    return blocks


def _conv_bn_relu(c_in: int, c_out: int, kernel_size: int = 3, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    ]


def _vgg(cfg: VGGModel, shape: tuple[int, int, int]) -> list[nn.Module]:
    channels, size = shape[0], min(shape[1], shape[2])
    blocks: list[nn.Module] = []
    for width in cfg.widths:
        layers: list[nn.Module] = []
        for j in range(cfg.convs_per_block):
            layers += _conv_bn_relu(channels if j == 0 else width, width)
        if size >= 2:  # small inputs (8x8 digits) run out of space to pool before the blocks end
            layers.append(nn.MaxPool2d(2))
            size //= 2
        blocks.append(nn.Sequential(*layers))
        channels = width
    return blocks


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs and an identity (or 1x1 projection) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            *_conv_bn_relu(c_in, c_out, stride=stride),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


def _resnet(cfg: ResNetModel, shape: tuple[int, int, int]) -> list[nn.Module]:
    size = min(shape[1], shape[2])
    blocks: list[nn.Module] = [nn.Sequential(*_conv_bn_relu(shape[0], cfg.widths[0]))]
    channels = cfg.widths[0]
    for i, (width, depth) in enumerate(zip(cfg.widths, cfg.depths)):
        for j in range(depth):
            stride = 2 if (i > 0 and j == 0 and size >= 2) else 1
            size //= stride
            blocks.append(BasicBlock(channels, width, stride))
            channels = width
    return blocks


def _dni_cnn(cfg: DNICNNModel, shape: tuple[int, int, int]) -> list[nn.Module]:
    channels = shape[0]
    blocks: list[nn.Module] = []
    for _ in range(3):
        blocks.append(
            nn.Sequential(
                *_conv_bn_relu(channels, cfg.channels, cfg.kernel_size),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        )
        channels = cfg.channels
    return blocks


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
