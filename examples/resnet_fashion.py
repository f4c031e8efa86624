"""DNI in torchvision's ResNet-18 on Fashion-MNIST: a synthetic gradient between its residual groups.

The model, loss, optimizer and loop are the user's own; DNI is the statements marked `# DNI`:
by default a `dni.DNI` after layer1, layer2 and layer3 (`--cuts 1`: after layer2 alone, the middle),
each with a conv synthesizer built from the shape of its trigger (Jaderberg et al. 2016, section
3.1). Under cDNI the synthesizers also read the label. The layers below each interface learn from
its synthetic gradient, never from the true one. Under `--method local` each cut is a
`dni.LocalLoss` instead (Decoupled Greedy Learning, Belilovsky et al. 2020): a small auxiliary
classifier, global average pooling and one linear layer (C * 10 + 10 weights), reads the cut's
activation; the layers below learn from its cross-entropy alone, the layers above read the
activation detached. The synthesizers' and heads' sizes and the synthesizers' rate are flags
(--synth_width, --synth_layers, --sg_lr, --head_layers, --head_width) that
experiments/examples_search.py chooses on validation; their defaults are the settings above.

    python examples/resnet_fashion.py --method backprop     # or dni, cdni, local; --help for the rest

By default the stem keeps ResNet-18's stride-2 7x7 conv and max pool, so a 28x28 image is 7x7 at
layer1 and an epoch takes minutes on two CPU cores. `--full_resolution` gives the CIFAR-style stem
(3x3 stride-1 conv, no max pool; 28x28 at layer1, about 16 times the cost): the variant for a GPU.
The last 10,000 training images are the validation split (`dnilab.data.split_validation`), read
every epoch; the test set is evaluated once, at the end. The run's folder (--out) holds
config.json, command.txt, env.json, metrics.jsonl (one line per epoch) and summary.json
(dnilab/example_runs.py).
"""
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout
import dni  # noqa: E402
from dni.errors import DNIError  # noqa: E402
from dnilab.cli import parse_config  # noqa: E402
from dnilab.data import load_data, split_validation  # noqa: E402
from dnilab.example_runs import (EXAMPLE_METHODS, check_sg_lr, cut_positions, finish_run, log_metrics,  # noqa: E402
                                 parameter_groups, start_run)

MEAN, STD = 0.286, 0.353  # Fashion-MNIST's training pixels
VAL_SIZE = 10_000  # the last training images, held out as the validation split


def _opt(default, help, **meta):
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class Settings:
    """The example's settings; each is a flag (`--epochs 10`)."""
    method: str = _opt("cdni", "how the layers below a cut learn", choices=EXAMPLE_METHODS)
    cuts: int = _opt(0, "cuts between residual groups: 1 is after layer2; 0, after layer1, layer2 and layer3")
    epochs: int = _opt(3, "passes over the 50,000 training images", positive=True)
    batch_size: int = _opt(128, "images per step", positive=True)
    lr: float = _opt(1e-3, "Adam, cosine decay to 0 over the run", positive=True)
    synth_width: int = _opt(64, "channels of each conv synthesizer's hidden layers (dni, cdni); 0: linear")
    synth_layers: int = _opt(1, "hidden layers of each synthesizer (dni, cdni); 0: linear")
    sg_lr: float = _opt(0.0, "the synthesizers' Adam rate, same cosine decay (dni, cdni; 0: --lr, in one "
                             "parameter group with the rest)")
    head_layers: int = _opt(0, "hidden layers (3x3 conv, BatchNorm, ReLU) of each local head before its pool and "
                               "linear layer (local; 0: pool and linear alone)")
    head_width: int = _opt(256, "channels of each local head's hidden layers", positive=True)
    full_resolution: bool = _opt(False, "3x3 stride-1 stem, no max pool (for a GPU)")
    subset: int = _opt(0, "use the first N images of each split (a quick look; 0: all)")
    data: str = _opt("data", "where Fashion-MNIST is (copied from Debian's package or downloaded)")
    seed: int = _opt(0, "seed of the initialisation and of the data order")
    device: str = _opt("cuda" if torch.cuda.is_available() else "cpu", "torch device")
    out: str = _opt("", "the run's folder (default: results/examples/resnet_fashion_<method>[_cuts<cuts>]_seed<seed>)")
    overwrite: bool = _opt(False, "replace a finished run in --out")
    eval_test: bool = _opt(True, "measure the test split at the end (the search does not: it reads validation alone)")

    def __post_init__(self):
        if min(self.subset, self.cuts, self.synth_width, self.synth_layers, self.head_layers) < 0:
            raise DNIError("--subset, --cuts, --synth_width, --synth_layers and --head_layers must be at least 0")
        check_sg_lr(self.method, self.sg_lr)
        if self.method != "backprop":
            cut_positions(4, self.cuts)  # refuses cuts the four residual groups cannot hold


