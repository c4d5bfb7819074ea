"""Synthetic gradients for recurrent networks (decoupled/recurrent): the segment gradients against full BPTT,
the bootstrapped target, the predictor learning, the copy tasks, the config checks, one run through the CLI."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from decoupled.config import ConfigError
from decoupled.recurrent.cli import add_parsers, run as cli_run
from decoupled.recurrent.config import CopyTask, Curriculum, RepeatCopyTask, build_sequence_config
from decoupled.recurrent.model import RecurrentModel, SyntheticGradientPredictor
from decoupled.recurrent.tasks import CopyTaskGenerator, CurriculumState, Episode, RepeatCopyTaskGenerator, bits_loss
from decoupled.recurrent.tbptt import SequenceTrainer, segments, true_future_gradients

from conftest import _alive, _descendants, assert_all_exit


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is fastest, and several fight over a busy machine's cores (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------- exact gradients with a perfect predictor


def _problem(cell: str, layers: int, steps: int = 11, batch: int = 3):
    torch.manual_seed(0)
    model = RecurrentModel(cell, 3, 5, layers, 2).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, steps, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (batch, steps, 2), generator=g).double()
    mask = torch.ones(batch, steps, dtype=torch.float64)
    mask[:, :2] = 0.0  # some unscored steps, as in the copy task's input phase
    return model, Episode(x, y, mask)


def _full_bptt(model, episode, truncation):
    """Full BPTT over the episode, cut at the same boundaries: parameter gradients and dL/d(boundary state)."""
    model.zero_grad()
    state = model.initial_state(episode.x.shape[0])
    total, boundaries = 0.0, []
    steps = episode.x.shape[1]
    for t0 in range(0, steps, truncation):
        t1 = min(t0 + truncation, steps)
        logits, _, state = model(episode.x[:, t0:t1], state)
        total = total + bits_loss(logits, episode.y[:, t0:t1], episode.mask[:, t0:t1])
        if t1 < steps:
            state.retain_grad()
            boundaries.append(state)
    total.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return grads, [b.grad.clone() for b in boundaries]


@pytest.mark.parametrize("cell,layers,truncation", [("lstm", 1, 3), ("gru", 1, 2), ("lstm", 2, 4)])
def test_perfect_predictor_gives_full_bptt_gradient(cell, layers, truncation):
    model, episode = _problem(cell, layers)
    full, oracle = _full_bptt(model, episode, truncation)

    def run(synthetic):
        model.zero_grad()
        segs = list(segments(model, episode, truncation, bits_loss, synthetic))  # no steps: gradients add up
        return [p.grad.clone() for p in model.parameters()], segs

    dni, segs = run(lambda k, end, next_input: oracle[k])
    assert len(segs) == len(oracle) + 1 >= 3
    for a, b in zip(dni, full):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    # (b) each segment's bootstrapped target is the true gradient at the boundary before it
    for seg in segs[1:]:
        assert torch.allclose(seg.target, oracle[seg.index - 1], rtol=1e-9, atol=1e-12)
    # plain truncated BPTT misses what crosses the boundaries: the check above can fail
    tbptt, _ = run(None)
    assert not all(torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(tbptt, full))
    # a predictor that is wrong only at one boundary breaks the sum too
    wrong, _ = run(lambda k, end, next_input: oracle[k] * (2.0 if k == 0 else 1.0))
    assert not all(torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(wrong, full))


def test_bootstrapped_target_uses_next_synthetic_gradient():
    """The target at boundary k-1 is dL_k/ds_{k-1} + J^T g_k with whatever g_k was sent: bootstrapping."""
    model, episode = _problem("lstm", 1)
    _, oracle = _full_bptt(model, episode, 3)
    g = torch.Generator().manual_seed(5)
    fake = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in oracle]
    model.zero_grad()
    segs = list(segments(model, episode, 3, bits_loss, lambda k, end, next_input: fake[k]))
    # by hand for segment 1: its loss and the fake gradient at its end, backpropagated to its start
    start = segs[0].end.clone().requires_grad_(True)
    logits, _, end = model(episode.x[:, 3:6], start)
    torch.autograd.backward([bits_loss(logits, episode.y[:, 3:6], episode.mask[:, 3:6]), end],
                            [torch.ones((), dtype=torch.float64), fake[1]])
    assert torch.allclose(segs[1].target, start.grad, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(segs[1].target, oracle[0], rtol=1e-3)


def test_sg_scale_weighs_the_core_only_and_discount_the_target_only():
    model, episode = _problem("gru", 1)
    full, oracle = _full_bptt(model, episode, 2)

    def run(**kwargs):
        model.zero_grad()
        segs = list(segments(model, episode, 2, bits_loss, lambda k, end, next_input: oracle[k], **kwargs))
        return [p.grad.clone() for p in model.parameters()], segs

    model.zero_grad()
    plain = list(segments(model, episode, 2, bits_loss))  # truncated BPTT: each target is the own loss's only
    tbptt = [p.grad.clone() for p in model.parameters()]
    scaled, segs = run(sg_scale=0.1)
    for a, t, f in zip(scaled, tbptt, full):  # the core gets its own loss + 0.1 x the future's gradient
        assert torch.allclose(a, t + 0.1 * (f - t), rtol=1e-8, atol=1e-12)
    for seg in segs[1:]:  # ... while the predictor's target is still the whole future's
        assert torch.allclose(seg.target, oracle[seg.index - 1], rtol=1e-8, atol=1e-12)
    _, half = run(bootstrap_discount=0.5)
    for seg, own in zip(half[1:], plain[1:]):  # own loss + half the bootstrapped rest
        assert torch.allclose(seg.target, own.target + 0.5 * (oracle[seg.index - 1] - own.target), rtol=1e-8,
                              atol=1e-12)


def test_model_state_round_trip_and_zero_predictor():
    torch.manual_seed(0)
    model = RecurrentModel("lstm", 4, 6, 2, 3)
    x = torch.randn(2, 7, 4)
    whole, _, end = model(x, model.initial_state(2))
    first, _, mid = model(x[:, :3], model.initial_state(2))
    second, _, end2 = model(x[:, 3:], mid)  # a segment resumes exactly from the flat state
    assert model.state_size == 2 * 2 * 6 and end.shape == (2, 24)
    assert torch.allclose(torch.cat([first, second], 1), whole, atol=1e-6) and torch.allclose(end, end2, atol=1e-6)
    for kind in ("linear", "mlp"):
        pred = SyntheticGradientPredictor(24, 4, kind, 8)
        assert torch.equal(pred(end, x[:, 0]), torch.zeros(2, 24))  # untrained: sends no gradient


def test_true_future_gradients_are_full_bptt_boundary_gradients():
    model, episode = _problem("gru", 1)
    _, reference = _full_bptt(model, episode, 3)
    found = true_future_gradients(model, episode, 3, bits_loss)
    assert len(found) == len(reference) == 3
    for k, ((end, next_input, grad), ref) in enumerate(zip(found, reference)):
        assert torch.allclose(grad, ref, rtol=1e-9, atol=1e-12)
        assert torch.equal(next_input, episode.x[:, 3 * (k + 1)]) and not end.requires_grad
    assert all(p.grad is None for p in model.parameters())  # a check, not a training step


def test_oracle_check_scores_the_sent_gradients_against_the_true_ones():
    cfg = build_sequence_config({"task": {"name": "copy", "bits": 3}, "model": {"name": "gru", "hidden": 8},
                                 "method": {"name": "dni"}, "truncation": 2})
    torch.manual_seed(0)
    task = CopyTaskGenerator(cfg.task)
    trainer = SequenceTrainer(cfg, RecurrentModel("gru", task.input_size, 8, 1, task.output_size), task)
    episode = task.batch(8, 3, torch.Generator().manual_seed(0))
    silent = trainer.oracle_check(episode)  # an untrained predictor sends zeros
    assert silent["oracle_relative_mse"] == pytest.approx(1.0) and silent["oracle_cosine"] == 0.0
    truth = [g for _, _, g in true_future_gradients(trainer.model, episode, 2, task.loss)]
    trainer.synthetic = lambda k, end, next_input: truth[k]
    exact = trainer.oracle_check(episode)
    assert exact["oracle_relative_mse"] < 1e-10 and exact["oracle_cosine"] == pytest.approx(1.0)
    trainer.synthetic = lambda k, end, next_input: 2 * truth[k]  # right direction, twice too long
    double = trainer.oracle_check(episode)
    assert double["oracle_relative_mse"] == pytest.approx(1.0) and double["oracle_cosine"] == pytest.approx(1.0)


@pytest.mark.parametrize("target", ["bootstrap", "full_bptt"])
def test_predictor_target_is_bootstrapped_or_the_full_bptt_gradient(target):
    cfg = build_sequence_config({"task": {"name": "copy", "bits": 3}, "model": {"name": "gru", "hidden": 8},
                                 "method": {"name": "dni", "predictor_target": target}, "truncation": 2})
    torch.manual_seed(0)
    task = CopyTaskGenerator(cfg.task)
    trainer = SequenceTrainer(cfg, RecurrentModel("gru", task.input_size, 8, 1, task.output_size), task)
    episode = task.batch(8, 3, torch.Generator().manual_seed(0))
    truth = [g for _, _, g in true_future_gradients(trainer.model, episode, 2, task.loss)]
    for group in trainer.optimizer.param_groups:  # a fixed core: every target refers to the same parameters
        group["lr"] = 0.0
    seen = []
    trainer.train_predictor = lambda prev, goal: seen.append((prev.index, goal)) or {
        "mse": 0.0, "silent": 1.0, "cosine_sum": 0.0, "cosine_n": 0.0}
    trainer.train_episode(episode)
    assert [k for k, _ in seen] == list(range(len(truth))) and len(truth) >= 2
    exact = [torch.allclose(goal, truth[k], atol=1e-7) for k, goal in seen]
    # bootstrapped: a target lacks what crosses the next boundary (the untrained predictor sends zeros there),
    # except at the last boundary, where nothing follows the last segment
    assert exact == ([True] * len(truth) if target == "full_bptt" else [False] * (len(truth) - 1) + [True])


# ---------------------------------------------------------------- the predictor learns


def test_predictor_loss_falls_on_copy():
    """With the core frozen (stationary targets), the predictor's error falls well below that of sending nothing."""
    cfg = build_sequence_config({
        "task": {"name": "copy", "bits": 4},
        "model": {"name": "lstm", "hidden": 16},
        "method": {"name": "dni", "predictor_lr": 1e-2},
        "truncation": 2,
    })
    torch.manual_seed(0)
    task = CopyTaskGenerator(cfg.task)
    model = RecurrentModel("lstm", task.input_size, 16, 1, task.output_size)
    trainer = SequenceTrainer(cfg, model, task)
    for group in trainer.optimizer.param_groups:
        group["lr"] = 0.0
    g = torch.Generator().manual_seed(0)
    history = [trainer.train_episode(task.batch(32, 2, g)) for _ in range(100)]
    first = sum(h["predictor_relative_mse"] for h in history[:3]) / 3
    last = sum(h["predictor_relative_mse"] for h in history[-10:]) / 10
    assert first > 0.9  # starts silent: its loss is the target's mean square
    assert last < 0.7 * first, (first, last)
    assert sum(h["predictor_cosine"] for h in history[-10:]) / 10 > 0.6


