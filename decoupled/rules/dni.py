"""Decoupled neural interfaces (DNI, Jaderberg et al. 2017): synthetic gradients.

Stage k does not wait for dL/dh_k: a small predictor estimates it from h_k (cDNI: and
the label) and the stage updates at once. The predictor learns by mean-squared error
toward the gradient that stage k+1 later computes for the same h_k; when stage k+1 is
itself decoupled that target comes from its own predictor (bootstrapping).

Scale: predictors work in per-sample units, B x dL/dh for a batch-mean loss L, so that
what they learn does not depend on the batch size. Stages divide by B before use.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .base import Feedback, Rule, StepResult


class GradientPredictor(nn.Module):
    """Maps h (and, if ``conditioned``, the one-hot label) to a gradient of h's shape.

    Conv features get a conv predictor, flat ones an MLP. The last layer's weight and
    bias start at zero: an untrained predictor sends no gradient rather than noise.
    """

    def __init__(
        self, shape: tuple[int, ...], num_classes: int, conditioned: bool, hidden: int, layers: int, kernel_size: int
    ) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self.hidden = hidden
        self.num_classes = num_classes
        self.conditioned = conditioned
        extra = num_classes if conditioned else 0
        net: list[nn.Module] = []
        if len(self.shape) == 3:
            width, pad = self.shape[0] + extra, kernel_size // 2
            for _ in range(layers):
                net += [nn.Conv2d(width, hidden, kernel_size, padding=pad), nn.ReLU()]
                width = hidden
            out: nn.Module = nn.Conv2d(width, self.shape[0], kernel_size, padding=pad)
        else:
            width, size = math.prod(self.shape) + extra, math.prod(self.shape)
            for _ in range(layers):
                net += [nn.Linear(width, hidden), nn.ReLU()]
                width = hidden
            out = nn.Linear(width, size)
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        self.net = nn.Sequential(*net, out)

    def forward(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        spatial = len(self.shape) == 3
        inp = h if spatial else h.flatten(1)
        if self.conditioned:
            label = F.one_hot(y, self.num_classes).to(h.dtype)
            if spatial:
                label = label[:, :, None, None].expand(-1, -1, h.shape[2], h.shape[3])
            inp = torch.cat([inp, label], dim=1)
        return self.net(inp).view_as(h)


class PredictorTrainer:
    """Trains one GradientPredictor from (h, label, true gradient) samples; its own optimizer.

    Used by the stage itself (in-process) and by the coordinator (Ray runtime).
    """

    def __init__(
        self, predictor: GradientPredictor, lr: float, optimizer: str = "adam", name: str = "predictor"
    ) -> None:
        self.predictor = predictor
        params = predictor.parameters()
        self.optimizer = torch.optim.Adam(params, lr=lr) if optimizer == "adam" else torch.optim.SGD(params, lr=lr)
        self.named_parameters = [(f"{name}.{n}", p) for n, p in predictor.named_parameters()]  # named in errors

    def update(
        self,
        h: torch.Tensor,
        y: torch.Tensor,
        grad: torch.Tensor,
        check: Callable[[list[tuple[str, nn.Parameter]]], bool] | None = None,
    ) -> dict[str, torch.Tensor]:
        """One MSE step toward ``grad`` (dL/dh of a batch-mean loss, as backprop gives it).

        ``check`` (e.g. Stage.check_update) sees the named parameters, gradients computed, before
        the step; if it returns False the step is skipped and no metrics are returned.
        """
        target = grad.detach() * h.shape[0]  # per-sample units, see the module docstring
        pred = self.predictor(h.detach(), y)
        loss = F.mse_loss(pred, target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if check is not None and not check(self.named_parameters):
            self.optimizer.zero_grad(set_to_none=True)
            return {}
        self.optimizer.step()
        cosine = F.cosine_similarity(pred.detach().flatten(1), target.flatten(1), dim=1, eps=1e-12).mean()
        return {"predictor_mse": loss.detach(), "predictor_cosine": cosine}


class SyntheticGradientRule(Rule):
    name = "dni"
    feedback = Feedback.PREDICTOR_TARGET

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.trainer: PredictorTrainer | None = None
        # False when a coordinator trains the predictor elsewhere: then the stage keeps no samples.
        self.train_predictor_locally = True

    def attach(self, stage) -> None:
        if stage.is_last:
            return
        c = self.cfg
        hidden = c.predictor_hidden or stage.output_shape[0]  # the paper's CIFAR predictors match the features
        predictor = GradientPredictor(
            stage.output_shape, stage.num_classes, c.conditioned, hidden, c.predictor_layers, c.predictor_kernel_size
        )
        self.extra["predictor"] = predictor
        self.trainer = PredictorTrainer(predictor, c.predictor_lr, c.predictor_optimizer, name="extra.predictor")

    def predict_gradient(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Synthetic dL/dh for a batch-mean loss."""
        with torch.no_grad():
            return self.extra["predictor"](h.detach(), y) / h.shape[0]

    def step(self, stage, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        if stage.is_last:
            return self._last_stage_step(stage, x, y, send="input_grad")
        x = self._input(stage, x, needs_grad=True)
        h = stage.module(x)
        stage.backward_and_step(h, self.predict_gradient(h, y))
        if self.train_predictor_locally:
            self._pending.append((h.detach(), y))
        # x.grad is this stage's (bootstrapped) gradient w.r.t. h_{k-1}: the target for predictor k-1
        return StepResult(output=h.detach(), feedback=x.grad)

    def apply(self, stage, signal: torch.Tensor) -> None:
        """Train the predictor on the true gradient that stage k+1 computed for our oldest pending output."""
        h, y = self._pop_pending(stage)
        if stage.batch_skipped:  # skipped at its step (non-finite): check_update would refuse it; save the work
            return None
        # the target (received by Stage.apply) and the predictor's gradients are checked before its step
        stage.metrics.update(self.trainer.update(h, y, signal, check=stage.check_update))
        return None

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.trainer is not None:
            state["predictor_optimizer"] = self.trainer.optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.trainer is not None:
            self.trainer.optimizer.load_state_dict(state["predictor_optimizer"])
