"""Truncated BPTT, with or without synthetic gradients at the segment boundaries (DNI paper, section 3.1).

An episode of S steps is cut into segments of T steps. Segment k starts from segment k-1's final
state, detached and made a leaf s_{k-1}, runs forward to its final state s_k and its loss L_k,
then backpropagates; the core updates after every segment.

- ``tbptt``: backward(L_k). Nothing from segments after k reaches segment k's parameters.
- ``dni``: g_k = predictor(s_k) stands in for every later segment: the core backpropagates
  (L_k, s_k) with gradients (1, sg_scale * g_k). The predictor's output at s_{k-1}, made one
  segment earlier, learns by MSE toward the bootstrapped target
      dL_k/ds_{k-1} + bootstrap_discount * (ds_k/ds_{k-1})^T g_k,
  as in TD learning. With bootstrap_discount 1 the predictor estimates the whole future's gradient
  (the DNI paper); below 1, a discounted sum over later segments. sg_scale only weighs its use by
  the core. With an exact predictor and both at 1 the segments' gradients add up to full BPTT's
  (tests/test_recurrent.py). The last segment of an episode has nothing after it: it gets no
  synthetic gradient, so its target is exact and the bootstrapping chain ends on the truth.
- ``dni`` with ``aux_future_gradient`` (the paper's +Aux): a linear head on the core's output at each
  step predicts the synthetic gradient its segment ends with (zero after the last segment); the MSE
  is added to the core's loss, so the core must carry what the future gradient depends on. It is
  backpropagated separately, so it does not enter the predictor's target.

Units: losses are sums over a sequence, averaged over the batch (tasks.py), so dL/dstate per
sequence is B times the gradient autograd gives. Predictors work per sequence (as in
decoupled/rules/dni.py); ``synthetic`` callables return dL/dstate as autograd would (divided by B).
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from ..metrics import MetricsLogger, write_json_atomic
from .config import RecurrentDNIMethod, SequenceConfig, as_sequence_config
from .model import RecurrentModel, SyntheticGradientPredictor
from .tasks import LN2, CurriculumState, Episode, TextTaskGenerator, build_task

# (segment index, final state detached, next segment's first input) -> dL/d(final state), or None for none
SyntheticFn = Callable[[int, torch.Tensor, torch.Tensor], "torch.Tensor | None"]


@dataclass
class Segment:
    index: int
    start: torch.Tensor  # the initial state, a leaf
    end: torch.Tensor  # the final state, detached
    next_input: torch.Tensor | None  # the next segment's first input; None for the episode's last segment
    loss: torch.Tensor  # this segment's loss (nats per sequence), detached
    synthetic: torch.Tensor | None  # g_k: the predicted gradient at ``end`` (before sg_scale), None if none
    target: torch.Tensor | None  # the bootstrapped dL/d start; None for the first segment
    aux_loss: torch.Tensor | None = None


def segments(
    model: RecurrentModel,
    episode: Episode,
    truncation: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    synthetic: SyntheticFn | None = None,
    sg_scale: float = 1.0,
    bootstrap_discount: float = 1.0,
    aux_head: nn.Module | None = None,
    aux_weight: float = 1.0,
) -> Iterator[Segment]:
    """Run one episode segment by segment, backpropagating each; yields each Segment after its backward.

    Parameter gradients accumulate in ``.grad``: a caller that updates per segment steps and zeroes
    between yields (the next segment runs after that); one that does not gets their sum.
    """
    x, y, mask = episode.x, episode.y, episode.mask
    steps, batch = x.shape[1], x.shape[0]
    state = model.initial_state(batch)
    for k, t0 in enumerate(range(0, steps, truncation)):
        t1 = min(t0 + truncation, steps)
        start = state.detach().requires_grad_(k > 0)  # the zero initial state needs no gradient
        logits, outputs, end = model(x[:, t0:t1], start)
        loss = loss_fn(logits, y[:, t0:t1], mask[:, t0:t1])
        next_input = x[:, t1] if t1 < steps else None
        sg = synthetic(k, end.detach(), next_input) if synthetic is not None and next_input is not None else None
        aux = None
        if aux_head is not None:
            # per-sequence units, zero where nothing follows (the last segment's true future gradient)
            future = sg * batch if sg is not None else torch.zeros_like(end)
            pred = aux_head(outputs)
            aux = aux_weight * F.mse_loss(pred, future.detach().unsqueeze(1).expand_as(pred))
        target = None
        if sg is None:
            loss.backward(retain_graph=aux is not None)
            target = start.grad.clone() if k > 0 else None
        elif k == 0 or sg_scale == bootstrap_discount:  # one backward gives the core's gradients and the target
            torch.autograd.backward([loss, end], [torch.ones_like(loss), sg_scale * sg], retain_graph=aux is not None)
            target = start.grad.clone() if k > 0 else None
        else:  # two backwards, to weigh the synthetic gradient differently for the core and for the target
            loss.backward(retain_graph=True)
            own = start.grad.clone()
            end.backward(sg_scale * sg, retain_graph=aux is not None)
            # (start.grad - own) / sg_scale is (ds_k/ds_{k-1})^T g_k
            target = own + (bootstrap_discount / sg_scale) * (start.grad - own)
        if aux is not None:
            aux.backward()  # after the target is read: the aux task is no gradient of the task loss
        yield Segment(k, start, end.detach(), next_input, loss.detach(), sg, target,
                      aux.detach() if aux is not None else None)
        state = end


def true_future_gradients(
    model: RecurrentModel,
    episode: Episode,
    truncation: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per segment boundary k: (s_k, the next input, dL/ds_k of every later step's loss), by full BPTT.

    What a perfect predictor would send at each boundary, for the current parameters: the reference
    the synthetic gradients are checked against (``train.oracle_every``). Leaves ``.grad`` untouched.
    """
    x, y, mask = episode.x, episode.y, episode.mask
    steps = x.shape[1]
    state = model.initial_state(x.shape[0])
    total, ends = 0.0, []
    with torch.enable_grad():
        for t0 in range(0, steps, truncation):
            t1 = min(t0 + truncation, steps)
            logits, _, state = model(x[:, t0:t1], state)
            total = total + loss_fn(logits, y[:, t0:t1], mask[:, t0:t1])
            if t1 < steps:
                ends.append((state, x[:, t1]))
        if not ends:
            return []
        # an intermediate state's gradient is that of the losses after it only: the future's gradient
        grads = torch.autograd.grad(total, [s for s, _ in ends], allow_unused=True)
    return [(s.detach(), nxt, g if g is not None else torch.zeros_like(s)) for (s, nxt), g in zip(ends, grads)]


