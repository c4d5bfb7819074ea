"""Stage: a slice of the model, the rule it learns by, and its optimizer.

The same class runs in the in-process runner and inside a Ray actor; a runtime only
moves the tensors that ``step`` and ``apply`` take and return.
"""

from __future__ import annotations

import os
import socket

import torch
from torch import nn

from .config import OptimizerConfig
from .rules.base import Rule, StepResult


def build_optimizer(params: list[nn.Parameter], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class Stage:
    def __init__(
        self,
        index: int,
        num_stages: int,
        module: nn.Module,
        rule: Rule,
        optimizer: OptimizerConfig,
        *,
        input_shape: tuple[int, ...],
        output_shape: tuple[int, ...],
        num_classes: int,
        total_steps: int,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        self.index = index
        self.num_stages = num_stages
        self.input_shape = tuple(input_shape)
        self.output_shape = tuple(output_shape)
        self.num_classes = num_classes
        self.device = torch.device(device)
        self.module = module.to(self.device)
        self.rule = rule
        # Each stage seeds its rule's random modules from (seed, index): every runtime builds the same ones.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 10_007 + index)
            rule.attach(self)
        rule.extra.to(self.device)
        self.optimizer = build_optimizer(list(self.module.parameters()) + rule.stage_parameters(), optimizer)
        self.scheduler = (
            torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=max(total_steps, 1))
            if optimizer.schedule == "cosine"
            else None
        )
        self.steps = 0
        self.metrics: dict[str, torch.Tensor] = {}  # latest values (loss, predictor quality); read when logging

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1

    # --------------------------------------------------------------- training

    def step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        """Run one batch through this stage; local rules also update here, at once."""
        result = self.rule.step(self, x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))
        self.steps += 1
        if result.loss is not None:
            self.metrics["loss"] = result.loss
        return result

    def apply(self, signal: torch.Tensor) -> torch.Tensor | None:
        """Feedback from later stages (gradient or output error) for the oldest pending batch."""
        return self.rule.apply(self, signal.to(self.device, non_blocking=True))

    def backward_and_step(self, tensor: torch.Tensor, grad: torch.Tensor | None = None) -> None:
        """Backpropagate ``grad`` (or a scalar loss) into this stage's parameters and take an optimizer step."""
        self.optimizer.zero_grad(set_to_none=True)
        tensor.backward(grad)
        self.optimizer_step()

    def optimizer_step(self) -> None:
        """One update from the gradients now in ``.grad`` (and one learning-rate schedule step)."""
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()

    def train(self) -> None:
        self.module.train()
        self.rule.extra.train()

    def eval(self) -> None:
        self.module.eval()
        self.rule.extra.eval()

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Evaluation forward: the output and, for rules with a local classifier, its logits."""
        h = self.module(x.to(self.device, non_blocking=True))
        return h, self.rule.auxiliary_logits(h)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        return {
            "index": self.index,
            "steps": self.steps,
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "rule": self.rule.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["index"] != self.index:
            raise ValueError(f"stage {self.index}: checkpoint is of stage {state['index']}")
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.rule.load_state_dict(state["rule"])
        self.steps = state["steps"]

    def info(self) -> dict:
        """Where this stage runs (for summary.json)."""
        device = str(self.device)
        if self.device.type == "cuda":
            device = f"{device} ({torch.cuda.get_device_name(self.device)})"
        return {"index": self.index, "pid": os.getpid(), "node": socket.gethostname(), "device": device}
