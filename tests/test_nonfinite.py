"""train.on_nonfinite: a NaN or inf loss, activation or gradient is caught at the step it appears.

``stop`` raises NonFiniteError naming the stage and its step; ``skip_batch`` leaves every
parameter, buffer and optimizer state as it was before the batch, counts the batch once
on each stage that skipped it, and training goes on.
"""

from __future__ import annotations

import copy
import math
import os
import pickle
import re

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import decoupled
from decoupled.config import (
    BackpropMethod,
    DFAMethod,
    DGLMethod,
    DNIMethod,
    FAMethod,
    OptimizerConfig,
    build_config,
)
from decoupled.data import load_dataset
from decoupled.pipeline import build_stages
from decoupled.rules import build_rule
from decoupled.runtime.inprocess import train_batch
from decoupled.stage import NonFiniteError, Stage
from decoupled.train import prepare

METHODS = {
    "backprop": BackpropMethod(name="backprop"),
    "dgl": DGLMethod(name="dgl", aux_hidden=8),
    "dni": DNIMethod(name="dni", predictor_hidden=8),
    "cdni": DNIMethod(name="dni", conditioned=True, predictor_hidden=8),
    "dfa": DFAMethod(name="dfa"),
    "fa": FAMethod(name="fa"),
}
# momentum, weight decay and a schedule: a skipped batch must leave their state untouched too
OPTIMIZER = OptimizerConfig(name="sgd", lr=0.05, momentum=0.9, weight_decay=1e-4, schedule="cosine")
NAN_STEP = 3
DEVICE = os.environ.get("DECOUPLED_TEST_DEVICE", "cpu")  # the GPU check sets cuda


def make_stages(method, policy: str) -> list[Stage]:
    """Three stages of a small MLP; stage 0 has BatchNorm, whose statistics a NaN batch would poison."""
    torch.manual_seed(0)
    modules = [
        nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU()),
        nn.Sequential(nn.Linear(16, 12), nn.Tanh()),
        nn.Sequential(nn.Linear(12, 4)),
    ]
    shapes = [(8,), (16,), (12,), (4,)]
    return [
        Stage(k, 3, m, build_rule(method), OPTIMIZER, input_shape=shapes[k], output_shape=shapes[k + 1],
              num_classes=4, total_steps=20, seed=0, device=DEVICE, on_nonfinite=policy)
        for k, m in enumerate(modules)
    ]


def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(n)]


def with_nan(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[5, 2] = float("nan")
    return x


def state(stage: Stage) -> dict:
    """Everything a batch could change (the step counters aside)."""
    s = stage.state_dict()
    return copy.deepcopy({k: s[k] for k in ("module", "optimizer", "scheduler", "rule")})


def flat(obj, prefix: str = "") -> dict:
    """Nested state as {path: value}, tensors cloned to float for comparison."""
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in flat(val, f"{prefix}/{key}").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, val in enumerate(obj) for k, v in flat(val, f"{prefix}/{i}").items()}
    return {prefix: obj}


def assert_same(a: dict, b: dict) -> None:
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for key in fa:
        if isinstance(fa[key], torch.Tensor):
            assert torch.equal(fa[key], fb[key]), key
        else:
            assert fa[key] == fb[key], key


def module_params(stage: Stage) -> list[torch.Tensor]:
    return [p.detach().clone() for p in stage.module.parameters()]


@pytest.mark.parametrize("name", list(METHODS))
def test_nan_input_stops_naming_stage_0_and_its_step(name):
    stages = make_stages(METHODS[name], "stop")
    data = batches(NAN_STEP + 1)
    for x, y in data[:NAN_STEP]:
        train_batch(stages, x, y)
    x, y = data[NAN_STEP]
    with pytest.raises(NonFiniteError) as info:
        train_batch(stages, with_nan(x), y)
    err = info.value
    assert (err.stage, err.step, err.what) == (0, NAN_STEP, "activation")
    assert str(err) == f"stage 0, step {NAN_STEP}: non-finite activation (train.on_nonfinite: stop)"
    # caught where it appeared: no later stage has run this batch
    assert [s.steps for s in stages] == [NAN_STEP, NAN_STEP, NAN_STEP]


