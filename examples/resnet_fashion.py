"""DNI in torchvision's ResNet-18 on Fashion-MNIST: a synthetic gradient between its residual groups.

The model, loss, optimizer and loop are the user's own; DNI is the statements marked `# DNI`:
a `dni.DNI` after layer1, layer2 and layer3, each with a conv synthesizer built from the shape of
its trigger (Jaderberg et al. 2016, section 3.1). Under cDNI the synthesizers also read the label.
The layers below each interface learn from its synthetic gradient, never from the true one.

    python examples/resnet_fashion.py --method backprop     # or dni, cdni; --help for the rest

By default the stem keeps ResNet-18's stride-2 7x7 conv and max pool, so a 28x28 image is 7x7 at
layer1 and an epoch takes minutes on two CPU cores. `--full_resolution` gives the CIFAR-style stem
(3x3 stride-1 conv, no max pool; 28x28 at layer1, about 16 times the cost): the variant for a GPU.
The last 10,000 training images are the validation split, read every epoch; the test set is
evaluated once, at the end. Results: a JSON in --out (docs/examples.md has the table).
"""
import argparse
import json
import os
import platform
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout
import dni  # noqa: E402
from dnilab.data import load_data, split_validation  # noqa: E402
from dnilab.runs import environment  # noqa: E402
from dni.errors import DNIError  # noqa: E402

MEAN, STD = 0.286, 0.353  # Fashion-MNIST's training pixels


class ResNet18(nn.Module):
    """torchvision's ResNet-18 for 1x28x28 images, with a DNI after layer1, layer2 and layer3
    (method "dni" or "cdni"; "backprop": none). In eval mode the interfaces are the identity."""

    def __init__(self, *, method="backprop", full_resolution=False, classes=10):
        super().__init__()
        self.net = torchvision.models.resnet18(num_classes=classes)
        if full_resolution:  # 28x28 at layer1
            self.net.conv1 = nn.Conv2d(1, 64, kernel_size=3, stride=1, padding=1, bias=False)
            self.net.maxpool = nn.Identity()
        else:  # ResNet-18's own stem, for one channel: 28 -> 14 -> 7 at layer1
            self.net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        side = 28 if full_resolution else 7
        shapes = [(64, side, side), (128, (side + 1) // 2, (side + 1) // 2), (256, (side + 3) // 4, (side + 3) // 4)]
        self.classes, self.conditioned = classes, method == "cdni"
        self.interfaces = nn.ModuleList(  # DNI: one interface per cut, a conv synthesizer for its (C, H, W)
            dni.DNI(shape=s, context_features=classes if self.conditioned else 0) for s in shapes
        ) if method != "backprop" else None

    def forward(self, x, y=None):  # DNI (cDNI: the label)
        n = self.net
        h = n.maxpool(n.relu(n.bn1(n.conv1(x))))  # (B, 64, 7, 7)
        context = F.one_hot(y, self.classes) if self.conditioned and y is not None else None  # DNI (cDNI)
        for i, layer in enumerate([n.layer1, n.layer2, n.layer3, n.layer4]):
            h = layer(h)
            if self.interfaces is not None and i < 3:
                h = self.interfaces[i](h, context=context)  # DNI
        return n.fc(torch.flatten(n.avgpool(h), 1))  # (B, classes)


@torch.no_grad()
def accuracy(model, x, y, batch_size=1000):
    model.eval()
    correct = sum((model((x[i:i + batch_size] - MEAN) / STD).argmax(1) == y[i:i + batch_size]).sum().item()
                  for i in range(0, len(x), batch_size))
    model.train()
    return correct / len(x)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", default="cdni", choices=["backprop", "dni", "cdni"])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam, cosine decay to 0 over the run")
    p.add_argument("--full_resolution", action="store_true", help="3x3 stride-1 stem, no max pool (for a GPU)")
    p.add_argument("--subset", type=int, default=0, help="use the first N images of each split (a quick look; 0: all)")
    p.add_argument("--data", default="data", help="where Fashion-MNIST is (copied from Debian's package or downloaded)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="results/examples", help="folder for resnet_fashion_<method>.json")
    args = p.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1 or args.lr <= 0 or args.subset < 0:
        p.error("--epochs, --batch_size and --lr must be positive, --subset at least 0")

    torch.manual_seed(args.seed)
    try:
        data = split_validation(load_data("fashion_mnist", args.data, args.device), 10000)
    except DNIError as error:
        sys.exit(f"error: {error}")
    n = args.subset or None
    train_x, train_y = data.train_x[:n], data.train_y[:n]  # (50000, 1, 28, 28), (50000,)
    model = ResNet18(method=args.method, full_resolution=args.full_resolution).to(args.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)  # holds the synthesizers too
    steps = args.epochs * (len(train_x) // args.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    generator = torch.Generator(device="cpu").manual_seed(args.seed)

    curve, train_seconds = [], 0.0
    for epoch in range(1, args.epochs + 1):
        start, losses = time.perf_counter(), []
        order = torch.randperm(len(train_x), generator=generator).to(args.device)
        for i in range(0, len(order) - args.batch_size + 1, args.batch_size):  # full batches only
            x, y = (train_x[order[i:i + args.batch_size]] - MEAN) / STD, train_y[order[i:i + args.batch_size]]
            loss = F.cross_entropy(model(x, y), y)  # DNI (cDNI: the label)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        train_seconds += time.perf_counter() - start
        val_acc = accuracy(model, data.val_x[:n], data.val_y[:n])
        curve.append({"epoch": epoch, "train_loss": sum(losses) / len(losses), "first_loss": losses[0],
                      "val_acc": val_acc, "train_seconds": round(train_seconds, 1)})
        print(f"epoch {epoch} loss {curve[-1]['train_loss']:.4f} val_acc {val_acc:.4f} {train_seconds:.0f}s", flush=True)
    test_acc = accuracy(model, data.test_x[:n], data.test_y[:n])  # once, at the end
    print(f"test_acc {test_acc:.4f}")

    result = {"example": "resnet_fashion", "config": vars(args), "command": " ".join(["python"] + sys.argv),
              "curve": curve, "val_acc": curve[-1]["val_acc"], "test_acc": test_acc,
              "train_seconds": round(train_seconds, 1), "torch": torch.__version__,
              "hardware": hardware(args.device), "env": environment(torch.device(args.device))}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"resnet_fashion_{args.method}.json"), "w") as f:
        json.dump(result, f, indent=1)


def hardware(device):
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{platform.machine()} cpu, {torch.get_num_threads()} threads"


if __name__ == "__main__":
    main()
