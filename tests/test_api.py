"""The public API: the drop-in `dni.DNI` and the stage-wise `dni.dni_step` rest on one
update, and both pass the oracle test on an MLP, a CNN, a ResNet and a Transformer block."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dni

B, T, D = 6, 5, 8  # batch; sequence length and width of the Transformer


# ---------------------------------------------------------------- models, as lists of stages

class Residual(nn.Module):
    """A ResNet basic block (He et al. 2016), in-place ReLUs and all."""

    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.down = None if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x if self.down is None else self.down(x)
        return self.relu(out)


class MeanOverTime(nn.Module):
    def forward(self, h):
        return h.mean(1)


def transformer_layer():
    return nn.TransformerEncoderLayer(d_model=D, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)


def build(kind):
    """(stages, input batch x) of a small float64 model; the cuts go between the stages."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if kind == "mlp":
        stages = [nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.BatchNorm1d(16), nn.ReLU()),
                  nn.Sequential(nn.Linear(16, 16), nn.Tanh()), nn.Linear(16, 3)]
        x = torch.randn(B, 1, 6, 6, generator=g)
    elif kind == "cnn":
        stages = [nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2)),
                  nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()),
                  nn.Sequential(nn.Flatten(), nn.Linear(4 * 3 * 3, 3))]
        x = torch.randn(B, 1, 6, 6, generator=g)
    elif kind == "resnet":
        stages = [nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(inplace=True)),
                  Residual(4, 4), Residual(4, 8, stride=2),
                  nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))]
        x = torch.randn(B, 3, 8, 8, generator=g)
    else:  # a Transformer: the cut is on (B, T, D), read by a per-position synthesizer
        stages = [nn.Sequential(nn.Linear(3, D), transformer_layer()), transformer_layer(),
                  nn.Sequential(MeanOverTime(), nn.Linear(D, 3))]
        x = torch.randn(B, T, 3, generator=g)
    return nn.ModuleList(stages).double(), x.double()


class Interfaced(nn.Module):
    """The drop-in form on the same stages: a `dni.DNI` after each stage but the last."""

    def __init__(self, stages, synthesizers, **dni_kwargs):
        super().__init__()
        self.stages = stages
        self.interfaces = nn.ModuleList(dni.DNI(m, **dni_kwargs) for m in synthesizers)

    def forward(self, x, context=None):
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i < len(self.interfaces):
                x = self.interfaces[i](x, context=context)
        return x


class Oracle(nn.Module):
    """Returns the true per-example gradient it is given (times `scale`); a zero parameter makes it trainable."""

    def __init__(self, scale=None):
        super().__init__()
        self.offset = nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.target, self.scale = None, scale

    def forward(self, trigger, context=None):
        return self.target * (len(trigger) if self.scale is None else self.scale) + self.offset


def true_stage_grads(stages, x, y, loss_fn):
    """d loss / d h_i at every stage output but the last, by plain backprop on a copy."""
    stages, outputs, h = copy.deepcopy(stages), [], x
    for stage in stages:
        h = stage(h)
        h.retain_grad()
        outputs.append(h)
    loss_fn(h, y).backward()
    return [o.grad for o in outputs[:-1]]


def targets_for(kind, seed):
    g = torch.Generator().manual_seed(100 + seed)
    return torch.randint(0, 3, (B,), generator=g)


def new_batch(x, seed):
    g = torch.Generator().manual_seed(seed)
    return x + 0.1 * torch.randn(x.shape, generator=g, dtype=x.dtype)


# ---------------------------------------------------------------- the oracle test, both forms