def test_aux_head_trains_the_core_and_leaves_the_target_alone():
    cfg = build_sequence_config({"task": {"name": "copy", "bits": 3}, "model": {"name": "gru", "hidden": 8},
                                 "method": {"name": "dni", "aux_future_gradient": True}, "truncation": 2})
    torch.manual_seed(0)
    task = CopyTaskGenerator(cfg.task)
    model = RecurrentModel("gru", task.input_size, 8, 1, task.output_size)
    trainer = SequenceTrainer(cfg, model, task)
    with torch.no_grad():
        trainer.predictor.net[-1].bias.fill_(1.0)  # a nonzero synthetic gradient to predict
    episode = task.batch(4, 3, torch.Generator().manual_seed(0))
    with_aux = list(segments(model, episode, 2, task.loss, trainer.synthetic, aux_head=trainer.aux_head))
    core = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    trainer.aux_head.zero_grad()
    without = list(segments(model, episode, 2, task.loss, trainer.synthetic))
    for a, b in zip(with_aux, without):
        if b.target is not None:
            assert torch.allclose(a.target, b.target)
    assert all(s.aux_loss > 0 for s in with_aux)
    assert not all(torch.allclose(a, p.grad) for a, p in zip(core, model.parameters()))


# ----------------------------------------------------------------------------- tasks