@pytest.mark.parametrize("name", list(METHODS))
def test_nan_input_under_skip_batch_changes_nothing_and_training_goes_on(name):
    stages = make_stages(METHODS[name], "skip_batch")
    data = batches(NAN_STEP + 2)
    for x, y in data[:NAN_STEP]:
        train_batch(stages, x, y)
    before = [state(s) for s in stages]
    params_before = [module_params(s) for s in stages]
    x, y = data[NAN_STEP]
    train_batch(stages, with_nan(x), y)
    for s, b in zip(stages, before):
        assert_same(state(s), b)  # module (BatchNorm statistics included), rule extras, optimizer, schedule
    # every stage saw the NaN (stage 0's output carries it on) and counted the batch once
    assert [s.skipped_batches for s in stages] == [1, 1, 1]
    assert [s.metrics["skipped_batches"] for s in stages] == [1.0, 1.0, 1.0]
    assert [s.steps for s in stages] == [NAN_STEP + 1] * 3
    assert math.isfinite(float(stages[-1].metrics["loss"]))  # the logged loss stays the last finite one

    train_batch(stages, *data[NAN_STEP + 1])  # a clean batch trains as usual
    assert [s.skipped_batches for s in stages] == [1, 1, 1]
    for s, old in zip(stages, params_before):
        new = module_params(s)
        assert any(not torch.equal(a, b) for a, b in zip(new, old)), f"stage {s.index} did not train"
        assert all(torch.isfinite(t).all() for t in flat(state(s)).values() if isinstance(t, torch.Tensor))

    # a skipped batch is as if never seen: the same run without it ends with the same state
    reference = make_stages(METHODS[name], "skip_batch")
    for x, y in data[:NAN_STEP] + data[NAN_STEP + 1:]:
        train_batch(reference, x, y)
    for s, r in zip(stages, reference):
        assert_same(state(s), state(r))


@pytest.mark.parametrize("name, what", [
    ("backprop", "gradient from stage 1"),
    ("fa", "gradient from stage 1"),
    ("dfa", "output error from stage 2"),
    ("dni", "gradient from stage 1 (predictor target)"),
    ("cdni", "gradient from stage 1 (predictor target)"),
])
def test_inf_in_the_gradient_arriving_at_stage_0_is_caught(name, what):
    x, y = batches(1)[0]
    signal_shape = (16, 4) if name == "dfa" else (16, 16)  # dfa gets the output error, the others dL/dh_0
    signal = torch.zeros(signal_shape)
    signal[3, 1] = float("inf")

    stage = make_stages(METHODS[name], "stop")[0]
    stage.step(x, y)
    with pytest.raises(NonFiniteError) as info:
        stage.apply(signal)
    assert (info.value.stage, info.value.step, info.value.what) == (0, 0, what)

    stage = make_stages(METHODS[name], "skip_batch")[0]
    stage.step(x, y)
    before = state(stage)  # after the forward (and, for dni, the local update): only apply's update is skipped
    stage.apply(signal)
    assert_same(state(stage), before)
    assert stage.skipped_batches == 1


def test_a_skipped_first_batch_still_leaves_a_loss_to_log():
    """Runtimes read the last stage's loss when logging: a run whose first batch is skipped has one."""
    stages = make_stages(METHODS["backprop"], "skip_batch")
    (x, y), clean = batches(2)
    train_batch(stages, with_nan(x), y)
    assert not math.isfinite(float(stages[-1].metrics["loss"]))
    train_batch(stages, *clean)
    assert math.isfinite(float(stages[-1].metrics["loss"]))
    assert [s.skipped_batches for s in stages] == [1, 1, 1]


def test_skipped_batches_travel_with_the_checkpoint():
    stages = make_stages(METHODS["dgl"], "skip_batch")
    x, y = batches(1)[0]
    train_batch(stages, with_nan(x), y)
    fresh = make_stages(METHODS["dgl"], "skip_batch")
    for s, f in zip(stages, fresh):
        f.load_state_dict(copy.deepcopy(s.state_dict()))
        assert (f.skipped_batches, f.metrics["skipped_batches"], f.steps) == (1, 1.0, 1)


def test_an_inf_parameter_gradient_is_named():
    stages = make_stages(METHODS["dgl"], "stop")
    weight = stages[1].module[0].weight
    weight.register_hook(lambda g: g * float("inf"))  # only this gradient is bad: activations and loss are finite
    x, y = batches(1)[0]
    with pytest.raises(NonFiniteError) as info:
        train_batch(stages, x, y)
    err = info.value
    assert (err.stage, err.step, err.what) == (1, 0, "gradient of module.0.weight")
    assert "stage 1, step 0: non-finite gradient of module.0.weight" in str(err)


