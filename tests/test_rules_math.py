"""The learning rules against references computed independently (autograd or by hand).

Stages run on ``DECOUPLED_TEST_DEVICE`` (default cpu; the GPU check sets cuda); the
references are computed on the CPU in float32.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from decoupled.config import (
    BackpropMethod,
    DFAMethod,
    DGLMethod,
    DNIMethod,
    FAMethod,
    OptimizerConfig,
    SignSymmetricMethod,
)
from decoupled.rules import Feedback, build_rule
from decoupled.rules.dni import GradientPredictor, PredictorTrainer
from decoupled.rules.feedback import input_gradient
from decoupled.runtime.inprocess import train_batch
from decoupled.stage import Stage

DEVICE = torch.device(os.environ.get("DECOUPLED_TEST_DEVICE", "cpu"))
torch.backends.cudnn.allow_tf32 = False  # exact float32 on GPUs too: these tests compare to 1e-6
LR = 0.1
PLAIN_SGD = OptimizerConfig(name="sgd", lr=LR, momentum=0.0, weight_decay=0.0, schedule="constant")


def make_stages(method, modules: list[nn.Module], shapes: list[tuple[int, ...]], num_classes: int = 3) -> list[Stage]:
    """Stages around deep copies of ``modules``; ``shapes[k]`` is stage k's input shape."""
    return [
        Stage(
            k,
            len(modules),
            copy.deepcopy(m),
            build_rule(method),
            PLAIN_SGD,
            input_shape=shapes[k],
            output_shape=shapes[k + 1],
            num_classes=num_classes,
            total_steps=1,
            device=DEVICE,
        )
        for k, m in enumerate(modules)
    ]


def three_layer_net() -> tuple[list[nn.Module], list[tuple[int, ...]]]:
    torch.manual_seed(0)
    modules = [
        nn.Sequential(nn.Linear(4, 6), nn.Tanh()),
        nn.Sequential(nn.Linear(6, 5), nn.Tanh()),
        nn.Sequential(nn.Linear(5, 3)),
    ]
    return modules, [(4,), (6,), (5,), (3,)]


def batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def backprop_reference(modules: list[nn.Module], x, y) -> list[list[torch.Tensor]]:
    """Parameters after one plain SGD step of ordinary, unsplit backprop."""
    model = copy.deepcopy(nn.Sequential(*modules))
    F.cross_entropy(model(x), y).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= LR * p.grad
    return [[p.detach().clone() for p in m.parameters()] for m in model]


def stage_params(stages: list[Stage]) -> list[list[torch.Tensor]]:
    return [[p.detach().cpu().clone() for p in s.module.parameters()] for s in stages]


def assert_params_close(actual, expected, atol=1e-6):
    for k, (a_stage, e_stage) in enumerate(zip(actual, expected)):
        for a, e in zip(a_stage, e_stage):
            torch.testing.assert_close(a, e, atol=atol, rtol=1e-5, msg=f"stage {k}")


class ExactGradient(nn.Module):
    """A 'predictor' that returns the true per-sample gradient: backprop through frozen copies of later stages."""

    def __init__(self, downstream: list[nn.Module]):
        super().__init__()
        self.downstream = nn.Sequential(*copy.deepcopy(downstream)).to(DEVICE)

    def forward(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            h = h.detach().requires_grad_(True)
            loss = F.cross_entropy(self.downstream(h), y)
            (grad,) = torch.autograd.grad(loss, h)
        return grad * h.shape[0]  # predictors speak per-sample units


def test_backprop_across_stages_equals_unsplit_backprop():
    modules, shapes = three_layer_net()
    x, y = batch()
    stages = make_stages(BackpropMethod(name="backprop"), modules, shapes)
    train_batch(stages, x, y)
    assert_params_close(stage_params(stages), backprop_reference(modules, x, y))


@pytest.mark.parametrize("conditioned", [False, True])
def test_dni_with_exact_predictor_reproduces_backprop_updates(conditioned):
    modules, shapes = three_layer_net()
    x, y = batch()
    stages = make_stages(DNIMethod(name="dni", conditioned=conditioned), modules, shapes)
    for k, stage in enumerate(stages[:-1]):
        stage.rule.extra["predictor"] = ExactGradient(modules[k + 1 :])
    train_batch(stages, x, y)
    assert_params_close(stage_params(stages), backprop_reference(modules, x, y))


def test_dni_untrained_predictor_sends_zero_gradient():
    predictor = GradientPredictor((5,), 3, conditioned=True, hidden=8, layers=2, kernel_size=3)
    conv = GradientPredictor((4, 6, 6), 3, conditioned=True, hidden=8, layers=2, kernel_size=3)
    y = torch.tensor([0, 1])
    assert torch.count_nonzero(predictor(torch.randn(2, 5), y)) == 0
    assert torch.count_nonzero(conv(torch.randn(2, 4, 6, 6), y)) == 0


@pytest.mark.parametrize("conditioned", [False, True])
@pytest.mark.parametrize("shape", [(6,), (4, 6, 6)])
def test_predictor_loss_falls_on_a_fixed_stage(conditioned, shape):
    torch.manual_seed(0)
    downstream = nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(shape).prod()), 8), nn.Tanh(), nn.Linear(8, 3))
    predictor = GradientPredictor(shape, 3, conditioned, hidden=32, layers=2, kernel_size=3)
    trainer = PredictorTrainer(predictor, lr=1e-3)
    h = torch.randn(64, *shape)
    y = torch.randint(0, 3, (64,))
    h_leaf = h.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(downstream(h_leaf), y), h_leaf)
    losses = [float(trainer.update(h, y, grad)["predictor_mse"]) for _ in range(300)]
    assert losses[-1] < 0.3 * losses[0]
    assert float(trainer.update(h, y, grad)["predictor_cosine"]) > 0.8