def test_copy_targets_and_mask():
    task = CopyTaskGenerator(CopyTask(name="copy", bits=5))
    ep = task.batch(3, 4, torch.Generator().manual_seed(0))
    assert ep.x.shape == (3, 9, 6) and ep.y.shape == (3, 9, 5) and ep.mask.shape == (3, 9)
    assert torch.equal(ep.y[:, 5:], ep.x[:, :4, :5])  # the output phase writes the input vectors back
    assert torch.equal(ep.mask, torch.tensor([0.0] * 5 + [1.0] * 4).expand(3, 9))
    assert torch.equal(ep.x[:, :, 5], torch.tensor([0.0] * 4 + [1.0] + [0.0] * 4).expand(3, 9))  # delimiter
    assert ep.x[:, 5:].abs().sum() == 0 and ep.scored_steps == 4
    # the loss counts the output phase only: anything predicted during the input phase costs nothing
    logits = torch.where(ep.y > 0, 20.0, -20.0)
    noisy = logits.clone()
    noisy[:, :5] = torch.randn(3, 5, 5) * 10
    assert bits_loss(noisy, ep.y, ep.mask) == bits_loss(logits, ep.y, ep.mask) < 1e-6
    noisy[:, 6] = -logits[:, 6]
    assert bits_loss(noisy, ep.y, ep.mask) > 5


