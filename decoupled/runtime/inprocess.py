"""In-process runtime: all K stages in one process, one batch at a time.

The reference for every other runtime, and the single-worker E2EBP baseline. Feedback
moves as each rule declares (rules/base.py: Feedback); nothing here depends on which
rule runs.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import checkpoint
from ..config import Config
from ..data import Dataset, iterate_batches, load_dataset
from ..metrics import MetricsLogger, PeakMemory, Throughput
from ..pipeline import build_stages, configure_threads, resolve_device, steps_per_epoch, total_steps
from ..rules import Feedback
from ..stage import Stage
from ..stopping import RunStopped, StopRequest


def train_batch(stages: list[Stage], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One training step of the whole pipeline; returns the last stage's logits."""
    feedback = stages[0].rule.feedback
    results = []
    h = x
    for k, stage in enumerate(stages):
        result = stage.step(h, y)
        if feedback is Feedback.PREDICTOR_TARGET and k > 0:
            stages[k - 1].apply(result.feedback)  # train predictor k-1 at once, as single-process DNI does
        results.append(result)
        h = result.output
    if feedback is Feedback.GRADIENT:
        grad = results[-1].feedback
        for stage in reversed(stages[:-1]):
            grad = stage.apply(grad)
    elif feedback is Feedback.OUTPUT_ERROR:
        for stage in stages[:-1]:
            stage.apply(results[-1].feedback)
    return results[-1].output


@torch.no_grad()
def evaluate(stages: list[Stage], x: torch.Tensor, y: torch.Tensor, batch_size: int) -> dict:
    """Test accuracy of the full pipeline and of each stage's local classifier, if any."""
    for stage in stages:
        stage.eval()
    correct = torch.zeros(len(stages), dtype=torch.long)
    has_aux = [False] * len(stages)
    for xb, yb in iterate_batches(x, y, batch_size, shuffle=False):
        h = xb
        for k, stage in enumerate(stages):
            h, aux = stage.predict(h)
            logits = h if stage.is_last else aux
            if logits is not None:
                has_aux[k] = True
                correct[k] += (logits.argmax(1) == yb).sum().cpu()
    for stage in stages:
        stage.train()
    accuracy = (correct.double() / len(y)).tolist()
    return {
        "test_accuracy": accuracy[-1],
        "aux_accuracy": [a if has else None for a, has in zip(accuracy[:-1], has_aux[:-1])],
    }