@pytest.mark.parametrize("kind", ["mlp", "cnn", "resnet", "transformer"])
@pytest.mark.parametrize("form", ["interface", "stagewise"])
def test_oracle_synthesizers_give_backprop_parameters(kind, form):
    stages, x0 = build(kind)
    reference = copy.deepcopy(stages)
    oracles = nn.ModuleList(Oracle() for _ in range(len(stages) - 1))
    if form == "interface":
        model = Interfaced(stages, oracles)
    else:
        model = dni.DNINet(stages=stages, synthesizers=oracles)
    # One optimizer over stages and synthesizers. SGD with momentum, not Adam: Adam turns gradients
    # that are pure rounding noise (a bias before BatchNorm) into steps of the learning rate's size.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for t in range(3):  # several steps, so the momentum must match too
        x, y = new_batch(x0, t), targets_for(kind, t)
        for oracle, grad in zip(oracles, true_stage_grads(stages, x, y, F.cross_entropy)):
            oracle.target = grad
        if form == "interface":
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        else:
            dni.dni_step(model, optimizer, None, x, y)
        ref_optimizer.zero_grad()
        h = x
        for stage in reference:
            h = stage(h)
        F.cross_entropy(h, y).backward()
        ref_optimizer.step()
    torch.testing.assert_close(stages.state_dict(), reference.state_dict())


@pytest.mark.parametrize("form", ["interface", "stagewise"])
def test_oracle_with_a_summed_regression_loss_and_its_loss_scale(form):
    """Any loss: with a summed MSE the gradients are per example already, so loss_scale=1."""
    stages, x0 = build("mlp")
    reference = copy.deepcopy(stages)
    oracles = nn.ModuleList(Oracle(scale=1.0) for _ in range(len(stages) - 1))
    loss_fn = lambda out, y: F.mse_loss(out, y, reduction="sum")  # noqa: E731
    model = Interfaced(stages, oracles, loss_scale=1.0) if form == "interface" else \
        dni.DNINet(stages=stages, synthesizers=oracles)
    optimizer, ref_optimizer = torch.optim.SGD(model.parameters(), lr=1e-2), torch.optim.SGD(reference.parameters(), lr=1e-2)
    for t in range(2):
        x, y = new_batch(x0, t), torch.randn(B, 3, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
        for oracle, grad in zip(oracles, true_stage_grads(stages, x, y, loss_fn)):
            oracle.target = grad
        if form == "interface":
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
        else:
            stats = dni.dni_step(model, optimizer, None, x, y, loss_fn=loss_fn, loss_scale=1.0)
            assert stats.correct is None  # regression: no accuracy
        ref_optimizer.zero_grad()
        loss_fn(reference[2](reference[1](reference[0](x))), y).backward()
        ref_optimizer.step()
    torch.testing.assert_close(stages.state_dict(), reference.state_dict())


# ---------------------------------------------------------------- one update: both forms agree bit for bit

def paper_mlp(conditioned):
    """The repo's FCN with its dense synthesizers (BatchNorm inside), last layers non-zero."""
    from dnilab.models import MODELS, stage_shapes
    torch.manual_seed(0)
    stages = MODELS["mlp"](in_shape=(1, 6, 6), classes=10, depth=3, hidden=16)
    synths = nn.ModuleList(dni.make_synthesizer(s, context_features=10 if conditioned else 0, width=32)
                           for s in stage_shapes(stages, (1, 6, 6))[:-1])
    with torch.no_grad():
        for m in synths:
            m.net[-1].weight.normal_(std=0.1)
    return dni.DNINet(stages=stages, synthesizers=synths, conditioned=conditioned)


@pytest.mark.parametrize("conditioned", [False, True])
def test_stagewise_step_equals_the_interface_form_exactly(conditioned):
    """Per-stage optimizers stepping stage by stage, or one loss.backward() and one step: the same
    parameters, synthesizers and BatchNorm statistics, bit for bit (float32)."""
    net = paper_mlp(conditioned)
    model = Interfaced(copy.deepcopy(net.stages), copy.deepcopy(net.synthesizers))
    stage_opts = [torch.optim.Adam(s.parameters(), lr=1e-2) for s in net.stages]
    synth_opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in net.synthesizers]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, y = torch.rand(16, 1, 6, 6, generator=g), torch.randint(0, 10, (16,), generator=g)
        stats = dni.dni_step(net, stage_opts, synth_opts, x, y)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x, context=F.one_hot(y, 10) if conditioned else None), y)
        loss.backward()
        optimizer.step()
        assert torch.equal(stats.loss, loss.detach())
        assert [torch.equal(a, i.sg_loss) for a, i in zip(stats.sg_loss, model.interfaces)] == [True] * 3
    for (name, a), b in zip(net.stages.state_dict().items(), model.stages.state_dict().values()):
        assert torch.equal(a, b), name
    for m, i in zip(net.synthesizers, model.interfaces):
        for (name, a), b in zip(m.state_dict().items(), i.synthesizer.state_dict().values()):
            assert torch.equal(a, b), name


