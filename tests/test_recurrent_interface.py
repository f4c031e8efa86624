"""dni.RecurrentDNI, the recurrent form on torch's own recurrent modules (paper, section 3.2):
true future gradients as synthetic ones give full BPTT (a tensor state and nn.LSTM's (h, c)),
the first window and a reset start, the default batch dimension, and misuse named in one sentence."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dni
from dni.recurrent import SG_FACTOR

B, IN, H, T, WINDOWS = 3, 2, 4, 3, 3


class Model(nn.Module):
    """A recurrent module of torch and a readout: (x (T, B, IN), state) -> (outputs (T, B, 1), state)."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.rnn = {"gru": nn.GRU, "lstm": nn.LSTM, "lstm_cell": nn.LSTMCell}[kind](IN, H)
        self.readout = nn.Linear(H, 1)

    def forward(self, x, state):
        if self.kind != "lstm_cell":
            out, state = self.rnn(x, state)
            return self.readout(out), state
        outs = []
        for x_t in x:
            state = self.rnn(x_t, state)
            outs.append(state[0])
        return self.readout(torch.stack(outs)), state


def window_loss(out, y):
    """Summed over the window's steps, averaged over the batch (loss_scale: B)."""
    return F.mse_loss(out, y, reduction="sum") / B


def flat(state):
    """The state per example, as the interface's trigger lays it out: (B, features)."""
    parts = [state] if isinstance(state, torch.Tensor) else list(state)
    return torch.cat([p.movedim(1, 0).reshape(B, -1) if p.dim() == 3 else p for p in parts], dim=1)


class TrueFutureGradient(nn.Module):
    """A stand-in synthesizer that answers, at the window's end, the true per-example gradient of all
    future loss (and 0 at the start); `future` is set before each window."""

    def __init__(self):
        super().__init__()
        self.future = None                                           # (B, features)
        self.anchor = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, trigger, context=None):                        # (B or 2B, features)
        if len(trigger) == B:                                        # a first window: no start state
            return self.future + self.anchor
        return torch.cat([torch.zeros_like(self.future), self.future]) + self.anchor


def data():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(T * WINDOWS, B, IN, generator=generator, dtype=torch.float64)
    y = torch.randn(T * WINDOWS, B, 1, generator=generator, dtype=torch.float64)
    return x, y


def detach(state):
    return state.detach() if isinstance(state, torch.Tensor) else tuple(s.detach() for s in state)


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("kind", ["gru", "lstm", "lstm_cell"])
def test_true_future_gradients_give_full_bptt(kind):
    """Windows of T steps, each sent the exact gradient of the future loss at its end with factor 1,
    accumulate backprop's gradients over the whole sequence; the first window begins from None."""
    torch.manual_seed(0)
    model = Model(kind).double()
    x, y = data()
    out, _ = model(x, None)
    expected = torch.autograd.grad(window_loss(out, y), list(model.parameters()))

    with torch.no_grad():                                           # the states at the window boundaries
        states, state = [None], None
        for k in range(WINDOWS):
            state = model(x[k * T:(k + 1) * T], state)[1]
            states.append(state)
    oracle = TrueFutureGradient()
    sg = dni.RecurrentDNI(oracle, factor=1.0)
    state = None
    for k in range(WINDOWS):
        oracle.future = torch.zeros(B, 2 * H if kind != "gru" else H, dtype=torch.float64)
        if k < WINDOWS - 1:
            boundary = tuple(s.clone().requires_grad_() for s in ([states[k + 1]] if kind == "gru" else states[k + 1]))
            rest, _ = model(x[(k + 1) * T:], boundary[0] if kind == "gru" else boundary)
            future = torch.autograd.grad(window_loss(rest, y[(k + 1) * T:]) * B, boundary)   # per example
            oracle.future = flat(future)
        state = sg.begin(state)
        out, state = model(x[k * T:(k + 1) * T], state)
        state = sg.backward(window_loss(out, y[k * T:(k + 1) * T]), state)
        assert not flat(state).requires_grad
        torch.testing.assert_close(flat(state), flat(states[k + 1]))
        assert (sg.sg_loss is None) == (k == 0)                     # no start state to learn at in the first window
    for ours, theirs in zip(grads(model), expected):
        torch.testing.assert_close(ours, theirs)


def test_lstm_window_target_is_the_gradient_at_its_start_and_a_reset_start_gets_zero():
    torch.manual_seed(0)
    model = Model("lstm").double()
    sg = dni.RecurrentDNI(features=2 * H, factor=SG_FACTOR).double()
    with torch.no_grad():
        sg.synthesizer.net[-1].weight.normal_(0, 0.3)
    x, y = data()
    state = sg.begin((torch.randn(1, B, H, dtype=torch.float64), torch.randn(1, B, H, dtype=torch.float64)))
    start = flat(state).detach().requires_grad_()
    out, end = model(x[:T], state)
    state = sg.backward(window_loss(out, y[:T]), end)
    assert isinstance(state, tuple) and state[0].shape == (1, B, H)

    h, c = (part.reshape(B, 1, H).movedim(1, 0) for part in start.chunk(2, dim=1))
    out, end = model(x[:T], (h, c))
    g_end = sg.synthesizer(flat(end).detach())
    objective = window_loss(out, y[:T]) + SG_FACTOR * (flat(end) * g_end.detach()).sum() / B
    torch.testing.assert_close(sg.target, B * torch.autograd.grad(objective, start)[0])
    torch.testing.assert_close(sg.synthetic, g_end.detach())

    state = sg.begin(state)                                         # an episode reset: the start is not used
    out, end = model(x[T:2 * T], None)
    sg.backward(window_loss(out, y[T:2 * T]), end)
    assert torch.count_nonzero(sg.target) == 0 and sg.sg_loss > 0