class ResNet18(nn.Module):
    """torchvision's ResNet-18 for 1x28x28 images, cut between its residual groups: a `dni.DNI` at
    each cut (method "dni" or "cdni"), a `dni.LocalLoss` with a pooled linear classifier ("local"),
    or none ("backprop"). `cuts`: how many, spread evenly over the four groups (`cut_positions`; 0:
    after layer1, layer2 and layer3). `synth_layers` hidden layers of `synth_width` channels per
    synthesizer (either 0: linear); `head_layers` hidden conv layers of `head_width` channels in
    each local head. In eval mode the cuts are the identity."""

    def __init__(self, *, method="backprop", cuts=0, full_resolution=False, classes=10, synth_width=64,
                 synth_layers=1, head_width=256, head_layers=0):
        super().__init__()
        self.net = torchvision.models.resnet18(num_classes=classes)
        if full_resolution:  # 28x28 at layer1
            self.net.conv1 = nn.Conv2d(1, 64, kernel_size=3, stride=1, padding=1, bias=False)
            self.net.maxpool = nn.Identity()
        else:  # ResNet-18's own stem, for one channel: 28 -> 14 -> 7 at layer1
            self.net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        side = 28 if full_resolution else 7
        shapes = [(64, side, side), (128, (side + 1) // 2, (side + 1) // 2), (256, (side + 3) // 4, (side + 3) // 4)]
        self.cut_after = cut_positions(4, cuts) if method != "backprop" else ()  # groups below each cut
        self.classes, self.method = classes, method
        if method in ("dni", "cdni"):  # DNI: one interface per cut, a conv synthesizer for its (C, H, W)
            self.cuts = nn.ModuleList(dni.DNI(shape=shapes[i - 1], context_features=classes if method == "cdni" else 0,
                                              conv_width=synth_width, hidden_layers=synth_layers if synth_width else 0)
                                      for i in self.cut_after)
        elif method == "local":
            self.cuts = nn.ModuleList(dni.LocalLoss(local_head(shapes[i - 1][0], classes, head_width, head_layers))
                                      for i in self.cut_after)
        else:
            self.cuts = nn.ModuleList()

    def forward(self, x, y=None):  # DNI (cDNI and local: the label)
        n = self.net
        h = n.maxpool(n.relu(n.bn1(n.conv1(x))))  # (B, 64, 7, 7)
        cuts = dict(zip(self.cut_after, self.cuts))  # groups below -> its cut
        context = F.one_hot(y, self.classes) if self.method == "cdni" and y is not None else None  # DNI (cDNI)
        for i, layer in enumerate([n.layer1, n.layer2, n.layer3, n.layer4], 1):
            h = layer(h)
            if i in cuts:
                h = cuts[i](h, y) if self.method == "local" else cuts[i](h, context=context)  # DNI
        return n.fc(torch.flatten(n.avgpool(h), 1))  # (B, classes)


def local_head(channels, classes, width, layers):
    """A local head, (B, C, H, W) -> (B, classes): `layers` x (3x3 conv of `width` channels, BatchNorm, ReLU),
    then a global average pool and a linear layer (layers=0: pool and linear alone, C * classes + classes weights)."""
    hidden = []
    for _ in range(layers):
        hidden += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        channels = width
    return nn.Sequential(*hidden, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes))


@torch.no_grad()
def accuracy(model, x, y, batch_size=1000):
    model.eval()
    correct = sum((model((x[i:i + batch_size] - MEAN) / STD).argmax(1) == y[i:i + batch_size]).sum().item()
                  for i in range(0, len(x), batch_size))
    model.train()
    return correct / len(x)


def main(argv=None):
    settings = parse_config(Settings, argv, description=__doc__.split("\n")[0])
    try:
        data = split_validation(load_data("fashion_mnist", settings.data, settings.device), VAL_SIZE)
        if len(data.train_x[:settings.subset or None]) < settings.batch_size:
            raise DNIError(f"--batch_size {settings.batch_size} is larger than the training set")
        run_dir = start_run(settings, torch.device(settings.device), "resnet_fashion")
    except DNIError as error:
        sys.exit(f"error: {error}")
    print(f"resnet_fashion {settings.method}, {settings.epochs} epochs on {settings.device} -> {run_dir}", flush=True)
    summary = train(settings, data, run_dir)
    test = f" test_acc {summary['test_acc']:.4f}" if settings.eval_test else ""
    print(f"val_acc {summary['val_acc']:.4f}" + test)


def build_model(s):
    """The model that settings `s` train, on s.device."""
    return ResNet18(method=s.method, cuts=s.cuts, full_resolution=s.full_resolution, synth_width=s.synth_width,
                    synth_layers=s.synth_layers, head_width=s.head_width, head_layers=s.head_layers).to(s.device)


def train(settings, data, run_dir):
    """Train, measuring validation accuracy after every epoch (metrics.jsonl) and test accuracy
    once at the end (unless eval_test is False: test_acc None); returns the summary written to summary.json."""
    s = settings
    torch.manual_seed(s.seed)
    n = s.subset or None
    train_x, train_y = data.train_x[:n], data.train_y[:n]  # (50000, 1, 28, 28), (50000,)
    model = build_model(s)
    optimizer = torch.optim.Adam(parameter_groups(model, s.lr, s.sg_lr), lr=s.lr)  # synthesizers, local heads too
    steps = s.epochs * (len(train_x) // s.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    generator = torch.Generator(device="cpu").manual_seed(s.seed)

    train_seconds, step = 0.0, 0
    for epoch in range(1, s.epochs + 1):
        start, losses, aux_losses = time.perf_counter(), [], []
        order = torch.randperm(len(train_x), generator=generator).to(s.device)
        for i in range(0, len(order) - s.batch_size + 1, s.batch_size):  # full batches only
            x, y = (train_x[order[i:i + s.batch_size]] - MEAN) / STD, train_y[order[i:i + s.batch_size]]
            loss = F.cross_entropy(model(x, y), y)  # DNI (cDNI, local: the label)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            if s.method == "local":
                aux_losses.append([cut.aux_loss.item() for cut in model.cuts])
            step += 1
        if s.device.startswith("cuda"):
            torch.cuda.synchronize()
        train_seconds += time.perf_counter() - start
        val_acc = accuracy(model, data.val_x[:n], data.val_y[:n])
        line = {"kind": "epoch", "epoch": epoch, "step": step, "train_loss": sum(losses) / len(losses),
                "first_loss": losses[0], "val_acc": val_acc, "seconds": round(train_seconds, 2)}
        if aux_losses:  # each local head's own loss
            line["aux_loss"] = [sum(col) / len(col) for col in zip(*aux_losses)]
        log_metrics(run_dir, line)
        print(f"epoch {epoch} loss {line['train_loss']:.4f} val_acc {val_acc:.4f} {train_seconds:.0f}s", flush=True)
    test_acc = accuracy(model, data.test_x[:n], data.test_y[:n]) if s.eval_test else None  # once, at the end
    return finish_run(run_dir, {
        "example": "resnet_fashion", "method": s.method, "cuts": len(model.cut_after), "seed": s.seed,
        "epochs": s.epochs, "steps": step, "val_acc": val_acc, "test_acc": test_acc,
        "seconds": round(train_seconds, 2), "device": s.device,
        "parameters": sum(p.numel() for name, p in model.named_parameters() if not name.startswith("cuts.")),
        "cut_parameters": sum(p.numel() for p in model.cuts.parameters())})  # synthesizers or local heads


if __name__ == "__main__":
    main()