def train_inprocess(cfg: Config, run_dir: Path, dataset: Dataset | None = None,
                    resume: tuple[Path, dict] | None = None) -> dict:
    """Train ``cfg`` with all stages in this process; returns the run's summary.

    ``resume``: a checkpoint (directory, manifest) of this run to continue from.
    """
    start = time.perf_counter()
    configure_threads(cfg)
    device = resolve_device(cfg.train.device)
    dataset = dataset or load_dataset(cfg.data, cfg.seed)
    # the whole (in-memory) data set goes to the device once, not batch by batch
    train_x, train_y = dataset.train_x.to(device), dataset.train_y.to(device)
    test_x, test_y = dataset.test_x.to(device), dataset.test_y.to(device)
    plans, stages = build_stages(cfg, dataset, device)
    memory = PeakMemory(device)
    steps, per_epoch = total_steps(cfg, dataset), steps_per_epoch(cfg, dataset)
    generator = torch.Generator().manual_seed(cfg.seed)
    step, evals = 0, []
    if resume is not None:
        step, evals = _restore(resume, stages, generator)
    logger = MetricsLogger(run_dir, cfg.output.tensorboard, purge_step=step + 1 if step else None)
    bs = cfg.train.batch_size
    throughput = Throughput(min(cfg.train.warmup_steps, steps - 1), device)
    train_seconds = 0.0
    # disable=None: a bar on a terminal, silence in logs and CI
    progress = tqdm(total=steps, initial=step, desc=f"{cfg.method.display_name()} K={len(stages)}", unit="step",
                    disable=None if cfg.train.progress else True, leave=False)
    ckpt = cfg.checkpoint
    try:
        with StopRequest() as stop:
            while step < steps:
                t0 = time.perf_counter()
                throughput.begin_epoch()
                epoch_generator = generator.get_state()  # this epoch's order and augmentation come from here
                skip = step % per_epoch  # resumed mid-epoch: the batches already trained on
                batches = iterate_batches(train_x, train_y, bs, shuffle=True, generator=generator,
                                          augment=dataset.augment, drop_last=True)
                for i, (x, y) in enumerate(batches):
                    if i < skip:
                        continue
                    logits = train_batch(stages, x, y)
                    step += 1
                    throughput.step(bs)
                    progress.update()
                    if step % cfg.train.log_every == 0 or step == steps:
                        memory.sample()
                        values = {f"stage{s.index}/{k}": v for s in stages for k, v in s.metrics.items()}
                        values["train/accuracy"] = (logits.argmax(1) == y).double().mean()
                        logger.scalars(step, values)
                        progress.set_postfix(loss=f"{float(stages[-1].metrics['loss']):.3f}")
                    if step >= steps or step % per_epoch == 0:
                        break
                    # a stop request is read between two steps: every stage is whole
                    if ckpt.enabled and (stop.requested or checkpoint.is_checkpoint_step(
                            step - 1, ckpt.every_steps, per_epoch, steps)):
                        _save(cfg, run_dir, stages, step, epoch_generator, evals)
                    if stop.requested:
                        raise RunStopped(run_dir, step if ckpt.enabled else None)
                rate = throughput.end_epoch()
                train_seconds += time.perf_counter() - t0
                result = evaluate(stages, test_x, test_y, cfg.train.eval_batch_size)
                evals.append(result)
                values = {"test/accuracy": result["test_accuracy"]}
                if rate is not None:
                    values["throughput/samples_per_sec"] = rate
                values.update({f"test/aux_accuracy_stage{k}": a for k, a in enumerate(result["aux_accuracy"]) if a is not None})
                logger.scalars(step, values)
                progress.set_description(f"{cfg.method.display_name()} K={len(stages)} test acc {result['test_accuracy']:.3f}")
                if ckpt.enabled:  # the epoch's end, after its evaluation: a resume starts the next epoch
                    _save(cfg, run_dir, stages, step, generator.get_state(), evals)
                if stop.requested and step < steps:
                    raise RunStopped(run_dir, step if ckpt.enabled else None)
    finally:
        progress.close()
        logger.close()
    final = evals[-1]
    return {
        "name": cfg.name,
        "method": cfg.method.name,
        "label": cfg.method.display_name(),
        "schedule": None,
        "runtime": "inprocess",
        "stages": len(stages),
        "split": [{"index": p.index, "blocks": [p.start, p.stop], "params": p.params} for p in plans],
        "epochs": len(evals),
        "steps": step,
        "batch_size": bs,
        "samples_per_sec": throughput.samples_per_sec,
        "test_accuracy": final["test_accuracy"],
        "aux_accuracy": final["aux_accuracy"],
        "test_accuracy_per_epoch": [e["test_accuracy"] for e in evals],
        "final_loss": float(loss) if (loss := stages[-1].metrics.get("loss")) is not None else None,
        "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - start,
        "peak_memory_mb": memory.mb,
        "stage_info": [s.info() for s in stages],
        "torch_version": torch.__version__,
        "resumed_from_step": resume[1]["steps_done"] if resume is not None else None,
    }


def _save(cfg: Config, run_dir: Path, stages: list[Stage], steps_done: int, epoch_generator: torch.Tensor,
          evals: list[dict]) -> None:
    """One worker file holding every stage, then the manifest."""
    directory = checkpoint.step_dir(run_dir, steps_done)
    checkpoint.save_worker(directory, 0, {"stages": [s.state_dict() for s in stages], "steps_done": steps_done,
                                          "epoch_generator": epoch_generator})
    checkpoint.write_manifest(run_dir, steps_done, 1, runtime="inprocess", mode="inprocess",
                              method=cfg.method.display_name(), evals=evals)
    checkpoint.prune(run_dir, cfg.checkpoint.keep)


def _restore(resume: tuple[Path, dict], stages: list[Stage], generator: torch.Generator) -> tuple[int, list[dict]]:
    directory, manifest = resume
    state = checkpoint.load_worker(directory, 0)
    if len(state["stages"]) != len(stages):
        raise checkpoint.CheckpointError(f"{directory}: holds {len(state['stages'])} stages, the run has {len(stages)}")
    for stage, stage_state in zip(stages, state["stages"]):
        stage.load_state_dict(stage_state)
    generator.set_state(state["epoch_generator"])
    return manifest["steps_done"], list(manifest["evals"])