def test_an_inf_predictor_gradient_is_skipped_without_touching_the_stage():
    """DNI's predictor learns in apply, from the gradient the next stage computed: checked like any update."""
    stages = make_stages(METHODS["dni"], "skip_batch")
    predictor = stages[0].rule.extra["predictor"]
    x, y = batches(1)[0]
    stages[0].step(x, y)
    before = copy.deepcopy(stages[0].rule.state_dict())
    hook = next(predictor.parameters()).register_hook(lambda g: g * float("inf"))
    stages[0].apply(torch.ones(16, 16))
    hook.remove()
    assert_same(stages[0].rule.state_dict(), before)  # predictor and its Adam state untouched
    assert stages[0].skipped_batches == 1


def test_nonfinite_error_survives_pickling():
    """A Ray actor raises it in another process: its fields must come through."""
    err = pickle.loads(pickle.dumps(NonFiniteError(2, 41, "gradient of module.0.weight")))
    assert (err.stage, err.step, err.what, err.policy) == (2, 41, "gradient of module.0.weight", "stop")
    assert str(err) == "stage 2, step 41: non-finite gradient of module.0.weight (train.on_nonfinite: stop)"


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="on_nonfinite"):
        make_stages(METHODS["dgl"], "ignore")


def test_build_stages_passes_the_policy_to_every_stage():
    cfg = build_config({"data": {"name": "synthetic", "shape": [8], "num_classes": 4, "train_size": 64,
                                 "test_size": 16},
                        "model": {"name": "mlp", "hidden": [16, 16]}, "split": {"stages": 3},
                        "method": {"name": "dgl"}, "train": {"on_nonfinite": "skip_batch"}})
    _, stages = build_stages(cfg, load_dataset(cfg.data, cfg.seed), torch.device("cpu"))
    assert [s.on_nonfinite for s in stages] == ["skip_batch"] * 3


def synthetic_run(tmp_path, method: str, **train) -> dict:
    return {
        "name": "nonfinite", "runtime": "inprocess",
        "data": {"name": "synthetic", "shape": [8], "num_classes": 4, "train_size": 256, "test_size": 64},
        "model": {"name": "mlp", "hidden": [16, 16]}, "split": {"stages": 3}, "method": {"name": method},
        "train": {"epochs": 2, "batch_size": 32, "threads": 1, "progress": False, "device": DEVICE, "log_every": 1,
                  **train},
        "output": {"dir": str(tmp_path / "runs")},
    }


def test_an_exploding_run_stops_naming_stage_and_step(tmp_path):
    cfg = {
        "name": "explode", "runtime": "inprocess", "data": {"name": "digits"},
        "model": {"name": "mlp", "hidden": [64, 64]}, "split": {"stages": 3}, "method": {"name": "backprop"},
        "optimizer": {"lr": 1e6},  # diverges within a few steps
        "train": {"epochs": 2, "batch_size": 32, "threads": 1, "progress": False, "device": DEVICE},
        "output": {"dir": str(tmp_path / "runs")},
    }
    with pytest.raises(NonFiniteError) as info:
        decoupled.train(cfg)
    err = info.value
    assert re.fullmatch(r"stage [0-2], step \d+: non-finite .+ \(train\.on_nonfinite: stop\)", str(err))
    assert 0 <= err.stage <= 2 and 0 <= err.step < 2 * (1437 // 32)


def test_a_nan_sample_under_skip_batch_is_skipped_once_per_epoch_and_logged(tmp_path):
    """Through decoupled.train: the policy reaches the stages, and skipped_batches reaches TensorBoard."""
    cfg, dataset = prepare(build_config(synthetic_run(tmp_path, "dgl", on_nonfinite="skip_batch")))
    dataset.train_x[17, 3] = float("nan")  # 256 / 32: no batch dropped, so each epoch meets it once
    summary = decoupled.train(cfg, dataset=dataset)
    assert math.isfinite(summary["final_loss"]) and summary["test_accuracy"] > 0.3  # chance: 0.25
    events = EventAccumulator(summary["run_dir"])
    events.Reload()
    for k in range(3):
        skipped = [e.value for e in events.Scalars(f"stage{k}/skipped_batches")]
        assert skipped[0] in (0.0, 1.0) and skipped[-1] == 2.0  # once in each of the two epochs

    cfg, dataset = prepare(build_config(synthetic_run(tmp_path, "dgl")))
    dataset.train_x[17, 3] = float("nan")
    with pytest.raises(NonFiniteError) as info:
        decoupled.train(cfg, dataset=dataset)
    assert info.value.stage == 0 and info.value.what == "activation" and info.value.step < 8  # in the first epoch