class SequenceTrainer:
    """The core (and aux head) with its optimizer; for ``dni`` the predictor with its own."""

    def __init__(self, cfg: SequenceConfig, model: RecurrentModel, task) -> None:
        self.cfg, self.model, self.task = cfg, model, task
        self.method = cfg.method
        self.dni = isinstance(self.method, RecurrentDNIMethod)
        self.aux_head = None
        if self.dni and self.method.aux_future_gradient:
            self.aux_head = nn.Linear(model.hidden, model.state_size)
        params = list(model.parameters()) + (list(self.aux_head.parameters()) if self.aux_head else [])
        self.params = params
        self.optimizer = torch.optim.Adam(params, lr=cfg.optimizer.lr)
        self.predictor = None
        if self.dni:
            m = self.method
            self.predictor = SyntheticGradientPredictor(
                model.state_size, task.input_size if m.condition_on_next_input else 0, m.predictor, m.predictor_hidden
            )
            self.predictor_optimizer = torch.optim.Adam(self.predictor.parameters(), lr=m.predictor_lr)

    def synthetic(self, k: int, end: torch.Tensor, next_input: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.predictor(end, next_input) / end.shape[0]

    def train_predictor(self, prev: Segment, target: torch.Tensor) -> dict[str, float]:
        """One MSE step of the predictor's output at ``prev.end`` toward the gradient that reached it.

        Returns sums, so an episode's figures weigh every boundary alike: the squared error, that of a
        predictor sending nothing (the target's mean square), and the cosine between the synthetic
        gradient that was sent and the target, over the sequences whose target is not zero (early in
        training, gradients from far ahead are still zero: nothing to point at).
        """
        goal = target * target.shape[0]  # per-sequence units
        pred = self.predictor(prev.end, prev.next_input)
        loss = F.mse_loss(pred, goal)
        self.predictor_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.predictor_optimizer.step()
        nonzero = target.flatten(1).norm(dim=1) > 0
        cosine = F.cosine_similarity(prev.synthetic.flatten(1), target.flatten(1), dim=1, eps=1e-30)[nonzero]
        return {"mse": float(loss.detach()), "silent": float(goal.pow(2).mean()),
                "cosine_sum": float(cosine.sum()), "cosine_n": float(nonzero.sum())}

    def oracle_check(self, episode: Episode) -> dict[str, float]:
        """How close the synthetic gradients this predictor would send are to the true ones (full BPTT).

        ``oracle_cosine``: mean cosine per sequence where the true gradient is not zero;
        ``oracle_relative_mse``: squared error over the true gradient's square (1 = no better than silence).
        """
        err = ref = cos_sum = 0.0
        n = 0
        for k, (end, next_input, true) in enumerate(true_future_gradients(self.model, episode, self.cfg.truncation,
                                                                          self.task.loss)):
            sent = self.synthetic(k, end, next_input)
            err += float((sent - true).pow(2).sum())
            ref += float(true.pow(2).sum())
            nonzero = true.flatten(1).norm(dim=1) > 0
            cos_sum += float(F.cosine_similarity(sent.flatten(1), true.flatten(1), dim=1, eps=1e-30)[nonzero].sum())
            n += int(nonzero.sum())
        out = {"oracle_relative_mse": err / ref} if ref > 0 else {}
        if n:
            out["oracle_cosine"] = cos_sum / n
        return out

    def train_episode(self, episode: Episode) -> dict[str, float]:
        """One episode, one core update per segment; returns its loss (bits per scored step) and predictor stats."""
        total, stats, prev = 0.0, [], None
        m, aux_total = self.method, 0.0
        dni = {"synthetic": self.synthetic, "sg_scale": m.sg_scale, "bootstrap_discount": m.bootstrap_discount,
               "aux_head": self.aux_head, "aux_weight": m.aux_weight} if self.dni else {}
        truth = None
        if self.dni and m.predictor_target == "full_bptt":  # the diagnostic: exact targets, at this episode's start
            truth = [g for _, _, g in true_future_gradients(self.model, episode, self.cfg.truncation, self.task.loss)]
        for seg in segments(self.model, episode, self.cfg.truncation, self.task.loss, **dni):
            total += float(seg.loss)
            aux_total += float(seg.aux_loss) if seg.aux_loss is not None else 0.0
            if self.dni and prev is not None and prev.synthetic is not None:
                stats.append(self.train_predictor(prev, seg.target if truth is None else truth[prev.index]))
            if self.cfg.optimizer.clip_norm:
                nn.utils.clip_grad_norm_(self.params, self.cfg.optimizer.clip_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            prev = seg
        out = {"loss_bits": total / LN2 / max(episode.scored_steps, 1e-9)}
        if stats:
            sums = {k: sum(s[k] for s in stats) for k in stats[0]}
            out["predictor_mse"] = sums["mse"] / len(stats)
            if sums["silent"] > 0:
                out["predictor_relative_mse"] = sums["mse"] / sums["silent"]  # < 1: better than sending nothing
            if sums["cosine_n"] > 0:
                out["predictor_cosine"] = sums["cosine_sum"] / sums["cosine_n"]
        if self.aux_head is not None:
            out["aux_loss"] = aux_total
        return out


@torch.no_grad()
def evaluate(model: RecurrentModel, task, episodes: list[Episode]) -> float:
    """Bits per scored step over ``episodes``, each run whole from a fresh state (truncation only shapes training)."""
    nats, steps = 0.0, 0.0
    for ep in episodes:
        logits, _, _ = model(ep.x, model.initial_state(ep.x.shape[0]))
        nats += float(task.loss(logits, ep.y, ep.mask)) * ep.x.shape[0]
        steps += float(ep.mask.sum())
    return nats / LN2 / steps


def method_label(cfg: SequenceConfig) -> str:
    m = cfg.method
    return "dni+aux" if isinstance(m, RecurrentDNIMethod) and m.aux_future_gradient else m.name


def new_run_dir(parent: Path, name: str) -> Path:
    from ..train import new_run_dir as _new_run_dir

    return _new_run_dir(Path(parent), name)


def run(config: SequenceConfig | dict, run_dir: Path | None = None) -> dict:
    """Train one recurrent run; returns its summary (also ``<run_dir>/summary.json``)."""
    cfg = as_sequence_config(config)
    tr = cfg.train
    if tr.threads:
        torch.set_num_threads(tr.threads)
    task = build_task(cfg.task)  # a corpus too small is a config error: before the run directory exists
    torch.manual_seed(tr.seed)
    model = RecurrentModel(cfg.model.name, task.input_size, cfg.model.hidden, cfg.model.layers, task.output_size)
    trainer = SequenceTrainer(cfg, model, task)
    data_gen = torch.Generator().manual_seed(tr.seed)
    eval_gen = torch.Generator().manual_seed(tr.seed + 1_000_003)
    text = isinstance(task, TextTaskGenerator)
    curriculum = None if text else CurriculumState(cfg.task.curriculum)
    validation = task.validation(max(tr.batch_size, 64)) if text else None

    run_dir = Path(run_dir) if run_dir is not None else new_run_dir(cfg.output.dir, cfg.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    logger = MetricsLogger(run_dir / "tensorboard", cfg.output.tensorboard)
    label = method_label(cfg)
    evals: list[tuple[int, float]] = []
    last_oracle: dict[str, float] = {}
    window: list[dict[str, float]] = []
    last_logged: dict[str, float] = {}
    t_start = time.perf_counter()
    step = 0
    try:
        for step in range(1, tr.steps + 1):
            length = None if text else curriculum.length
            episode = task.batch(tr.batch_size, length, data_gen)
            oracle = trainer.dni and tr.oracle_every and step % tr.oracle_every == 0
            if oracle:  # before the episode's updates: the gradients its first segment would be sent
                last_oracle = trainer.oracle_check(episode)
                logger.scalars(step, {f"oracle/{k}": v for k, v in last_oracle.items()})
            metrics = trainer.train_episode(episode)
            if not math.isfinite(metrics["loss_bits"]):
                raise FloatingPointError(f"step {step}: the training loss is {metrics['loss_bits']}")
            if curriculum is not None:
                curriculum.record(step, metrics["loss_bits"])
            window.append(metrics)
            done = curriculum is not None and curriculum.done  # the last length passed: nothing left to learn
            if step % tr.log_every == 0 or step == tr.steps or done:
                keys = dict.fromkeys(k for m in window for k in m)  # a figure may be missing from some batches
                last_logged = {k: statistics.fmean(m[k] for m in window if k in m) for k in keys}
                if curriculum is not None:
                    last_logged["curriculum_length"] = curriculum.length
                    last_logged["solved_length"] = curriculum.solved
                logger.scalars(step, {f"train/{k}": v for k, v in last_logged.items()})
                window = []
            if step % tr.eval_every == 0 or step == tr.steps or done:
                model.eval()
                if text:
                    score = evaluate(model, task, validation)
                else:
                    eps = [task.batch(tr.batch_size, curriculum.length, eval_gen) for _ in range(tr.eval_batches)]
                    score = evaluate(model, task, eps)
                model.train()
                evals.append((step, score))
                logger.scalars(step, {"eval/bits_per_char" if text else "eval/bits_per_output_step": score})
                if tr.progress:
                    where = f"val {score:.3f} bits/char" if text else (
                        f"length {curriculum.length} (solved {curriculum.solved}), eval {score:.3f} bits/step")
                    print(f"{cfg.name} {label} T={cfg.truncation} step {step}: train {metrics['loss_bits']:.3f}, "
                          f"{where}", file=sys.stderr, flush=True)
            if done:
                break
    finally:
        logger.close()
    summary = {
        "name": cfg.name, "task": cfg.task.name, "method": label, "truncation": cfg.truncation,
        "model": cfg.model.name, "hidden": cfg.model.hidden, "seed": tr.seed, "steps": step,
        "wall_seconds": time.perf_counter() - t_start, "eval_history": evals, "last_train_metrics": last_logged,
        "last_oracle_check": last_oracle,
        "run_dir": str(run_dir),
    }
    if text:
        summary.update(corpus=task.info, val_bits_per_char=evals[-1][1],
                       best_val_bits_per_char=min(score for _, score in evals))
    else:
        summary.update(max_length_learned=curriculum.solved, curriculum=curriculum.state_dict(),
                       final_eval_bits_per_step=evals[-1][1])
    write_json_atomic(run_dir / "summary.json", summary)
    return summary
