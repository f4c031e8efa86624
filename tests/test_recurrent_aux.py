"""DNI + Aux (paper, section 3.2) on the public recurrent form, dni.RecurrentDNI(aux_weight=...):
the core predicts the synthetic gradient its window's end will receive."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dni

H, B, T = 6, 5, 4


class Core(nn.Module):
    """An LSTM, a readout and an auxiliary head predicting the (h, c) synthetic gradient."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, H)
        self.readout = nn.Linear(H, 2)
        self.aux = nn.Linear(H, 2 * H)

    def forward(self, x, state):
        out, state = self.lstm(x, state)
        return self.readout(out), state, self.aux(out)


def window(core, sg, x, y, state, aux_weight):
    """One window's backward with this aux weight; returns everyone's gradients and what sg kept."""
    sg.aux_weight = aux_weight
    core.zero_grad(set_to_none=True)
    sg.zero_grad(set_to_none=True)
    start = sg.begin(state)
    logits, end, aux = core(x, start)
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum") / B
    sg.backward(loss, end, aux=aux)
    grads = {name: p.grad.clone() if p.grad is not None else None for name, p in core.named_parameters()}
    synth = [p.grad.clone() for p in sg.parameters()]
    return grads, synth, sg.target.clone(), sg.synthetic.clone()


def setup(seed=0):
    torch.manual_seed(seed)
    core, sg = Core(), dni.RecurrentDNI(features=2 * H)
    with torch.no_grad():  # a synthesizer that predicts something, so the auxiliary target is not zero
        for p in sg.parameters():
            p.normal_(0, 0.3)
    x, y = torch.randn(T, B, 3), torch.randint(0, 2, (T, B))
    state = (torch.randn(1, B, H), torch.randn(1, B, H))
    return core, sg, x, y, state


def test_the_auxiliary_target_is_the_boundary_prediction_of_the_same_window():
    core, sg, x, y, state = setup()
    with torch.no_grad():
        _, (h, c), aux = core(x, state)
        g_end = sg.synthesizer(torch.cat([h[0], c[0]], dim=1))  # M at this window's end, per stream
    window(core, sg, x, y, state, aux_weight=0.5)
    torch.testing.assert_close(sg.synthetic, g_end)  # (one pass over start and end: not bit for bit)
    expected = 0.5 * F.mse_loss(aux, g_end.expand_as(aux))
    assert sg.aux_loss == pytest.approx(float(expected), rel=1e-6)


def test_its_gradient_reaches_the_core_and_nothing_else():
    core, sg, x, y, state = setup()
    plain, plain_synth, plain_target, _ = window(core, sg, x, y, state, aux_weight=0.0)
    aux, aux_synth, aux_target, g_end = window(core, sg, x, y, state, aux_weight=0.5)
    # M's target and M's own gradients do not see the auxiliary loss
    assert torch.equal(aux_target, plain_target)
    assert all(torch.equal(a, b) for a, b in zip(aux_synth, plain_synth))
    # the core's gradients gain exactly the auxiliary loss's
    core.zero_grad(set_to_none=True)
    start = tuple(s.detach() for s in state)
    _, _, pred = core(x, start)
    (0.5 * F.mse_loss(pred, g_end.expand_as(pred))).backward()
    for name, p in core.named_parameters():
        extra = torch.zeros_like(p) if p.grad is None else p.grad
        base = torch.zeros_like(p) if plain[name] is None else plain[name]
        torch.testing.assert_close(aux[name], base + extra, rtol=1e-5, atol=1e-7)
    assert plain["aux.weight"] is None and aux["aux.weight"].abs().sum() > 0


def test_with_weight_zero_it_is_plain_dni_bit_for_bit():
    core, sg, x, y, state = setup()
    with_aux = window(core, sg, x, y, state, aux_weight=0.0)
    core.zero_grad(set_to_none=True)
    sg.zero_grad(set_to_none=True)
    start = sg.begin(state)
    logits, end, _ = core(x, start)
    sg.backward(F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum") / B, end)  # no aux at all
    for name, p in core.named_parameters():
        assert (p.grad is None and with_aux[0][name] is None) or torch.equal(p.grad, with_aux[0][name]), name
    assert all(torch.equal(p.grad, g) for p, g in zip(sg.parameters(), with_aux[1]))


def test_aux_of_the_wrong_shape_is_named_in_one_sentence():
    core, sg, x, y, state = setup()
    sg.aux_weight = 0.1
    start = sg.begin(state)
    logits, end, aux = core(x, start)
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    with pytest.raises(dni.InterfaceError, match=r"aux predictions of shape \(4, 5, 11\); expected"):
        sg.backward(loss, end, aux=aux[..., :-1])


def test_copy_runs_take_dni_plus_aux_and_name_it(tmp_path):
    from dnilab.recurrent import RecurrentConfig, run
    config = RecurrentConfig(task="copy", truncation=3, steps=40, log_every=20, hidden=16, min_scored=50,
                             aux_weight=0.1, out=str(tmp_path))
    assert config.name == "copy_T3_dni_aux0.1_s0"
    summary = run(config, log=lambda _: None)
    assert summary["config"]["aux_weight"] == 0.1 and (tmp_path / config.name / "summary.json").exists()
    with pytest.raises(Exception, match="aux_weight"):
        RecurrentConfig(dni=False, aux_weight=0.1)
