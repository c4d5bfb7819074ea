"""Stage: a slice of the model, the rule it learns by, and its optimizer.

The same class runs in the in-process runner and inside a Ray actor; a runtime only
moves the tensors that ``step`` and ``apply`` take and return.

Numerics: a NaN or inf output, loss or gradient is caught where it appears, before any
update uses it, and ``train.on_nonfinite`` decides: ``stop`` raises NonFiniteError naming
the stage and its step; ``skip_batch`` leaves the stage as it was before that batch
(``skipped_batches`` counts it once) and goes on.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .config import OptimizerConfig
from .rules.base import Feedback, Rule, StepResult

log = logging.getLogger(__name__)

ON_NONFINITE = ("stop", "skip_batch")

Named = tuple[str, torch.Tensor]


class NonFiniteError(RuntimeError):
    """A NaN or infinite loss, activation or gradient, caught at the step it appeared (``train.on_nonfinite: stop``).

    ``stage``: the stage's index; ``step``: that stage's own 0-based count of training steps;
    ``what``: e.g. ``"loss"``, ``"activation"``, ``"gradient of module.0.weight"``.
    """

    def __init__(self, stage: int, step: int, what: str, policy: str = "stop") -> None:
        self.stage, self.step, self.what, self.policy = stage, step, what, policy
        super().__init__(f"stage {stage}, step {step}: non-finite {what} (train.on_nonfinite: {policy})")

    def __reduce__(self):  # pickled with its fields: a Ray actor raises it in another process
        return type(self), (self.stage, self.step, self.what, self.policy)


@dataclass
class _Batch:
    """The batch a ``step`` or ``apply`` is working on: named in errors, and skipped (and counted) once."""

    step: int
    skipped: bool = False  # its update is already skipped and counted
    checked: bool = False  # its output was checked with a local update inside rule.step
    received: Named | None = None  # the feedback ``apply`` got for it: checked with the update it drives


_ONES: dict[torch.device, torch.Tensor] = {}  # the unit scale the check below needs, one per device


def _first_nonfinite(values: Iterable[Named], params: Iterable[tuple[str, torch.Tensor]] = ()) -> str | None:
    """The name of the first tensor holding a NaN or inf, or None: ``values`` (activation, loss,
    received gradient) in order, then the ``.grad`` of ``params`` as ``"gradient of <name>"``.

    All finite (the usual case) costs one fused norm, one fused check and one host sync;
    only a failure looks at the tensors one by one to name the culprit.
    """
    named: list[Named] = []
    seen: set[int] = set()
    for name, t in values:
        if id(t) not in seen:  # the same tensor under two names (a received gradient) is reduced once
            seen.add(id(t))
            named.append((name, t))
    grads = [(name, p.grad) for name, p in params if p.grad is not None]
    if not named and not grads:
        return None
    with torch.no_grad():
        # Gradients are checked in place below; other tensors are not ours to write (and a gradient
        # that is not contiguous might overlap itself): a NaN or inf in them makes their norm non-finite.
        tensors, others = [], [t for _, t in named]
        for _, g in grads:
            (tensors if g.is_contiguous() else others).append(g)
        if others:
            tensors += torch._foreach_norm(others)
        bad = torch.zeros(1, device=tensors[0].device)
        one = _ONES.get(bad.device)
        if one is None:
            one = _ONES[bad.device] = torch.ones(1, device=bad.device)
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for group in by_dtype.values():  # the fused kernel takes one dtype at a time
            # GradScaler's fused check: sets ``bad`` on any NaN/inf; scaling by 1 leaves the values as they were
            torch._amp_foreach_non_finite_check_and_unscale_(group, bad, one)
        if not bool(bad):  # the one host sync
            return None
        for name, t in named + [(f"gradient of {name}", g) for name, g in grads]:
            if not bool(t.isfinite().all()):
                return name
    return None  # only a norm overflowed (huge but finite values): nothing to report


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
        on_nonfinite: str = "stop",
    ) -> None:
        if on_nonfinite not in ON_NONFINITE:
            raise ValueError(f"on_nonfinite: expected one of {', '.join(ON_NONFINITE)}, got {on_nonfinite!r}")
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
        self.metrics: dict[str, torch.Tensor | float] = {}  # latest values (loss, predictor quality); read when logging
        self.on_nonfinite = on_nonfinite
        self.skipped_batches = 0  # batches whose update a NaN/inf made this stage skip (skip_batch)
        if on_nonfinite == "skip_batch":
            self.metrics["skipped_batches"] = 0.0
        # Names for errors, in the form state_dict uses: "module.0.weight", "extra.aux_head.1.bias".
        names = {id(p): f"module.{n}" for n, p in self.module.named_parameters()}
        names.update({id(p): f"extra.{n}" for n, p in rule.extra.named_parameters()})
        self._named_params = [
            (names.get(id(p), f"parameter {i}"), p)
            for i, p in enumerate(p for group in self.optimizer.param_groups for p in group["params"])
        ]
        self._feedback_name = {
            Feedback.GRADIENT: f"gradient from stage {index + 1}",
            Feedback.OUTPUT_ERROR: f"output error from stage {num_stages - 1}",
            Feedback.PREDICTOR_TARGET: f"gradient from stage {index + 1} (predictor target)",
        }.get(rule.feedback, "feedback")
        # BatchNorm statistics move in the forward pass: a skipped batch must not leave NaN in them.
        self._running_stats = [
            b
            for m in itertools.chain(self.module.modules(), rule.extra.modules())
            if isinstance(m, nn.modules.batchnorm._NormBase)
            for b in m.buffers(recurse=False)
        ]
        self._batch: _Batch | None = None  # set while step or apply runs
        self._awaiting: deque[_Batch] = deque()  # batches whose forward the rule holds until apply

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1

    # --------------------------------------------------------------- training

    def step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        """Run one batch through this stage; local rules also update here, at once.

        A non-finite output or loss stops the run or (skip_batch) skips this batch's update,
        here or, for a rule that waits for feedback, at its ``apply``.
        """
        batch = self._batch = _Batch(self.steps)
        held = len(self.rule._pending)
        stats = [b.clone() for b in self._running_stats] if self.on_nonfinite == "skip_batch" else None
        try:
            result = self.rule.step(self, x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))
            # A local update has checked the output already (backward_and_step's ``output``): one sync per step.
            if not (batch.checked or batch.skipped):
                checks = [("activation", result.output)]
                if result.loss is not None:
                    checks.append(("loss", result.loss))
                what = _first_nonfinite(checks)
                if what is not None:
                    self._nonfinite(batch, what)
        finally:
            self._batch = None
        self.steps += 1
        if batch.skipped and stats:
            for buf, saved in zip(self._running_stats, stats):
                # .data: a held graph saved these buffers; its backward reads no running statistics,
                # but autograd would refuse it on the bumped version counter
                buf.data.copy_(saved)
        if len(self.rule._pending) > held:
            self._awaiting.append(batch)  # its apply updates (or skips) the same batch
        # The logged loss stays the last finite one (runtimes read it, so there is always one).
        if result.loss is not None and (not batch.skipped or "loss" not in self.metrics):
            self.metrics["loss"] = result.loss
        return result

    def apply(self, signal: torch.Tensor) -> torch.Tensor | None:
        """Feedback from later stages (gradient or output error) for the oldest pending batch."""
        signal = signal.to(self.device, non_blocking=True)
        while len(self._awaiting) > len(self.rule._pending):  # forwards dropped by the rule: forget their batches
            self._awaiting.popleft()
        batch = self._awaiting.popleft() if self._awaiting else _Batch(max(self.steps - 1, 0))
        batch.received = (self._feedback_name, signal)
        self._batch = batch
        try:
            return self.rule.apply(self, signal)
        finally:
            self._batch = None

    def backward_and_step(
        self, tensor: torch.Tensor, grad: torch.Tensor | None = None, *, output: torch.Tensor | None = None
    ) -> None:
        """Backpropagate ``grad`` (or a scalar loss) into this stage's parameters and take an optimizer step.

        ``output``: the activation the stage sends on, from rules that update inside ``step``
        before Stage.step sees it; it is checked with the gradients, so that a non-finite
        batch changes nothing under skip_batch.
        """
        self.optimizer.zero_grad(set_to_none=True)
        tensor.backward(grad)
        batch = self._batch
        checks: list[Named] = [] if output is None else [("activation", output)]
        if grad is None:
            checks.append(("loss", tensor))
        else:
            if batch is None or batch.received is None:  # in apply, the held activation was checked at its step
                checks.append(("activation", tensor))
            checks.append(("gradient of the output", grad))
        if batch is not None and (output is not None or grad is not None):
            batch.checked = True
        self.optimizer_step(checks)

    def optimizer_step(self, checks: Sequence[Named] = ()) -> None:
        """One update from the gradients now in ``.grad`` (and one learning-rate schedule step).

        Every rule's update comes through here: the gradients (with ``checks``) must be
        finite, see ``check_update``; a skipped update zeroes them and steps nothing.
        """
        if not self.check_update(self._named_params, checks):
            self.optimizer.zero_grad(set_to_none=True)
            return
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()

    def check_update(self, params: Iterable[tuple[str, torch.Tensor]], checks: Sequence[Named] = ()) -> bool:
        """Whether the update from ``params``' gradients may be applied to them.

        Checked together in one reduction: the feedback ``apply`` received, ``checks`` (what the
        update came from) and every ``.grad``. On a NaN or inf, ``stop`` raises NonFiniteError
        and ``skip_batch`` counts the batch as skipped (once) and returns False. A batch
        already skipped (at ``step``) returns False without a check.
        """
        batch = self._batch
        if batch is not None and batch.skipped:
            return False
        values = [batch.received, *checks] if batch is not None and batch.received is not None else checks
        what = _first_nonfinite(values, params)
        if what is None:
            return True
        self._nonfinite(batch, what)
        return False

    def drop_pending(self) -> None:
        """Forget the forwards still waiting for feedback (it will not come: the peer that owed it is gone)."""
        self.rule._pending.clear()
        self._awaiting.clear()

    @property
    def batch_skipped(self) -> bool:
        """Whether the batch now in ``step`` or ``apply`` has had its update skipped (rules drop its other updates)."""
        return self._batch is not None and self._batch.skipped

    def _nonfinite(self, batch: _Batch | None, what: str) -> None:
        step = batch.step if batch is not None else self.steps  # outside step/apply: the step being taken
        if self.on_nonfinite == "stop":
            raise NonFiniteError(self.index, step, what, self.on_nonfinite)
        self.skipped_batches += 1
        self.metrics["skipped_batches"] = float(self.skipped_batches)
        if batch is not None:
            batch.skipped = True
        log.warning("stage %d, step %d: non-finite %s: batch skipped (train.on_nonfinite: skip_batch)",
                    self.index, step, what)

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
            "skipped_batches": self.skipped_batches,
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
        self.skipped_batches = state.get("skipped_batches", 0)  # absent from checkpoints of older versions
        if self.on_nonfinite == "skip_batch":
            self.metrics["skipped_batches"] = float(self.skipped_batches)
        self._awaiting.clear()

    def info(self) -> dict:
        """Where this stage runs (for summary.json)."""
        device = str(self.device)
        if self.device.type == "cuda":
            device = f"{device} ({torch.cuda.get_device_name(self.device)})"
        return {"index": self.index, "pid": os.getpid(), "node": socket.gethostname(), "device": device}
