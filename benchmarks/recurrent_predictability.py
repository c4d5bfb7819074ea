"""How much of the true future gradient at a segment boundary a linear predictor could capture at all.

DNI's predictor sees only the boundary state s_k (and, conditioned, the next input). If the gradient that
later segments send back, dL/ds_k, is not a function of s_k, no predictor can send it. This script trains
a core with a config's method for some batches, then collects (s_k, true dL/ds_k) pairs by full BPTT
(``true_future_gradients``), fits the best linear map on most of them by least squares (ridge) and reports
its held-out R^2: the fraction of the gradient's variance any linear predictor could capture then, against
the 0 of sending nothing.

    python benchmarks/recurrent_predictability.py --config configs/recurrent/copy.yaml truncation=2
    python benchmarks/recurrent_predictability.py --config configs/recurrent/text.yaml truncation=2 --train-batches 300
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from decoupled.recurrent.config import load_sequence_config
from decoupled.recurrent.model import RecurrentModel
from decoupled.recurrent.tasks import CurriculumState, TextTaskGenerator, build_task
from decoupled.recurrent.tbptt import SequenceTrainer, true_future_gradients


def held_out_r2(states: torch.Tensor, grads: torch.Tensor, ridge: float = 1e-3, train_fraction: float = 0.8) -> float:
    """R^2 on held-out pairs of the least-squares linear map (with bias) from states to gradients."""
    n = int(train_fraction * len(states))
    x = torch.cat([states, torch.ones(len(states), 1, dtype=states.dtype)], 1).double()
    y = grads.double()
    a = x[:n].T @ x[:n] + ridge * n * torch.eye(x.shape[1], dtype=x.dtype)
    w = torch.linalg.solve(a, x[:n].T @ y[:n])
    residual = y[n:] - x[n:] @ w
    total = y[n:] - y[:n].mean(0)  # against the best constant fitted on the same training pairs
    return float(1.0 - residual.pow(2).sum() / total.pow(2).sum())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--train-batches", type=int, default=2000, help="batches trained before collecting")
    p.add_argument("--collect-batches", type=int, default=40, help="batches whose boundaries give the pairs")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_intermixed_args(argv)
    cfg = load_sequence_config(args.config, args.overrides)
    torch.set_num_threads(cfg.train.threads or torch.get_num_threads())
    task = build_task(cfg.task)
    torch.manual_seed(cfg.train.seed)
    model = RecurrentModel(cfg.model.name, task.input_size, cfg.model.hidden, cfg.model.layers, task.output_size)
    trainer = SequenceTrainer(cfg, model, task)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    text = isinstance(task, TextTaskGenerator)
    curriculum = None if text else CurriculumState(cfg.task.curriculum)
    for step in range(1, args.train_batches + 1):
        metrics = trainer.train_episode(task.batch(cfg.train.batch_size, None if text else curriculum.length, gen))
        if curriculum is not None:
            curriculum.record(step, metrics["loss_bits"])
    length = None if text else curriculum.length
    states, grads = [], []
    for _ in range(args.collect_batches):
        for end, _, grad in true_future_gradients(model, task.batch(cfg.train.batch_size, length, gen),
                                                  cfg.truncation, task.loss):
            states.append(end)
            grads.append(grad * end.shape[0])  # per sequence
    states, grads = torch.cat(states), torch.cat(grads)
    out = {"config": args.config, "overrides": args.overrides, "method": cfg.method.name,
           "truncation": cfg.truncation, "train_batches": args.train_batches, "length": length,
           "pairs": len(states), "held_out_r2": held_out_r2(states, grads),
           "train_loss_bits": metrics["loss_bits"]}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
