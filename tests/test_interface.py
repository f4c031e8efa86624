"""The DNI update against its oracle (backprop) and the properties of the update (paper, section 2; docs/design.md)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dni.stages as stages
from dnilab.config import Config
from dni.stages import DNINet, backprop_step, dni_step, stage_update, synthesizer_update
from dnilab.models import MODELS, stage_shapes
from dni.synthesizers import ConvSynthesizer, DenseSynthesizer, make_synthesizer, synthesizer_loss
from dnilab.parts import build_net

IN_SHAPE = (1, 12, 12)
SIZES = {"mlp": dict(depth=3, hidden=16), "cnn": dict(depth=2, channels=4)}


def make_net(model_type, *, conditioned=False, synth_layers=1, kind="conv", dtype=torch.float64,
             synthesizers=None):
    torch.manual_seed(0)
    stages = MODELS[model_type](in_shape=IN_SHAPE, classes=10, **SIZES[model_type])
    if synthesizers is None:
        synthesizers = nn.ModuleList(
            make_synthesizer(s, kind=kind, context_features=10 if conditioned else 0, hidden_layers=synth_layers,
                             width=32, conv_width=8)
            for s in stage_shapes(stages, IN_SHAPE)[:-1])
    return DNINet(stages=stages, synthesizers=synthesizers, conditioned=conditioned).to(dtype)


def adams(modules, lr=1e-2):
    return [torch.optim.Adam(m.parameters(), lr=lr) for m in modules]


def batch(n=8, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *IN_SHAPE, generator=g, dtype=dtype), torch.randint(0, 10, (n,), generator=g)


def true_output_grads(net, x, y):
    """dL/dh_i for every stage output but the last, by full backprop on a copy of the net."""
    net = copy.deepcopy(net)
    outputs, h = [], x
    for stage in net.stages:
        h = stage(h)
        h.retain_grad()
        outputs.append(h)
    F.cross_entropy(h, y).backward()
    return [o.grad for o in outputs[:-1]]


class OracleSynthesizer(nn.Module):
    """Returns the true per-example gradient it is given; a zero parameter makes it trainable."""

    def __init__(self):
        super().__init__()
        self.offset = nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.target = None

    def forward(self, trigger, context=None):
        return self.target * len(trigger) + self.offset


@pytest.mark.parametrize("model_type", ["mlp", "cnn"])
def test_oracle_synthesizers_give_backprop_parameters(model_type):
    reference = make_net(model_type)
    oracles = nn.ModuleList(OracleSynthesizer() for _ in range(len(reference.stages) - 1))
    net = make_net(model_type, synthesizers=oracles)
    net.stages.load_state_dict(reference.stages.state_dict())
    ref_opts, opts, synth_opts = adams(reference.stages), adams(net.stages), adams(oracles)
    for t in range(3):  # several steps, so Adam's state must match too
        x, y = batch(seed=t)
        for oracle, grad in zip(oracles, true_output_grads(net, x, y)):
            oracle.target = grad
        dni_step(net, opts, synth_opts, x, y)
        backprop_step(reference, ref_opts, x, y)
    torch.testing.assert_close(net.stages.state_dict(), reference.stages.state_dict())


@pytest.mark.parametrize("model_type, kind", [("mlp", "dense"), ("cnn", "conv"), ("cnn", "dense")])
@pytest.mark.parametrize("conditioned", [False, True])
def test_first_synthetic_gradient_is_exactly_zero(model_type, kind, conditioned):
    net = make_net(model_type, conditioned=conditioned, kind=kind, dtype=torch.float32)
    x, y = batch(dtype=torch.float32)
    h = x
    for stage, synthesizer in zip(net.stages, net.synthesizers):
        h = stage(h)
        last = synthesizer.net[-1]
        assert torch.count_nonzero(last.weight) == 0 and torch.count_nonzero(last.bias) == 0
        g_hat = synthesizer(h.detach(), net.context(y))
        assert g_hat.shape == h.shape
        assert torch.count_nonzero(g_hat) == 0


@pytest.mark.parametrize("conditioned", [False, True])  # dense synthesizers, conv ones
def test_channels_last_cnn_steps_as_the_default_layout_does(conditioned):
    """build_net lays a CNN's weights out channels-last, for speed: the steps must not change
    (SGD, so that rounding differences stay rounding differences)."""
    config = Config(model_type="cnn", conditioned=conditioned, depth=2, channels=4, synth_width=32, synth_channels=8)
    net = build_net(config, IN_SHAPE, 10)
    plain = copy.deepcopy(net).to(memory_format=torch.contiguous_format)
    assert net.stages[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert plain.stages[0][0].weight.is_contiguous()
    sgd = lambda modules: [torch.optim.SGD(m.parameters(), lr=0.1) for m in modules]
    optimizers = [(sgd(n.stages), sgd(n.synthesizers)) for n in (net, plain)]
    for t in range(3):
        x, y = batch(seed=t, dtype=torch.float32)
        for n, (stage_opts, synth_opts) in zip((net, plain), optimizers):
            dni_step(n, stage_opts, synth_opts, x, y)
    torch.testing.assert_close(net.state_dict(), plain.state_dict(), rtol=1e-4, atol=1e-5)


def test_zero_synthetic_gradient_leaves_stages_unchanged():
    """At step 0 every synthetic gradient is zero: only the last stage (the loss) moves."""
    net = make_net("mlp")
    before = copy.deepcopy(net.stages)
    x, y = batch()
    dni_step(net, adams(net.stages), adams(net.synthesizers), x, y)
    for stage, old in zip(net.stages[:-1], before[:-1]):
        for p, q in zip(stage.parameters(), old.parameters()):
            assert torch.equal(p, q)
    assert not torch.equal(net.stages[-1][-1].weight, before[-1][-1].weight)


def test_synthesizer_loss_leaves_stage_gradients_untouched():
    net = make_net("mlp")
    with torch.no_grad():
        net.synthesizers[0].net[-1].weight.normal_()  # a non-zero synthetic gradient
    x, y = batch()
    opt = torch.optim.SGD(net.stages[0].parameters(), lr=0.0)  # keep .grad for inspection
    _, g_hat, _ = stage_update(net.stages[0], opt, net.synthesizers[0], x, net.context(y),
                               needs_input_grad=False)
    stage_grads = [p.grad.clone() for p in net.stages[0].parameters()]
    synth_opt = torch.optim.SGD(net.synthesizers[0].parameters(), lr=0.1)
    synthesizer_update(synth_opt, g_hat, torch.randn_like(g_hat))
    for p, g in zip(net.stages[0].parameters(), stage_grads):
        assert torch.equal(p.grad, g)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.synthesizers[0].parameters())


def test_synthesizer_target_is_next_stage_backward_of_its_synthetic_gradient(monkeypatch):
    """M_i learns from what stage i+1's backward makes of g_hat_{i+1}: not from full backprop."""
    net = make_net("mlp")
    with torch.no_grad():
        for synthesizer in net.synthesizers:
            synthesizer.net[-1].weight.normal_(std=0.1)
    x, y = batch()
    snapshot = copy.deepcopy(net)  # the parameters the step starts from
    targets = []
    real_update = stages.synthesizer_update
    monkeypatch.setattr(stages, "synthesizer_update",
                        lambda opt, g_hat, grad, **kw: targets.append(grad.clone()) or real_update(opt, g_hat, grad, **kw))
    dni_step(net, adams(net.stages), adams(net.synthesizers), x, y)

    h0 = snapshot.stages[0](x).detach().requires_grad_()
    h1 = snapshot.stages[1](h0)
    g_hat_1 = snapshot.synthesizers[1](h1.detach(), None)
    (expected,) = torch.autograd.grad(h1, h0, g_hat_1 / len(x))
    torch.testing.assert_close(targets[0], expected)
    full_backprop = true_output_grads(snapshot, x, y)[0]
    assert not torch.allclose(targets[0], full_backprop)