def test_repeat_copy_targets_and_mask():
    task = RepeatCopyTaskGenerator(RepeatCopyTask(name="repeat_copy", bits=3, repeats_min=1, repeats_max=3))
    ep = task.batch(16, 2, torch.Generator().manual_seed(0))
    for i in range(16):
        reps = round(float(ep.x[i, 2, 3]) * 3)
        assert 1 <= reps <= 3
        out = ep.y[i, 3:3 + reps * 2, :3]
        assert torch.equal(out, ep.x[i, :2, :3].repeat(reps, 1))
        assert ep.y[i, 3 + reps * 2, 3] == 1 and ep.y[i, :, 3].sum() == 1  # one end marker
        assert ep.mask[i].sum() == reps * 2 + 1 and ep.mask[i, 3:4 + reps * 2].all()


def test_curriculum_advances_below_threshold_only():
    cur = CurriculumState(Curriculum(start_length=2, max_length=3, threshold=0.15, window=3))
    # the mean of the last 3 batches first drops below 0.15 at the 6th
    losses = [0.1, 0.1, 0.3, 0.1, 0.1, 0.1]
    assert [cur.record(step, loss) for step, loss in enumerate(losses, 1)] == [False] * 5 + [True]
    assert (cur.length, cur.solved, cur.history) == (3, 2, [(0, 2), (6, 3)])
    assert not cur.record(7, 0.01) and not cur.record(8, 0.01)  # a fresh window at the new length
    assert cur.record(9, 0.01) and cur.done and (cur.length, cur.solved) == (3, 3)


def test_text_corpus_is_deterministic_and_scored_per_character(tmp_path):
    from decoupled.recurrent.config import TextTask
    from decoupled.recurrent.tasks import TextTaskGenerator, stdlib_docstrings
    from decoupled.recurrent.tbptt import run

    text = stdlib_docstrings.__wrapped__(20_000)  # uncached: built afresh
    assert len(text) == 20_000 and text == stdlib_docstrings(20_000)
    assert all(c == "\n" or " " <= c <= "~" for c in text)
    task = TextTaskGenerator(TextTask(name="text", max_chars=20_000, sequence_length=20, eval_chars=200))
    assert task.info["chars"] == 20_000 and task.info["train_chars"] == 18_000 and len(task.info["sha256"]) == 64
    ep = task.batch(3, None, torch.Generator().manual_seed(0))
    assert ep.x.shape == (3, 20, len(task.vocab)) and ep.scored_steps == 20
    assert torch.equal(ep.x[:, 1:].argmax(-1), ep.y[:, :-1])  # the target is the next input
    val = task.validation(4)
    assert sum(e.x.shape[0] for e in val) == 10 and torch.equal(val[0].y[0], task.val_ids[1:21])
    lm = {"name": "text", "max_chars": 20_000, "sequence_length": 20, "eval_chars": 200}
    summary = run({"name": "lm", "task": lm,
                   "model": {"name": "gru", "hidden": 8}, "method": {"name": "dni"}, "truncation": 5,
                   "train": {"steps": 2, "batch_size": 4, "eval_every": 1, "progress": False},
                   "output": {"dir": str(tmp_path), "tensorboard": False}})
    assert summary["corpus"]["sha256"] == task.info["sha256"] and len(summary["eval_history"]) == 2
    assert 0 < summary["best_val_bits_per_char"] <= summary["eval_history"][0][1]


