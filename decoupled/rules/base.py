"""The Rule interface: what a stage learns from.

A rule owns its extra modules (auxiliary head, gradient predictor, feedback matrices)
and their optimizer state. It runs inside a Stage: ``step`` is called with each input
batch and returns what the stage sends on; ``apply`` is called with the signal that
comes back from later stages, for rules that need one (``feedback``). Runtimes read
``feedback`` to know what to move where; they never learn anything themselves.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from ..stage import Stage


class Feedback(enum.Enum):
    """What a stage's rule needs from later stages, and whether it must wait for it."""

    NONE = "none"  # dgl: nothing crosses a boundary backwards
    GRADIENT = "gradient"  # backprop, fa, sign_symmetric: stage k waits for dL/dh_k from stage k+1
    OUTPUT_ERROR = "output_error"  # dfa: every stage waits for the last stage's output error
    PREDICTOR_TARGET = "predictor_target"  # dni: stage k+1's dL/dh_k trains predictor k; nobody waits


@dataclass
class StepResult:
    """What one stage step produces. Tensors stay on the stage's device and are detached."""

    output: torch.Tensor  # activation to send on (the logits at the last stage)
    feedback: torch.Tensor | None = None  # gradient w.r.t. the input, or (dfa) the output error
    loss: torch.Tensor | None = None  # this stage's own loss, if it computed one


class Rule:
    """Base class: one subclass per learning rule, one file each."""

    name: ClassVar[str]
    feedback: ClassVar[Feedback]

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.extra = nn.ModuleDict()  # modules the rule adds to its stage; saved with it
        self._pending: deque[tuple[torch.Tensor, torch.Tensor]] = deque()  # (input, output) awaiting feedback

    # ---------------------------------------------------------------- set-up

    def attach(self, stage: "Stage") -> None:
        """Build the rule's extra modules for ``stage`` (its shapes and position are known by now)."""

    def stage_parameters(self) -> list[nn.Parameter]:
        """Extra parameters that the stage's own optimizer trains with the stage (e.g. an auxiliary head)."""
        return []

    # --------------------------------------------------------------- training

    def step(self, stage: "Stage", x: torch.Tensor, y: torch.Tensor) -> StepResult:
        raise NotImplementedError

    def apply(self, stage: "Stage", signal: torch.Tensor) -> torch.Tensor | None:
        """Use the feedback for the oldest pending batch; return what to send further upstream, if anything."""
        raise RuntimeError(f"rule '{self.name}' takes no feedback (stage {stage.index})")

    def auxiliary_logits(self, h: torch.Tensor) -> torch.Tensor | None:
        """Class scores of a stage-local classifier, if the rule has one (dgl)."""
        return None

    # ------------------------------------------------------------- state

    def state_dict(self) -> dict:
        return {"extra": self.extra.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.extra.load_state_dict(state["extra"])

    # -------------------------------------------------------- shared helpers

    def _input(self, stage: "Stage", x: torch.Tensor, needs_grad: bool) -> torch.Tensor:
        """The stage's input as a leaf: a boundary never lets autograd reach the previous stage."""
        x = x.detach()
        if needs_grad and stage.index > 0:
            x.requires_grad_(True)
        return x

    def _last_stage_step(self, stage: "Stage", x: torch.Tensor, y: torch.Tensor, send: str | None) -> StepResult:
        """The last stage learns from the true loss under every rule.

        ``send`` picks the feedback: ``"input_grad"`` (dL/dx for the stage before),
        ``"output_error"`` (dL/dlogits, for dfa) or None.
        """
        x = self._input(stage, x, needs_grad=send == "input_grad")
        logits = stage.module(x)
        if send == "output_error":
            logits.retain_grad()
        loss = F.cross_entropy(logits, y)
        stage.backward_and_step(loss, output=logits)  # logits checked before the update, not after
        feedback = None
        if send == "input_grad":
            feedback = x.grad
        elif send == "output_error":
            feedback = logits.grad
        return StepResult(output=logits.detach(), feedback=feedback, loss=loss.detach())

    def _forward_and_hold(self, stage: "Stage", x: torch.Tensor, needs_input_grad: bool) -> StepResult:
        """Forward, keeping the graph until the feedback for this batch arrives (``apply``)."""
        x = self._input(stage, x, needs_input_grad)
        h = stage.module(x)
        self._pending.append((x, h))
        return StepResult(output=h.detach())

    def _pop_pending(self, stage: "Stage") -> tuple[torch.Tensor, torch.Tensor]:
        if not self._pending:
            raise RuntimeError(f"stage {stage.index}: feedback arrived but no forward pass is waiting for it")
        return self._pending.popleft()
