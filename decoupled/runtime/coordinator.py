"""The DNI coordinator: trains each boundary's gradient predictor from samples the stages send.

Stage k+1 sends (h_k, y, dL/dh_k) triples it computed anyway. ``submit`` only queues
them; one training thread per boundary makes one MSE step per triple, in arrival order (the same
PredictorTrainer as in-process; merging queued triples into one larger step learned
markedly worse), then publishes the new weights as a read-only snapshot. So a stage never waits: submitting is a queue append, and asking
for weights reads the latest snapshot. When training falls behind, the oldest queued
samples are dropped (counted), so memory stays bounded.
"""

from __future__ import annotations

import collections
import threading
import time

import torch

from ..config import DNIMethod
from ..rules.dni import GradientPredictor, PredictorTrainer


class PredictorCoordinator:
    """Runs in its own threaded Ray actor (one per run)."""

    def __init__(self, method: dict, num_classes: int, threads: int = 1) -> None:
        torch.set_num_threads(threads)
        self.cfg = DNIMethod.model_validate(method)
        self.num_classes = num_classes
        self.trainers: dict[int, PredictorTrainer] = {}
        self.queues: dict[int, collections.deque] = {}
        self.published: dict[int, tuple[int, dict[str, torch.Tensor]]] = {}
        self.stats_: dict[int, dict[str, float]] = {}
        self.cv = threading.Condition()
        self.error: BaseException | None = None

    def register(self, boundary: int, shape: tuple[int, ...], hidden: int, state: dict[str, torch.Tensor]) -> None:
        """Take stage ``boundary``'s initial predictor, so both copies start identical."""
        c = self.cfg
        predictor = GradientPredictor(shape, self.num_classes, c.conditioned, hidden, c.predictor_layers,
                                      c.predictor_kernel_size)
        predictor.load_state_dict(state)
        with self.cv:
            self.trainers[boundary] = PredictorTrainer(predictor, c.predictor_lr, c.predictor_optimizer)
            self.queues[boundary] = collections.deque()
            self.published[boundary] = (0, state)
            self.stats_[boundary] = {"version": 0, "samples": 0, "dropped": 0, "nonfinite_samples": 0}
        threading.Thread(target=self._train_loop, args=(boundary,), name=f"predictor-{boundary}",
                         daemon=True).start()

    def submit(self, boundary: int, h: torch.Tensor, y: torch.Tensor, grad: torch.Tensor) -> None:
        with self.cv:
            queue = self.queues[boundary]
            queue.append((h, y, grad))
            while len(queue) > self.cfg.predictor_max_outstanding:
                queue.popleft()
                self.stats_[boundary]["dropped"] += 1
            self.cv.notify_all()

    def weights(self, boundary: int, have: int) -> tuple[int, dict[str, torch.Tensor]] | None:
        """The newest published weights if they are newer than version ``have``, else None."""
        if self.error is not None:
            raise RuntimeError(f"predictor training failed: {self.error!r}") from self.error
        version, state = self.published[boundary]
        return (version, state) if version > have else None

    def stats(self) -> dict[int, dict[str, float]]:
        with self.cv:
            return {b: dict(s) for b, s in self.stats_.items()}

    def cpu_seconds(self) -> float:
        """CPU time this actor's process has used (all its threads): the planner's measure of its cost."""
        return time.process_time()

    def _train_loop(self, boundary: int) -> None:
        # One thread per boundary: the OS then gives predictor training a share of the CPU per
        # boundary, as each stage has; with a single thread it fell behind at K=4 on 2 cores.
        trainer, queue = self.trainers[boundary], self.queues[boundary]
        try:
            while True:
                with self.cv:
                    self.cv.wait_for(lambda: bool(queue))
                    h, y, grad = queue.popleft()
                if not (bool(torch.isfinite(h).all()) and bool(torch.isfinite(grad).all())):
                    with self.cv:  # the stage skipped (or stopped at) that batch; it must not poison the predictor
                        self.stats_[boundary]["nonfinite_samples"] += 1
                    continue
                metrics = trainer.update(h, y, grad)
                snapshot = {k: v.detach().clone() for k, v in trainer.predictor.state_dict().items()}
                with self.cv:
                    stats = self.stats_[boundary]
                    stats["version"] += 1
                    stats["samples"] += 1
                    stats.update({k: float(v) for k, v in metrics.items()})
                    self.published[boundary] = (int(stats["version"]), snapshot)
        except BaseException as err:  # surfaced to the stages at their next weights() call
            self.error = err