# ---------------------------------------------------------------------------- config

BASE = {"name": "t", "task": {"name": "copy"}, "train": {"progress": False}}

BAD = [
    (["truncation=0"], "truncation"),
    (["task.curriculum.start_length=9", "task.curriculum.max_length=4"],
     "task.curriculum.start_length: 9 is above max_length 4"),
    (["task.bits=0"], "task.bits"),
    (["colour=blue"], "colour: unknown key"),
    (["task.curriculum.lenght=3"], "task.curriculum.lenght: unknown key"),
    (["method.name=dni", "method.predictor=conv"], "method.predictor"),
    (["method.name=tbptt", "method.predictor_lr=0.1"], "method.predictor_lr: unknown key"),
    (["method.name=dni", "method.sg_scale=0"], "method.sg_scale"),
    (["task.name=repeat_copy", "task.repeats_min=5", "task.repeats_max=2"],
     "task.repeats_min: 5 is above repeats_max 2"),
    (["task.name=text", "task.sequence_length=1"], "task.sequence_length"),
    (["task.name=text", "task.eval_chars=50"], "task.eval_chars: 50 is less than one sequence (100)"),
    (["task.name=sort"], "task: unknown task 'sort'; expected one of: 'copy', 'repeat_copy', 'text'"),
    (["model.name=transformer"], "model.name"),
    (["train.batch_size=0"], "train.batch_size"),
]


@pytest.mark.parametrize("overrides,message", BAD)
def test_bad_configs_are_refused_naming_the_field(overrides, message):
    with pytest.raises(ConfigError) as err:
        build_sequence_config(BASE, overrides)
    assert message in str(err.value)


def test_shipped_configs_are_valid():
    from decoupled.recurrent.config import load_sequence_config

    paths = sorted(Path(__file__).parent.parent.glob("configs/recurrent/*.yaml"))
    assert {p.stem for p in paths} >= {"copy", "repeat_copy", "text"}
    for path in paths:
        load_sequence_config(path)


# ------------------------------------------------------------------------------- CLI


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_sequence_run_through_the_cli_writes_its_summary(tmp_path, capsys):
    path = tmp_path / "copy.yaml"
    path.write_text(yaml.safe_dump({
        "name": "cli", "task": {"name": "copy", "bits": 3, "curriculum": {"start_length": 2, "max_length": 4}},
        "model": {"name": "lstm", "hidden": 8}, "method": {"name": "dni"}, "truncation": 2,
        "train": {"steps": 4, "batch_size": 4, "eval_every": 2, "log_every": 2, "progress": False},
        "output": {"dir": str(tmp_path / "runs")},
    }))
    assert cli_run(_parse(["sequence", "--config", str(path), "method.aux_future_gradient=true",
                           "train.oracle_every=2"])) == 0
    printed = json.loads(capsys.readouterr().out)
    summary = json.loads((tmp_path / "runs" / "cli" / "summary.json").read_text())
    assert printed["run_dir"] == summary["run_dir"] and summary["method"] == "dni+aux" and summary["steps"] == 4
    assert summary["curriculum"]["length"] == 2 and len(summary["eval_history"]) == 2
    assert set(summary["last_oracle_check"]) == {"oracle_relative_mse", "oracle_cosine"}
    assert list((tmp_path / "runs" / "cli" / "tensorboard").glob("events.out.tfevents.*"))
    assert cli_run(_parse(["sequence", "--config", str(path), "truncation=0"])) == 2
    assert "truncation" in capsys.readouterr().err