def test_stages_receive_detached_inputs():
    net = make_net("mlp")
    seen = []
    for stage in net.stages[1:]:
        stage.register_forward_pre_hook(lambda m, args: seen.append(args[0].grad_fn))
    x, y = batch()
    dni_step(net, adams(net.stages), adams(net.synthesizers), x, y)
    assert seen == [None] * (len(net.stages) - 1)


def test_synthesizer_loss_is_mean_squared_error():
    g_hat, target = torch.zeros(4, 3), torch.ones(4, 3) * 2
    assert synthesizer_loss(g_hat, target).item() == pytest.approx(4.0)


@pytest.mark.parametrize("synthesizer, trigger", [
    (DenseSynthesizer(features=6, context_features=10, hidden_layers=1, width=32), torch.randn(64, 6)),
    (ConvSynthesizer(shape=(3, 5, 5), context_features=10, hidden_layers=1, width=8), torch.randn(64, 3, 5, 5)),
    (DenseSynthesizer(features=75, context_features=10, hidden_layers=1, width=32), torch.randn(64, 3, 5, 5)),
])
def test_conditioned_synthesizer_learns_a_fixed_target(synthesizer, trigger):
    torch.manual_seed(0)
    context = F.one_hot(torch.arange(64) % 10, 10).float()
    label_signal = context.argmax(1).float().view(-1, *[1] * (trigger.dim() - 1)) / 10
    target = 0.5 * trigger + label_signal  # depends on trigger and label
    opt = torch.optim.Adam(synthesizer.parameters(), lr=1e-2)
    losses = []
    for _ in range(200):
        loss = synthesizer_loss(synthesizer(trigger, context), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10
    synthesizer.eval()
    other = F.one_hot((torch.arange(64) + 3) % 10, 10).float()
    assert not torch.allclose(synthesizer(trigger, context), synthesizer(trigger, other))


def test_label_map_fits_the_label_part_of_a_gradient_exactly():
    """Below a linear classifier the gradient is W^T (p - y): its -W^T y part, linear in the label, is
    what a cDNI dense synthesizer's label map is for; here the target is that part alone."""
    torch.manual_seed(0)
    W = torch.randn(10, 6)
    trigger, context = torch.randn(256, 6), F.one_hot(torch.arange(256) % 10, 10).float()
    target = -context @ W                                                     # (B, 6)
    synthesizer = DenseSynthesizer(features=6, context_features=10, hidden_layers=1, width=32)
    opt = torch.optim.Adam(synthesizer.parameters(), lr=1e-2)
    for _ in range(300):
        loss = synthesizer_loss(synthesizer(trigger, context), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 1e-3 * target.pow(2).mean().item()
    for tensor in (synthesizer.net[-1].weight, synthesizer.net[-1].bias):    # the map is a path of its own
        torch.nn.init.zeros_(tensor)
    torch.testing.assert_close(synthesizer(trigger, context), synthesizer.context_map(context))
    assert DenseSynthesizer(features=6, context_features=10, label_map=False).context_map is None


def test_dni_training_teaches_synthesizers():
    """Over a few steps on a fixed batch the synthesizers' loss falls and their guesses align."""
    net = make_net("mlp", dtype=torch.float32)
    opts, synth_opts = adams(net.stages, 1e-3), adams(net.synthesizers, 1e-3)
    x, y = batch(n=64, dtype=torch.float32)
    stats = [dni_step(net, opts, synth_opts, x, y) for _ in range(100)]
    for i in range(len(net.synthesizers)):
        assert sum(s.sg_cos[i] for s in stats[-10:]) / 10 > 0.3  # 0 at step 0
    assert stats[-1].loss < 0.9 * stats[0].loss


def test_linear_synthesizer_predicts_zero_at_the_classifiers_optimum():
    """Why plain DNI on the FCN has a hidden layer in its synthesizers by default (dnilab.presets):
    regressing the top stage's true gradients W^T (p - y) on [h, 1] gives exactly zero once the
    linear classifier on h is at its optimum (that regression's normal equations are the
    classifier's gradient). A synthesizer with a hidden layer still fits part of them."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(512, 6, generator=g, dtype=torch.float64)
    y = (h[:, 0] + 2 * h[:, 1] * h[:, 2] > 0).long()  # partly beyond a linear classifier's reach
    classifier = nn.Linear(6, 2).double()
    optimizer = torch.optim.LBFGS(classifier.parameters(), max_iter=1000, tolerance_grad=1e-12,
                                  tolerance_change=0, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(classifier(h), y)
        loss.backward()
        return loss
    optimizer.step(closure)
    trigger = h.clone().requires_grad_()
    (target,) = torch.autograd.grad(F.cross_entropy(classifier(trigger), y, reduction="sum"), trigger)  # (512, 6)
    assert target.abs().mean() > 0.05  # the classifier has not fitted the labels: gradients remain

    design = torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype)], dim=1)
    linear_fit = torch.linalg.lstsq(design, target).solution  # the best linear synthesizer
    assert linear_fit.abs().max() < 1e-6

    torch.manual_seed(0)
    synthesizer = DenseSynthesizer(features=6, hidden_layers=1, width=64).double()
    optimizer = torch.optim.Adam(synthesizer.parameters(), lr=1e-2)
    for _ in range(300):
        loss = synthesizer_loss(synthesizer(h), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss < 0.5 * target.pow(2).mean()