def test_dni_predictors_learn_from_the_next_stage_bootstrapped():
    modules, shapes = three_layer_net()
    stages = make_stages(DNIMethod(name="dni"), modules, shapes)

    def predictor_params(k):
        return [p.detach().clone() for p in stages[k].rule.extra["predictor"].parameters()]

    def changed(old, new):
        return any(not torch.equal(a, b) for a, b in zip(old, new))

    start = [predictor_params(0), predictor_params(1)]
    train_batch(stages, *batch())
    # Predictor 1 learns from the true loss at once; predictor 0's target comes through
    # predictor 1, still zero after its first update: nothing to learn from yet.
    assert changed(start[1], predictor_params(1))
    assert not changed(start[0], predictor_params(0))
    train_batch(stages, *batch())
    assert changed(start[0], predictor_params(0))
    assert "predictor_mse" in stages[0].metrics and "predictor_cosine" in stages[1].metrics
    assert not stages[0].rule._pending  # every forward's sample was consumed


def test_dgl_no_gradient_crosses_a_stage_boundary():
    modules, shapes = three_layer_net()
    x, y = batch()
    stages = make_stages(DGLMethod(name="dgl", aux_hidden=8), modules, shapes)
    assert stages[0].rule.feedback is Feedback.NONE
    # Hand stage 1 an input still attached to stage 0's graph: its update must not reach stage 0.
    h0 = stages[0].module(x.to(DEVICE))
    result = stages[1].step(h0, y)
    assert all(p.grad is None for p in stages[0].module.parameters())
    assert result.feedback is None


def test_dgl_stage_update_depends_only_on_its_own_auxiliary_loss():
    modules, shapes = three_layer_net()
    x, y = batch()
    stages = make_stages(DGLMethod(name="dgl", aux_hidden=8), modules, shapes)
    module, head = copy.deepcopy(stages[1].module), copy.deepcopy(stages[1].rule.extra["aux_head"])
    h0 = stages[0].module(x.to(DEVICE)).detach()  # stage 1's input, before stage 0 updates
    train_batch(stages, x, y)
    F.cross_entropy(head(module(h0)), y.to(DEVICE)).backward()
    with torch.no_grad():
        expected = [p - LR * p.grad for p in module.parameters()]
    assert_params_close(stage_params(stages[1:2]), [[p.cpu() for p in expected]])


def tanh_prime(a: torch.Tensor) -> torch.Tensor:
    return 1 - a**2