def test_compare_grid_writes_table_and_plot(tmp_path):
    from decoupled.recurrent.compare import compare

    cfg = {"name": "grid", "task": {"name": "copy", "bits": 2, "curriculum": {"max_length": 3, "window": 2}},
           "model": {"name": "gru", "hidden": 4},
           "train": {"steps": 2, "batch_size": 2, "eval_every": 2, "progress": False},
           "output": {"dir": str(tmp_path), "tensorboard": False}}
    result = compare(cfg, [1, 2], ["tbptt", "dni+aux"], parent=tmp_path / "grid")
    assert [(r["method"], r["truncation"]) for r in result["runs"]] == [
        ("tbptt", 1), ("dni+aux", 1), ("tbptt", 2), ("dni+aux", 2)]
    md = (tmp_path / "grid" / "comparison.md").read_text()
    assert "| method | T = 1 | T = 2 |" in md
    final = {(r["method"], r["truncation"]): r["final_eval_bits_per_step"] for r in result["runs"]}
    assert f"| tbptt | {final['tbptt', 1]:.2f} (1) | {final['tbptt', 2]:.2f} (1) |" in md  # loss at the last length
    assert (tmp_path / "grid" / "comparison.png").stat().st_size > 0
    assert json.loads((tmp_path / "grid" / "comparison.json").read_text())["methods"] == ["tbptt", "dni+aux"]
    with pytest.raises(ConfigError, match="--methods: unknown method 'bptt'"):
        compare(cfg, [2], ["bptt"], parent=tmp_path / "bad")


def test_compare_in_parallel_processes_gives_the_serial_results(tmp_path):
    from decoupled.recurrent.compare import compare

    cfg = {"name": "par", "task": {"name": "copy", "bits": 2, "curriculum": {"max_length": 3, "window": 2}},
           "model": {"name": "gru", "hidden": 4},
           "train": {"steps": 6, "batch_size": 4, "eval_every": 3, "progress": False, "threads": 1},
           "output": {"dir": str(tmp_path), "tensorboard": False}}
    serial = compare(cfg, [1, 2], ["tbptt", "dni"], parent=tmp_path / "serial")
    parallel = compare(cfg, [1, 2], ["tbptt", "dni"], parent=tmp_path / "parallel", jobs=2)

    def figures(result):  # everything but where and how fast each run went
        return [(r["method"], r["truncation"], r["eval_history"], r["last_train_metrics"]) for r in result["runs"]]

    assert figures(parallel) == figures(serial)
    assert all(Path(r["run_dir"]).parent == tmp_path / "parallel" for r in parallel["runs"])
    with pytest.raises(ConfigError, match="--jobs"):
        compare(cfg, [2], ["tbptt"], parent=tmp_path / "bad", jobs=0)


def test_terminating_a_parallel_compare_ends_its_workers(tmp_path):
    """TERM to the command alone (as a scheduler sends it) must not leave its worker processes training on."""

    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump({
        "name": "long", "task": {"name": "copy", "bits": 2, "curriculum": {"max_length": 64}},
        "model": {"name": "gru", "hidden": 4}, "train": {"steps": 10**6, "batch_size": 2, "progress": False},
        "output": {"dir": str(tmp_path / "runs"), "tensorboard": False},
    }))
    proc = subprocess.Popen([sys.executable, "-m", "decoupled", "sequence-compare", "--config", str(path),
                             "--truncations", "1,2", "--methods", "tbptt", "--jobs", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: set[int] = set()
    try:
        deadline = time.time() + 120
        while len(workers := _descendants(proc.pid)) < 2 and time.time() < deadline:  # the pool (and its tracker)
            time.sleep(0.2)
        assert len(workers) >= 2, "the worker processes did not start"
        time.sleep(1.0)
        proc.terminate()
        assert proc.wait(timeout=60) != 0
        assert_all_exit(workers, "TERM to sequence-compare --jobs 2")
    finally:  # on a failure, end what this test started
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in workers:
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
