"""DNI that holds up in a researcher's own model (issue 34): any optimizer, no silent leaks, misuse
named in one sentence, loss multipliers and gradient accumulation, (C, L) triggers."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dni
from dni.errors import DNIError


# ---------------------------------------------------------------- no silent leaks (item 2)

class Skip(nn.Module):
    """above(interface(h)) + skip(h): the skip path sends the true gradient around the interface."""

    def __init__(self, **dni_kwargs):
        super().__init__()
        self.below = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        self.interface = dni.DNI(shape=(8,), hidden_layers=0, **dni_kwargs)
        self.above = nn.Linear(8, 2)
        self.skip = nn.Linear(8, 2)

    def forward(self, x, use="skip"):
        h = self.below(x)
        out = self.above(self.interface(h))
        if use == "skip":
            return out + self.skip(h)
        if use == "twice":
            return out + h.sum(1, keepdim=True)
        return out


@pytest.mark.parametrize("use", ["skip", "twice"])
def test_a_gradient_around_the_interface_is_named_in_the_first_backward(use):
    model = Skip()
    loss = model(torch.randn(5, 4), use).pow(2).mean()
    with pytest.raises(DNIError, match=r"DNI\(shape=\(8,\)\) found a gradient reaching its input by another path"):
        loss.backward()


def test_allow_leaks_lets_the_skip_gradient_through_on_purpose():
    torch.manual_seed(0)
    model = Skip(allow_leaks=True)
    x = torch.randn(5, 4)
    model(x).pow(2).mean().backward()
    # The synthesizer starts at zero, so what reaches below is the skip path's true gradient alone.
    ref = copy.deepcopy(model)
    ref.zero_grad()
    h = ref.below(x)
    (ref.above(h.detach()) + ref.skip(h)).pow(2).mean().backward()
    torch.testing.assert_close(model.below[0].weight.grad, ref.below[0].weight.grad)


def test_the_leak_check_passes_a_cut_used_once_and_changes_no_gradient():
    torch.manual_seed(0)
    model = Skip()
    twin = copy.deepcopy(model)
    twin.interface.allow_leaks = True  # the same update without the check
    with torch.no_grad():
        for m in (model, twin):
            m.interface.synthesizer.net[-1].weight.fill_(0.1)
    x = torch.randn(5, 4)
    for m in (model, twin):
        for _ in range(2):  # twice: a hook left from the first step must not fire in the second
            m.zero_grad()
            m(x, use="once").pow(2).mean().backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad)


def test_a_leaf_input_reused_every_step_is_not_a_leak():
    interface = dni.DNI(shape=(3,), hidden_layers=0)
    x = torch.randn(4, 3, requires_grad=True)
    for _ in range(3):
        interface(x).sum().backward()


# ---------------------------------------------------------------- misuse named in one sentence (item 3)

def one_sentence(error):
    message = str(error.value)
    assert "\n" not in message and message.startswith("DNI"), message
    return message


def test_a_trigger_of_the_wrong_shape_is_named():
    interface = dni.DNI(shape=(64,))
    with pytest.raises(DNIError) as error:
        interface(torch.randn(8, 32, requires_grad=True))
    assert one_sentence(error) == "DNI(shape=(64,)) got a trigger of shape (8, 32); expected (B, 64)"
    with pytest.raises(DNIError, match=r"expected \(B, 4, 6, 6\)"):
        dni.DNI(shape=(4, 6, 6))(torch.randn(2, 4, 6, 5, requires_grad=True))
    with pytest.raises(DNIError, match=r"expected \(B, T, 8\)"):  # a sequence serves any length, not any width
        dni.DNI(shape=(5, 8))(torch.randn(2, 5, 7, requires_grad=True))
    dni.DNI(shape=(5, 8), width=16)(torch.randn(2, 9, 8, requires_grad=True))  # any length T


def test_a_context_of_the_wrong_batch_or_width_is_named():
    interface = dni.DNI(shape=(16,), context_features=10)
    h = torch.randn(8, 16, requires_grad=True)
    with pytest.raises(DNIError) as error:
        interface(h, context=torch.randn(4, 10))
    assert one_sentence(error) == "DNI(shape=(16,)) got a context of shape (4, 10) for a trigger of batch 8; " \
                                  "expected (8, 10)"
    with pytest.raises(DNIError, match=r"context of shape \(8, 3\)"):
        interface(h, context=torch.randn(8, 3))
    with pytest.raises(DNIError, match=r"got no context; expected one of shape \(8, 10\)"):
        interface(h)
    with pytest.raises(DNIError, match=r"expected none"):
        dni.DNI(shape=(16,))(h, context=torch.randn(8, 10))


def test_a_batch_of_one_in_a_batchnorm_synthesizer_is_named():
    with pytest.raises(DNIError) as error:
        dni.DNI(shape=(16,))(torch.randn(1, 16, requires_grad=True))
    assert "got a batch of 1" in one_sentence(error) and "BatchNorm" in str(error.value)
    dni.DNI(shape=(16,), hidden_layers=0)(torch.randn(1, 16, requires_grad=True))  # no BatchNorm: fine


def test_a_trigger_of_another_dtype_is_named_but_autocast_is_not_a_mismatch():
    interface = dni.DNI(shape=(16,), width=8)
    with pytest.raises(DNIError) as error:
        interface(torch.randn(4, 16, dtype=torch.float64, requires_grad=True))
    assert one_sentence(error).startswith("DNI(shape=(16,)) got a trigger of dtype torch.float64; expected torch.float32")
    linear = nn.Linear(16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = linear(torch.randn(4, 16))
        assert h.dtype == torch.bfloat16
        interface(h).float().sum().backward()


def test_a_user_synthesizer_that_fails_is_named_with_what_it_got():
    class UserSynthesizer(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(64, 64)

        def forward(self, trigger, context=None):
            return self.linear(trigger)

    interface = dni.DNI(UserSynthesizer())
    with pytest.raises(DNIError) as error:
        interface(torch.randn(8, 32, requires_grad=True))
    assert one_sentence(error).startswith("DNI(UserSynthesizer) could not run its synthesizer on a trigger of shape (8, 32)")


def test_misuse_errors_are_value_errors_too():
    assert issubclass(dni.InterfaceError, DNIError) and issubclass(dni.InterfaceError, ValueError)


# ---------------------------------------------------------------- (C, L) triggers (item 5)

def test_conv1d_synthesizer_is_asked_for_by_kind_and_starts_at_zero():
    assert type(dni.make_synthesizer((4, 20))) is dni.SequenceSynthesizer  # the default for 2-D stays (T, D)
    m = dni.make_synthesizer((4, 20), kind="conv1d", context_features=3, conv_width=8)
    assert type(m) is dni.Conv1dSynthesizer
    g_hat = m(torch.randn(6, 4, 20), torch.randn(6, 3))
    assert g_hat.shape == (6, 4, 20) and torch.count_nonzero(g_hat) == 0
    free = dni.make_synthesizer((4, 20), kind="conv1d", position_map=False, conv_width=8)
    assert free(torch.randn(6, 4, 33)).shape == (6, 4, 33)  # without the position map: any length
    with pytest.raises(ValueError, match="kind"):
        dni.make_synthesizer((4, 20), kind="conv2d")


def test_conv1d_synthesizer_learns_a_fixed_position_and_label_dependent_target():
    torch.manual_seed(0)
    m = dni.Conv1dSynthesizer(shape=(4, 16), context_features=3, width=16)
    trigger, context = torch.randn(64, 4, 16), F.one_hot(torch.arange(64) % 3, 3).float()
    target = 0.5 * trigger.roll(1, dims=2) + (context @ torch.randn(3, 4 * 16)).view(64, 4, 16)
    optimizer = torch.optim.Adam(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(150):
        loss = dni.synthesizer_loss(m(trigger, context), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10


def test_oracle_through_a_conv1d_cut_gives_backprop_parameters():
    """A Conv1d model cut at (C, L): a synthesizer returning the true per-example gradient gives
    exactly backprop's parameters; a Conv1dSynthesizer in its place runs and trains below."""
    torch.manual_seed(0)
    below = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.Tanh()).double()
    above = nn.Sequential(nn.Flatten(), nn.Linear(4 * 12, 3)).double()
    x, y = torch.randn(5, 2, 12, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    h = below(x)
    (true,) = torch.autograd.grad(F.cross_entropy(above(h), y), h)

    class Oracle(nn.Module):
        def forward(self, trigger, context=None):
            return true * len(trigger)

    ref_below = copy.deepcopy(below)
    F.cross_entropy(above(dni.DNI(Oracle())(below(x))), y).backward()
    F.cross_entropy(above(ref_below(x)), y).backward()
    for p, q in zip(below.parameters(), ref_below.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    interface = dni.DNI(shape=(4, 12), kind="conv1d", conv_width=8).double()
    assert isinstance(interface.synthesizer, dni.Conv1dSynthesizer)
    F.cross_entropy(above(interface(below(x))), y).backward()
    assert interface.sg_loss > 0 and interface.synthesizer.net[-1].weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- the zero head, shared

def test_every_built_in_synthesizer_ends_in_the_shared_zero_head():
    for m in (dni.make_synthesizer((8,)), dni.make_synthesizer((4, 6, 6)), dni.make_synthesizer((5, 8)),
              dni.make_synthesizer((4, 10), kind="conv1d")):
        head = m.net[-1]
        assert torch.count_nonzero(head.weight) == 0 and torch.count_nonzero(head.bias) == 0
    layer = dni.zero_head(nn.Linear(3, 2))
    assert torch.count_nonzero(layer.weight) == 0 and torch.count_nonzero(layer.bias) == 0


# ---------------------------------------------------------------- loss multipliers and accumulation (item 4)

class Cut(nn.Module):
    """A float64 regression model with one cut and a BatchNorm-free synthesizer that starts non-zero."""

    def __init__(self, **dni_kwargs):
        super().__init__()
        torch.manual_seed(0)
        self.below = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        self.interface = dni.DNI(shape=(8,), hidden_layers=0, **dni_kwargs)
        self.above = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
        with torch.no_grad():
            self.interface.synthesizer.net[-1].weight.normal_(std=0.3)
        self.double()

    def forward(self, x):
        return self.above(self.interface(self.below(x)))


def batch(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randn(n, 2, generator=g, dtype=torch.float64)


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("multiplier", [1024.0, lambda: 1024.0])
def test_a_loss_multiplier_leaves_the_target_and_scales_every_gradient_alike(multiplier):
    x, y = batch(6)
    plain, scaled, told = Cut(), Cut(), Cut(loss_multiplier=multiplier)
    F.mse_loss(plain(x), y).backward()
    (1024 * F.mse_loss(scaled(x), y)).backward()
    (1024 * F.mse_loss(told(x), y)).backward()
    assert scaled.interface.sg_loss > 1e4 * plain.interface.sg_loss  # untold: the target moves 1024-fold
    torch.testing.assert_close(told.interface.sg_loss, plain.interface.sg_loss)
    for a, b in zip(grads(told), grads(plain)):
        torch.testing.assert_close(a, 1024 * b)  # the synthesizer's too: a GradScaler unscales them all


def test_gradient_accumulation_with_its_multiplier_equals_one_large_batch():
    x, y = batch(12)
    large, accumulated = Cut(), Cut(loss_multiplier=0.5)
    F.mse_loss(large(x), y).backward()
    for part in (slice(0, 6), slice(6, 12)):
        (F.mse_loss(accumulated(x[part]), y[part]) / 2).backward()
    for a, b in zip(grads(accumulated), grads(large)):
        torch.testing.assert_close(a, b)


def test_a_grad_scaler_is_read_at_each_step():
    x, y = batch(6)
    plain, amp = Cut(), None
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    amp = Cut(loss_multiplier=scaler)
    opt_plain, opt_amp = torch.optim.SGD(plain.parameters(), lr=0.1), torch.optim.SGD(amp.parameters(), lr=0.1)
    for step in range(3):
        for opt in (opt_plain, opt_amp):
            opt.zero_grad()
        F.mse_loss(plain(x), y).backward()
        opt_plain.step()
        scaler.scale(F.mse_loss(amp(x), y)).backward()
        scaler.step(opt_amp)
        scaler.update(new_scale=2.0 ** (11 + step))  # a changing scale
        torch.testing.assert_close(amp.interface.sg_loss, plain.interface.sg_loss)
    for p, q in zip(amp.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q)


# ---------------------------------------------------------------- any optimizer (item 1)

@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def regression(method, optimizer, *, conditioned=True, batch_norm=False, steps=300):
    """experiments/sg_optimizers.py's 2-cut MLP regression (cDNI: the target as context); the
    full-data MSE at the start and at the end. `method`: backprop, dni, or frozen (sg_lr=0)."""
    from experiments.sg_optimizers import OPTIMIZERS, Net, data
    torch.manual_seed(0)
    x, y = data(0)
    model = Net(cuts=method != "backprop", conditioned=conditioned, batch_norm=batch_norm)
    cls, lr, options = OPTIMIZERS[optimizer]
    params = dni.param_groups(model, lr=lr, sg_lr=0.0) if method == "frozen" else model.parameters()
    opt = cls(params, lr=lr, **options)
    g = torch.Generator().manual_seed(1000)
    with torch.no_grad():
        start = F.mse_loss(model(x, y), y).item()
    for _ in range(steps):
        i = torch.randint(0, len(x), (64,), generator=g)
        loss = F.mse_loss(model(x[i], y[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return start, F.mse_loss(model.eval()(x, y), y).item()


def test_the_batchnorm_synthesizer_diverges_under_sgd_with_momentum(one_thread):
    """The issue's case: SGD(lr=0.05, momentum=0.9) trains this model by backprop to a low loss;
    DNI with the default synthesizer (BatchNorm in its hidden layer) diverges."""
    assert regression("backprop", "SGD+momentum")[1] < 0.01
    assert not regression("dni", "SGD+momentum", batch_norm=True)[1] < 1  # nan, or far above the start


@pytest.mark.parametrize("conditioned", [False, True])
def test_a_synthesizer_without_batchnorm_trains_under_sgd_with_momentum(one_thread, conditioned):
    start, final = regression("dni", "SGD+momentum", conditioned=conditioned)
    assert final < 0.2 * start  # no nan, and a small fraction of the start


@pytest.mark.parametrize("optimizer", ["SGD", "SGD+momentum", "Adam", "AdamW"])
def test_cdni_without_batchnorm_trains_below_the_cuts_under_any_optimizer(one_thread, optimizer):
    start, final = regression("dni", optimizer)
    assert final < 0.05 * start
    assert final < 0.7 * regression("frozen", optimizer)[1]  # the layers below the cuts learn too


def test_param_groups_give_the_synthesizers_their_own_rate_and_options():
    model = nn.Sequential(nn.Linear(4, 8), dni.DNI(shape=(8,), width=4), nn.Linear(8, 2))
    groups = dni.param_groups(model, lr=0.1, sg_lr=0.01, momentum=0.0)
    assert [g["lr"] for g in groups] == [0.1, 0.01] and groups[1]["momentum"] == 0.0
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model[1].parameters()}
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(model.parameters()))
    assert dni.param_groups(model, lr=0.1)[1]["lr"] == 0.1
    torch.optim.SGD(groups, lr=0.1, momentum=0.9)