def output_error(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """dL/dlogits of the batch-mean cross-entropy."""
    return (F.softmax(logits, 1) - F.one_hot(y, logits.shape[1]).to(logits.dtype)) / len(y)


def two_layer_net():
    torch.manual_seed(0)
    modules = [nn.Sequential(nn.Linear(4, 5), nn.Tanh()), nn.Sequential(nn.Linear(5, 3))]
    return modules, [(4,), (5,), (3,)]


@pytest.mark.parametrize("method", [FAMethod(name="fa"), SignSymmetricMethod(name="sign_symmetric")])
def test_feedback_alignment_updates_match_hand_formula(method):
    modules, shapes = two_layer_net()
    x, y = batch()
    stages = make_stages(method, modules, shapes)
    (W1, b1), (W2, b2) = stage_params(stages)
    R = stages[1].rule.extra["feedback"].get_buffer("0").cpu()
    B2 = R if method.name == "fa" else R.abs() * torch.sign(W2)
    assert not torch.allclose(B2, W2)  # otherwise this would not tell FA from backprop

    # Survey eq. 22 with W2 -> B2, written out: a1 = tanh(x W1^T + b1), logits = a1 W2^T + b2.
    a1 = torch.tanh(x @ W1.T + b1)
    e = output_error(a1 @ W2.T + b2, y)
    delta1 = (e @ B2) * tanh_prime(a1)
    expected = [[W1 - LR * delta1.T @ x, b1 - LR * delta1.sum(0)], [W2 - LR * e.T @ a1, b2 - LR * e.sum(0)]]

    train_batch(stages, x, y)
    assert_params_close(stage_params(stages), expected)


def test_sign_symmetric_feedback_follows_the_current_weight_signs():
    """Flip W after set-up: the gradient sent upstream must use the new signs, not those seen at attach time."""
    modules, shapes = two_layer_net()
    stage = make_stages(SignSymmetricMethod(name="sign_symmetric"), modules, shapes)[1]
    with torch.no_grad():
        stage.module[0].weight.neg_()
    W, b = [p.detach().cpu().clone() for p in stage.module.parameters()]
    magnitudes = stage.rule.extra["feedback"].get_buffer("0").cpu()
    h, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    grad = stage.step(h, y).feedback.cpu()
    e = output_error(h @ W.T + b, y)
    torch.testing.assert_close(grad, e @ (magnitudes * torch.sign(W)))


def test_direct_feedback_alignment_updates_match_hand_formula():
    modules, shapes = three_layer_net()
    x, y = batch()
    stages = make_stages(DFAMethod(name="dfa"), modules, shapes)
    (W0, b0), (W1, b1), (W2, b2) = stage_params(stages)
    C0 = stages[0].rule.extra["projection"].matrix.cpu()
    C1 = stages[1].rule.extra["projection"].matrix.cpu()

    # Survey eq. 23: each stage gets the output error through its own fixed matrix.
    a0 = torch.tanh(x @ W0.T + b0)
    a1 = torch.tanh(a0 @ W1.T + b1)
    e = output_error(a1 @ W2.T + b2, y)
    d0 = (e @ C0) * tanh_prime(a0)
    d1 = (e @ C1) * tanh_prime(a1)
    expected = [
        [W0 - LR * d0.T @ x, b0 - LR * d0.sum(0)],
        [W1 - LR * d1.T @ a0, b1 - LR * d1.sum(0)],
        [W2 - LR * e.T @ a1, b2 - LR * e.sum(0)],
    ]
    train_batch(stages, x, y)
    assert_params_close(stage_params(stages), expected)


def test_conv_feedback_gradient_is_the_transposed_convolution_with_the_feedback_weight():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    B = torch.randn_like(conv.weight)
    x = torch.randn(2, 3, 9, 9, requires_grad=True)
    out = F.conv2d(x, B, None, conv.stride, conv.padding)
    grad_out = torch.randn_like(out)
    (expected,) = torch.autograd.grad(out, x, grad_out)
    torch.testing.assert_close(input_gradient(conv, B, grad_out, x.shape), expected)


def test_feedback_alignment_conv_stage_passes_the_feedback_gradient_upstream():
    torch.manual_seed(0)
    modules = [nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU()), nn.Sequential(nn.Flatten(), nn.Linear(48, 3))]
    stages = make_stages(FAMethod(name="fa"), modules, [(2, 4, 4), (3, 4, 4), (3,)])
    x = torch.randn(5, 3, 4, 4)
    y = torch.randint(0, 3, (5,))
    grad = stages[1].step(x, y).feedback.cpu()
    B = stages[1].rule.extra["feedback"].get_buffer("1").cpu()
    e = output_error(modules[1](x).detach(), y)
    torch.testing.assert_close(grad, (e @ B).view_as(x))


def test_dfa_with_several_forwards_pending_uses_each_forwards_own_weights():
    """Two forwards before any error returns (a pipelined stage): each update is that of its own forward."""
    modules, shapes = two_layer_net()
    x1, y1 = batch()
    x2, y2 = x1.flip(0) * 0.5, y1.flip(0)
    stage = make_stages(DFAMethod(name="dfa"), modules, shapes)[0]
    W0, b0 = [p.detach().cpu().clone() for p in stage.module.parameters()]
    C = stage.rule.extra["projection"].matrix.cpu()
    e1, e2 = torch.randn(8, 3) / 8, torch.randn(8, 3) / 8
    stage.step(x1, y1)
    stage.step(x2, y2)  # before the first error: both forwards use W0
    stage.apply(e1)
    stage.apply(e2)
    a1, a2 = torch.tanh(x1 @ W0.T + b0), torch.tanh(x2 @ W0.T + b0)
    d1, d2 = (e1 @ C) * tanh_prime(a1), (e2 @ C) * tanh_prime(a2)
    W_expected = W0 - LR * d1.T @ x1 - LR * d2.T @ x2  # plain SGD: the two updates add up
    b_expected = b0 - LR * d1.sum(0) - LR * d2.sum(0)
    assert_params_close(stage_params([stage]), [[W_expected, b_expected]])


def test_cosine_schedule_steps_once_per_update():
    modules, shapes = three_layer_net()
    cfg = OptimizerConfig(name="sgd", lr=0.1, momentum=0.0, weight_decay=0.0, schedule="cosine")
    stages = [
        Stage(k, 3, copy.deepcopy(m), build_rule(BackpropMethod(name="backprop")), cfg, input_shape=shapes[k],
              output_shape=shapes[k + 1], num_classes=3, total_steps=8, device=DEVICE)
        for k, m in enumerate(modules)
    ]
    for _ in range(4):
        train_batch(stages, *batch())
    for stage in stages:  # half-way through an 8-step cosine: lr = 0.1 * (1 + cos(pi/2)) / 2
        assert stage.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
