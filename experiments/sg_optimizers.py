"""What keeps DNI's synthesizers stable under each optimizer? (docs/design.md)

A user's 2-cut MLP regression (8 -> 64 -> 64 -> 1, tanh, batch-mean MSE, batch 64), trained for
`--steps` steps at a rate where backprop trains it, by backprop and by DNI variants: the default
synthesizer (hidden layer of 1024 with BatchNorm) with one rate for model and synthesizers; the
same with the synthesizers at a tenth of the rate (`dni.param_groups`); with an objective
normalised by the target's mean square; without BatchNorm (`batch_norm=False`); the same under
cDNI (the regression target as context); and "frozen" (sg_lr=0: the synthesizers stay at zero,
so only the last layer learns: the No-Bprop floor). Prints the full-data MSE at the end, mean
over seeds (nan: a seed diverged). Run: python -m experiments.sg_optimizers
"""
import argparse
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import dni
import dni.interface

OPTIMIZERS = {  # name: (class, the model's rate, options), the rates at which backprop trains this model
    "SGD": (torch.optim.SGD, 0.1, {}),
    "SGD+momentum": (torch.optim.SGD, 0.05, {"momentum": 0.9}),
    "Adam": (torch.optim.Adam, 1e-3, {}),
    "AdamW": (torch.optim.AdamW, 1e-3, {}),
}
PROBES = {  # name: (cDNI, synthesizers' rate as a fraction of the model's, BatchNorm, normalised objective)
    "backprop": None, "frozen": (False, 0.0, True, False),
    "dni": (False, 1, True, False), "dni lr/10": (False, 0.1, True, False),
    "dni normalised": (False, 1, True, True), "dni no-BN": (False, 1, False, False),
    "cdni": (True, 1, True, False), "cdni lr/10": (True, 0.1, True, False), "cdni no-BN": (True, 1, False, False),
}


class Net(nn.Module):
    def __init__(self, cuts, conditioned, batch_norm=True):
        super().__init__()
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(8, 64), nn.Tanh()),
                                     nn.Sequential(nn.Linear(64, 64), nn.Tanh()), nn.Linear(64, 1)])
        self.cuts = nn.ModuleList(dni.DNI(shape=(64,), context_features=1 if conditioned else 0,
                                          batch_norm=batch_norm)
                                  for _ in range(2)) if cuts else None
        self.conditioned = conditioned

    def forward(self, x, y):
        h = x
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if self.cuts is not None and i < 2:
                h = self.cuts[i](h, context=y if self.conditioned else None)
        return h


def data(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1024, 8, generator=g)
    y = torch.tanh(x @ torch.randn(8, generator=g) / 3).unsqueeze(1)  # (1024, 1)
    return x, y


def normalised_loss(g_hat, target):
    return F.mse_loss(g_hat, target.detach()) / (target.detach().pow(2).mean() + 1e-12)


def run(method, optimizer, seed, steps):
    torch.manual_seed(seed)
    x, y = data(seed)
    cls, lr, options = OPTIMIZERS[optimizer]
    if PROBES[method] is None:
        model = Net(cuts=False, conditioned=False)
        params = model.parameters()
    else:
        conditioned, factor, batch_norm, normalised = PROBES[method]
        model = Net(cuts=True, conditioned=conditioned, batch_norm=batch_norm)
        params = model.parameters() if factor == 1 else dni.param_groups(model, lr=lr, sg_lr=lr * factor)
    opt = cls(params, lr=lr, **options)
    loss_fn = dni.interface.synthesizer_loss
    if PROBES[method] is not None and normalised:
        dni.interface.synthesizer_loss = normalised_loss
    try:
        g = torch.Generator().manual_seed(1000 + seed)
        for _ in range(steps):
            i = torch.randint(0, len(x), (64,), generator=g)
            loss = F.mse_loss(model(x[i], y[i]), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        dni.interface.synthesizer_loss = loss_fn
    with torch.no_grad():
        return F.mse_loss(model.eval()(x, y), y).item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    x, y = data(0)
    print(f"full-data MSE after {args.steps} steps, mean of {args.seeds} seeds (at the start: "
          f"{F.mse_loss(torch.zeros_like(y), y).item():.3f} for a zero predictor)\n")
    print("| optimizer (lr) | " + " | ".join(PROBES) + " |")
    print("|---" * (len(PROBES) + 1) + "|")
    for optimizer, (_, lr, options) in OPTIMIZERS.items():
        cells = []
        for method in PROBES:
            finals = [run(method, optimizer, seed, args.steps) for seed in range(args.seeds)]
            mean = sum(finals) / len(finals)
            cells.append("nan" if not math.isfinite(mean) or mean > 1e6 else f"{mean:.1e}")
        print(f"| {optimizer} ({lr}) | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
