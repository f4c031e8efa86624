"""dni.LocalLoss: local auxiliary losses at a cut (Decoupled Greedy Learning), against autograd.

- the layers below the cut receive exactly d aux_loss / d h, whatever the loss above is;
- the head learns from the auxiliary loss, the layers above from the user's loss only;
- nothing crosses the cut backwards: changing the loss above changes nothing below;
- without the cut (eval mode, or the module removed) training is plain backprop.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import dni
from dni.local import LocalLoss


class Net(nn.Module):
    def __init__(self, cut=True):
        super().__init__()
        self.below = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.cut = LocalLoss(nn.Linear(8, 3)) if cut else None
        self.above = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x, y):
        h = self.below(x)
        if self.cut is not None:
            h = self.cut(h, y)
        return self.above(h)


def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)


def test_below_gets_the_auxiliary_gradient_and_nothing_from_above():
    torch.manual_seed(0)
    net = Net().double()
    x, y = data()
    F.cross_entropy(net(x, y), y).backward()
    got = {n: p.grad.clone() for n, p in net.named_parameters()}
    # Autograd's answer: below and the head from the auxiliary loss alone, above from the user's loss on h.detach()
    ref = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
    h = net.below(x)
    aux = F.cross_entropy(net.cut.head(h), y)
    grads = torch.autograd.grad(aux, list(net.below.parameters()) + list(net.cut.head.parameters()))
    names = [f"below.{n}" for n, _ in net.below.named_parameters()] + [f"cut.head.{n}" for n, _ in
                                                                      net.cut.head.named_parameters()]
    ref.update(dict(zip(names, grads)))
    top = F.cross_entropy(net.above(h.detach()), y)
    ref.update({f"above.{n}": g for (n, _), g in zip(net.above.named_parameters(),
                                                     torch.autograd.grad(top, list(net.above.parameters())))})
    for name in got:
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=1e-12, msg=name)
    assert net.cut.aux_loss is not None and abs(net.cut.aux_loss.item() - aux.item()) < 1e-12


def test_nothing_crosses_the_cut_backwards():
    torch.manual_seed(0)
    net = Net().double()
    x, y = data()
    (1000 * F.cross_entropy(net(x, y), y)).backward()  # a different loss above
    scaled = [p.grad.clone() for p in net.below.parameters()]
    net.zero_grad()
    F.cross_entropy(net(x, y), y).backward()
    for a, b in zip(scaled, net.below.parameters()):
        torch.testing.assert_close(a, b.grad, rtol=0, atol=0)


def test_without_the_cut_training_is_backprop():
    torch.manual_seed(0)
    net = Net().double()
    x, y = data()
    net.eval()  # BatchNorm-free net: eval changes only the cut, which becomes the identity
    F.cross_entropy(net(x, y), y).backward()
    with_cut = {n: p.grad.clone() for n, p in net.named_parameters() if not n.startswith("cut.")}
    torch.manual_seed(0)
    plain = Net(cut=False).double()
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("cut.")})
    F.cross_entropy(plain(x, y), y).backward()
    for name, p in plain.named_parameters():
        torch.testing.assert_close(with_cut[name], p.grad, rtol=0, atol=0)
    assert all(p.grad is None for p in net.cut.parameters())


def test_a_local_loss_cut_trains():
    torch.manual_seed(0)
    net = Net().double()
    x, y = data()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)
    losses = []
    for _ in range(60):
        loss = F.cross_entropy(net(x, y), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
    assert dni.LocalLoss is LocalLoss
