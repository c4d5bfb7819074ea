"""The DNI coordinator: trains each boundary's gradient predictor from samples the stages send.

Stage k+1 sends (h_k, y, dL/dh_k) triples it computed anyway; the coordinator takes one
MSE step per triple (the same PredictorTrainer as in-process) and hands the newest
weights to stage k when it asks. Stages never wait on it: a stage drops a sample when
earlier ones are still queued, and picks up weights only once they have arrived.
"""

from __future__ import annotations

import torch

from ..config import DNIMethod
from ..rules.dni import GradientPredictor, PredictorTrainer


class PredictorCoordinator:
    """Runs in its own Ray actor (one per run)."""

    def __init__(self, method: dict, num_classes: int, threads: int = 1) -> None:
        torch.set_num_threads(threads)
        self.cfg = DNIMethod.model_validate(method)
        self.num_classes = num_classes
        self.trainers: dict[int, PredictorTrainer] = {}
        self.versions: dict[int, int] = {}
        self.last: dict[int, dict[str, float]] = {}

    def register(self, boundary: int, shape: tuple[int, ...], hidden: int, state: dict[str, torch.Tensor]) -> None:
        """Take stage ``boundary``'s initial predictor, so both copies start identical."""
        c = self.cfg
        predictor = GradientPredictor(shape, self.num_classes, c.conditioned, hidden, c.predictor_layers,
                                      c.predictor_kernel_size)
        predictor.load_state_dict(state)
        self.trainers[boundary] = PredictorTrainer(predictor, c.predictor_lr, c.predictor_optimizer)
        self.versions[boundary] = 0

    def submit(self, boundary: int, h: torch.Tensor, y: torch.Tensor, grad: torch.Tensor) -> None:
        metrics = self.trainers[boundary].update(h, y, grad)
        self.versions[boundary] += 1
        self.last[boundary] = {k: float(v) for k, v in metrics.items()}

    def weights(self, boundary: int, have: int) -> tuple[int, dict[str, torch.Tensor]] | None:
        """The newest weights if they are newer than version ``have``, else None."""
        version = self.versions[boundary]
        if version <= have:
            return None
        return version, {k: v.clone() for k, v in self.trainers[boundary].predictor.state_dict().items()}

    def stats(self) -> dict[int, dict[str, float]]:
        return {b: {"version": v, **self.last.get(b, {})} for b, v in self.versions.items()}