# ---------------------------------------------------------------- the drop-in in a model a user wrote

class Regressor(nn.Module):
    """A user's model: DNI is two lines of it (marked)."""

    def __init__(self, synthesizer):
        super().__init__()
        self.below = nn.Sequential(nn.Linear(4, 16), nn.Tanh())
        self.above = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2))
        self.interface = dni.DNI(synthesizer)  # DNI

    def forward(self, x, context):
        h = self.below(x)
        h = self.interface(h, context=context)  # DNI
        return self.above(h)


class UserSynthesizer(nn.Module):
    """A user's own synthesizer: any forward(trigger, context)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(16 + 3, 16)

    def forward(self, trigger, context):
        return self.linear(torch.cat([trigger, context], dim=1))


def test_below_gets_the_synthetic_gradient_and_the_synthesizer_the_true_one():
    """One loss.backward(): the layers below receive g_hat / B, never the true gradient; the user's
    synthesizer (float64 context into a float32 model) the gradient of || g_hat - B * true ||^2."""
    torch.manual_seed(0)
    model = Regressor(UserSynthesizer())
    x, context, y = torch.randn(B, 4), torch.randn(B, 3, dtype=torch.float64), torch.randn(B, 2)
    F.mse_loss(model(x, context), y).backward()

    ref = copy.deepcopy(model)
    ref.zero_grad()
    h = ref.below(x)
    trigger = h.detach().requires_grad_()
    (true_grad,) = torch.autograd.grad(F.mse_loss(ref.above(trigger), y), trigger)
    g_hat = ref.interface.synthesizer(h.detach(), context.float())
    h.backward(g_hat.detach() / B)
    dni.synthesizer_loss(g_hat, B * true_grad).backward()
    assert not torch.allclose(true_grad, g_hat / B)  # the two candidates differ, so the check means something
    for p, q in zip(model.parameters(), ref.parameters()):
        if p.requires_grad and q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad)
    assert model.interface.synthesizer.linear.weight.grad.abs().sum() > 0
    torch.testing.assert_close(model.interface.sg_loss, dni.synthesizer_loss(g_hat, B * true_grad).detach())


def test_interface_is_the_identity_in_eval_mode_and_without_grad():
    model = Regressor(UserSynthesizer()).eval()
    calls = []
    model.interface.synthesizer.register_forward_hook(lambda *a: calls.append(1))
    x, c = torch.randn(B, 4), torch.randn(B, 3)
    model(x, c)
    with torch.no_grad():
        model.train()(x, c)
    assert calls == []


def test_float64_net_takes_a_float32_onehot_context():
    """cDNI in float64 (the issue's dtype error): the context is cast to the trigger's dtype."""
    net = paper_mlp(conditioned=True).double()
    x, y = torch.rand(8, 1, 6, 6, dtype=torch.float64), torch.arange(8) % 10
    stats = dni.dni_step(net, torch.optim.Adam(net.parameters()), None, x, y)
    assert all(torch.isfinite(v) for v in stats.sg_loss)
    model = Interfaced(net.stages, net.synthesizers)
    F.cross_entropy(model(x, context=F.one_hot(y, 10)), y).backward()  # an int64 context too


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("form", ["interface", "stagewise"])
def test_autocast_bfloat16_on_cpu_gives_finite_values(kind, form):
    net = paper_mlp(conditioned=True) if kind == "mlp" else None
    if net is None:
        from dnilab.models import MODELS, stage_shapes
        torch.manual_seed(0)
        stages = MODELS["cnn"](in_shape=(1, 8, 8), classes=10, depth=2, channels=4)
        net = dni.DNINet(stages=stages, conditioned=True, synthesizers=nn.ModuleList(
            dni.make_synthesizer(s, context_features=10, conv_width=4) for s in stage_shapes(stages, (1, 8, 8))[:-1]))
        with torch.no_grad():
            for m in net.synthesizers:
                m.net[-1].weight.normal_(std=0.1)
    shape = (1, 6, 6) if kind == "mlp" else (1, 8, 8)
    x, y = torch.rand(16, *shape), torch.arange(16) % 10
    before = copy.deepcopy(net.state_dict())
    for _ in range(2):
        if form == "stagewise":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                stats = dni.dni_step(net, torch.optim.Adam(net.parameters(), lr=1e-3), None, x, y)
            sg_losses = stats.sg_loss
        else:
            model = Interfaced(net.stages, net.synthesizers)
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x, context=F.one_hot(y, 10))
                assert out.dtype == torch.bfloat16
                loss = F.cross_entropy(out, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            sg_losses = [i.sg_loss for i in model.interfaces]
        assert all(torch.isfinite(v) for v in sg_losses)
    for name, value in net.state_dict().items():
        assert value.dtype == before[name].dtype and torch.isfinite(value.float()).all(), name
    first = next(net.stages[0].parameters())
    assert not torch.equal(first, next(iter(before.values())))  # the synthetic gradient moved it


# ---------------------------------------------------------------- synthesizers

def test_make_synthesizer_picks_by_trigger_shape():
    assert type(dni.make_synthesizer((8,))) is dni.DenseSynthesizer
    assert type(dni.make_synthesizer((4, 6, 6))) is dni.ConvSynthesizer
    assert type(dni.make_synthesizer((T, D))) is dni.SequenceSynthesizer
    assert type(dni.make_synthesizer((T, D), kind="dense")) is dni.DenseSynthesizer


@pytest.mark.parametrize("context_shape", [None, (B, 3), (B, T, 3)])
def test_sequence_synthesizer_starts_at_zero_and_serves_any_length(context_shape):
    m = dni.SequenceSynthesizer(features=D, context_features=0 if context_shape is None else 3, width=16)
    for length in (T, 2 * T):
        trigger = torch.randn(B, length, D)
        context = None if context_shape is None else torch.randn(B, *context_shape[1:-1] and (length,), 3)
        g_hat = m(trigger, context)
        assert g_hat.shape == trigger.shape and torch.count_nonzero(g_hat) == 0


def test_sequence_synthesizer_learns_a_fixed_per_position_target():
    torch.manual_seed(0)
    m = dni.SequenceSynthesizer(features=D, context_features=3, width=32)
    trigger, context = torch.randn(32, T, D), torch.randn(32, 3)
    target = 0.5 * trigger.roll(1, dims=2) + context[:, None, :1]
    optimizer = torch.optim.Adam(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(150):
        loss = dni.synthesizer_loss(m(trigger, context), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10


def test_synthesizer_learns_through_the_interface():
    """Only the synthesizer learns (the rest is frozen), so its target is fixed: its loss falls."""
    torch.manual_seed(0)
    model = Regressor(dni.DenseSynthesizer(features=16, context_features=3, width=32))
    for p in list(model.below.parameters()) + list(model.above.parameters()):
        p.requires_grad_(False)
    model.below[0].weight.requires_grad_(True)  # something below must want a gradient; not stepped
    optimizer = torch.optim.Adam(model.interface.parameters(), lr=1e-2)
    x, context, y = torch.randn(64, 4), torch.randn(64, 3), torch.randn(64, 2)
    losses = []
    for _ in range(150):
        optimizer.zero_grad()
        F.mse_loss(model(x, context), y).backward()
        optimizer.step()
        losses.append(model.interface.sg_loss.item())
    assert losses[-1] < losses[0] / 10
    assert model.interface.sg_cos > 0.9


def test_dni_built_from_a_shape():
    interface = dni.DNI(shape=(T, D), context_features=3, width=16)
    assert isinstance(interface.synthesizer, dni.SequenceSynthesizer)
    with pytest.raises(ValueError):
        dni.DNI()


def test_import_dni_is_cheap_and_exports_the_library():
    import subprocess
    import sys
    code = "import sys, dni; assert 'torch' not in sys.modules; dni.DNI; assert 'dnilab.train' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