def test_default_synthesizer_starts_at_zero_and_serves_batch_first_lstm_and_cells():
    sg = dni.RecurrentDNI(features=2 * H)
    last = sg.synthesizer.net[-1]
    assert torch.count_nonzero(last.weight) == 0 and torch.count_nonzero(last.bias) == 0
    assert sg.factor == SG_FACTOR == 0.1
    lstm = nn.LSTM(IN, H, batch_first=True)                         # its state is (1, B, H) all the same
    out, state = lstm(torch.randn(B, T, IN), sg.begin(None))
    state = sg.backward(out.pow(2).mean(), state)
    out, state = lstm(torch.randn(B, T, IN), sg.begin(state))
    sg.backward(out.pow(2).mean(), state)
    assert torch.count_nonzero(sg.synthetic) == 0 and sg.sg_loss > 0      # a zero prediction of a true target
    cell = nn.LSTMCell(IN, H)                                       # (B, H) states: batch at dim 0
    state = cell(torch.randn(B, IN), sg.begin((torch.zeros(B, H), torch.zeros(B, H))))
    sg.backward(state[0].sum(), state)
    assert sg.target.shape == (B, 2 * H)
    model = nn.ModuleDict(dict(lstm=lstm, sg=sg))
    groups = dni.param_groups(model, lr=1e-3, sg_lr=1e-4)
    assert [len(g["params"]) for g in groups] == [4, 2] and groups[1]["lr"] == 1e-4


def misuse(sg, start, end_of, loss_of=lambda out: out.sum()):
    state = sg.begin(start)
    out = end_of(state)
    return sg.backward(loss_of(out), out)


@pytest.mark.parametrize("make, message", [
    (lambda sg: sg.begin(torch.zeros(B, 6)), "RecurrentDNI(features=8) got a start state of shape (3, 6), 6 features "
                                            "per example; expected 8"),
    (lambda sg: sg.begin((torch.zeros(1, B, 4), torch.zeros(1, 2, 4))), "whose tensors hold different batch sizes"),
    (lambda sg: sg.begin([1, 2]), "got a start state of type list; expected a tensor or a tuple of tensors"),
    (lambda sg: sg.begin(torch.zeros(())), "got a start state of shape (), without a batch dimension 0; pass batch_dim"),
    (lambda sg: sg.backward(torch.zeros((), requires_grad=True), torch.zeros(B, 8, requires_grad=True)),
     "backward() came without begin(): call state = sg.begin(state)"),
    (lambda sg: misuse(sg, (torch.zeros(1, B, 4), torch.zeros(1, B, 4)),
                       lambda s: torch.cat(s, dim=2)[0] * torch.ones(8, requires_grad=True)),
     "got an end state of shape (3, 8); expected its window's start state's, (1, 3, 4), (1, 3, 4)"),
    (lambda sg: misuse(sg, torch.zeros(B, 8), lambda s: s * 2, loss_of=lambda out: out),
     "backward() got a loss of shape (3, 8); expected a scalar tensor"),
    (lambda sg: misuse(sg, torch.zeros(B, 8), lambda s: (s * 2).detach(), loss_of=lambda out: out.sum() + 0 * out.sum()),
     "got an end state that does not require grad"),
])
def test_misuse_is_named_in_one_sentence(make, message):
    sg = dni.RecurrentDNI(features=8)
    with pytest.raises(dni.InterfaceError) as info:
        make(sg)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_backward_twice_after_one_begin_and_a_bad_synthesizer_are_named():
    sg = dni.RecurrentDNI(features=8)
    state = sg.begin(torch.zeros(B, 8))
    end = state * 2
    sg.backward(end.sum(), end)
    with pytest.raises(dni.InterfaceError, match="came without begin"):
        sg.backward(end.sum(), end)

    class OneArgument(nn.Module):
        def forward(self, trigger):
            return trigger

    class Wrong(nn.Module):
        def forward(self, trigger, context=None):
            return trigger[:, :4]

    for synthesizer, message in ((OneArgument(), "could not run its synthesizer on a trigger of shape (6, 8)"),
                                 (Wrong(), "got a synthetic gradient of shape (6, 4) from its synthesizer; "
                                           "expected the trigger's, (6, 8)")):
        sg = dni.RecurrentDNI(synthesizer)
        state = sg.begin(torch.zeros(B, 8))
        with pytest.raises(dni.InterfaceError, match=message.replace("(", r"\(").replace(")", r"\)")):
            sg.backward((state * 2).sum(), state * 2)
    with pytest.raises(dni.InterfaceError, match="needs the state's size per example"):
        dni.RecurrentDNI()
    with pytest.raises(dni.InterfaceError, match="got a synthesizer of type int; expected a module"):
        dni.RecurrentDNI(128)
