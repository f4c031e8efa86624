"""The one training loop: backprop or DNI, MLP or CNN, CPU or CUDA.

`run(config)` trains, evaluates after every epoch and writes a run folder:
config.json, command.txt, env.json, metrics.jsonl (a line per step and per epoch),
summary.json, checkpoint.pt and the PNG plots (see `dni.plots`).
"""
import json
import math
import os
import platform
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from dni.cli import main_guard, parse_config
from dni.config import Config
from dni.data import batches, load_data, num_batches
from dni.errors import DNIError
from dni.interface import DNINet, backprop_step, dni_step
from dni.models import MODELS, stage_shapes
from dni.synthesizers import make_synthesizer


def set_seed(seed):
    """Seed every generator the run draws from (weights, dropout-free ops, data order)."""
    random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name):
    """'auto' | 'cpu' | 'cuda' -> torch.device; asking for CUDA without a GPU is an error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise DNIError("--device cuda asked for, but no CUDA GPU is visible; use --device cpu")
    return torch.device(name)


def build_net(config, in_shape, num_classes):
    """The stages of `config.model_type`, with synthesizers when the method is DNI."""
    stages = MODELS[config.model_type].build(in_shape=in_shape, classes=num_classes, depth=config.depth,
                                             hidden=config.hidden, channels=config.channels)
    synthesizers = None
    if config.method == "dni":
        context = num_classes if config.conditioned else 0
        synthesizers = torch.nn.ModuleList(
            make_synthesizer(shape, context_features=context, hidden_layers=config.synth_layers,
                             width=config.synth_width, conv_width=config.synth_channels)
            for shape in stage_shapes(stages, in_shape)[:-1])
    return DNINet(stages=stages, synthesizers=synthesizers, conditioned=config.conditioned,
                  num_classes=num_classes)


def lr_factor(schedule, total_steps):
    """Multiplier of the learning rate at a step, for torch's LambdaLR."""
    if schedule == "constant":
        return lambda step: 1.0
    if schedule == "paper":  # 3e-5 divided by 10 at 300k and 400k of 500k iterations
        return lambda step: 0.1 ** ((step >= 0.6 * total_steps) + (step >= 0.8 * total_steps))
    return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))


class Optimizers:
    """One Adam (and its schedule) per stage and per synthesizer, so each can live on its own worker."""

    def __init__(self, net, config, total_steps):
        factor = lr_factor(config.schedule, total_steps)
        self.stages = [torch.optim.Adam(s.parameters(), lr=config.lr) for s in net.stages]
        self.synthesizers = [torch.optim.Adam(m.parameters(), lr=config.sg_lr)
                             for m in (net.synthesizers or [])]
        self.schedules = [torch.optim.lr_scheduler.LambdaLR(o, factor) for o in self.stages + self.synthesizers]

    def step_schedules(self):
        for schedule in self.schedules:
            schedule.step()

    def state_dict(self):
        return {"stages": [o.state_dict() for o in self.stages],
                "synthesizers": [o.state_dict() for o in self.synthesizers],
                "schedules": [s.state_dict() for s in self.schedules]}


@torch.no_grad()
def evaluate(net, x, y, batch_size=1000):
    """Test accuracy (fraction) of the plain forward pass, in eval mode."""
    was_training = net.training
    net.eval()
    correct = sum((net(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum().item()
                  for i in range(0, len(x), batch_size))
    net.train(was_training)
    return correct / len(x)


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def prepare_run_dir(config):
    """The run folder. A finished run is never overwritten silently: with --out it is refused
    unless --overwrite; with the default name a fresh one (name-2, name-3...) is picked."""
    explicit = bool(config.out)
    run_dir = Path(config.out or Path("results") / config.name)
    if (run_dir / "summary.json").exists() and not config.overwrite:
        if explicit:
            raise DNIError(f"{run_dir} already holds a finished run; pass --overwrite True or another --out")
        base, n = run_dir, 2
        while (run_dir / "summary.json").exists():
            run_dir, n = base.with_name(f"{base.name}-{n}"), n + 1
        print(f"{base} holds a finished run; writing to {run_dir}")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DNIError(f"cannot create run folder {run_dir}: {e.strerror}") from None
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    return run_dir


def write_json(path, obj):
    """Write JSON atomically: a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def record_environment(run_dir, config, device):
    write_json(run_dir / "config.json", config.to_dict())
    (run_dir / "command.txt").write_text(shlex.join([sys.executable] + sys.argv) + "\n")
    write_json(run_dir / "env.json", {
        "git_commit": git_commit(), "torch": torch.__version__, "python": platform.python_version(),
        "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()})


def check_finite(stats, step):
    """Stop at the first non-finite loss, naming where and the lever to pull."""
    if not math.isfinite(stats["loss"]):
        raise DNIError(f"classification loss is {stats['loss']} at step {step}; lower --lr")
    for i, value in enumerate(stats.get("sg_loss", [])):
        if not math.isfinite(value):
            raise DNIError(f"synthesizer loss of stage {i + 1} is {value} at step {step}; lower --sg_lr")


def run(config):
    """Train one run as `config` says; returns its summary dict."""
    device = pick_device(config.device)
    set_seed(config.seed)
    data = load_data(config.dataset, config.data_dir, device)
    run_dir = prepare_run_dir(config)
    record_environment(run_dir, config, device)

    net = build_net(config, data.in_shape, data.num_classes).to(device)
    steps_per_epoch = num_batches(len(data.train_x), config.batch_size)
    if steps_per_epoch == 0:
        raise DNIError(f"--batch_size {config.batch_size} is larger than the training set ({len(data.train_x)})")
    optimizers = Optimizers(net, config, config.num_epochs * steps_per_epoch)
    order = torch.Generator().manual_seed(config.seed)
    print(f"{config.name}: {sum(p.numel() for p in net.stages.parameters()):,} stage parameters, "
          f"{len(net.stages)} stages, {config.num_epochs} epochs on {device} -> {run_dir}")

    step, seconds, test_acc = 0, 0.0, None
    with open(run_dir / "metrics.jsonl", "a") as metrics:
        for epoch in range(1, config.num_epochs + 1):
            net.train()
            start, totals = time.perf_counter(), {"loss": 0.0, "sg_loss": 0.0}
            bar = tqdm(batches(data.train_x, data.train_y, config.batch_size, order), total=steps_per_epoch,
                       desc=f"epoch {epoch}", leave=False, disable=None, mininterval=1.0)
            for x, y in bar:
                if config.method == "dni":
                    out = dni_step(net, optimizers.stages, optimizers.synthesizers, x, y)
                else:
                    out = backprop_step(net, optimizers.stages, x, y)
                optimizers.step_schedules()
                step += 1
                stats = {"kind": "step", "epoch": epoch, "step": step, "loss": out.loss.item()}
                if out.sg_loss:
                    stats["sg_loss"] = [v.item() for v in out.sg_loss]
                    stats["sg_cos"] = [v.item() for v in out.sg_cos]
                check_finite(stats, step)
                metrics.write(json.dumps(stats) + "\n")
                totals["loss"] += stats["loss"]
                totals["sg_loss"] += sum(stats.get("sg_loss", [0.0])) / len(stats.get("sg_loss", [0.0]))
                bar.set_postfix(loss=f"{stats['loss']:.4f}", refresh=False)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds += time.perf_counter() - start  # training time only: evaluation is not timed
            test_acc = evaluate(net, data.test_x, data.test_y)
            line = {"kind": "epoch", "epoch": epoch, "step": step, "train_loss": totals["loss"] / steps_per_epoch,
                    "sg_loss": totals["sg_loss"] / steps_per_epoch, "test_acc": test_acc, "seconds": seconds}
            metrics.write(json.dumps(line) + "\n")
            metrics.flush()
            print(f"epoch {epoch} step {step} loss {line['train_loss']:.4f} sg_loss {line['sg_loss']:.1e} "
                  f"test_acc {test_acc:.4f} {seconds:.1f}s", flush=True)
            save_checkpoint(run_dir / "checkpoint.pt", net, optimizers, config, epoch, step)

    summary = {"test_acc": test_acc, "epochs": config.num_epochs, "steps": step, "seconds": round(seconds, 2),
               "method": config.method, "model_type": config.model_type, "conditioned": config.conditioned,
               "dataset": config.dataset, "seed": config.seed, "device": str(device)}
    write_json(run_dir / "summary.json", summary)
    if config.plot:
        from dni.plots import plot_run
        plot_run(run_dir)
    return summary


def save_checkpoint(path, net, optimizers, config, epoch, step):
    """A dict of state_dicts plus config and position, written atomically."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"net": net.state_dict(), "optimizers": optimizers.state_dict(), "config": config.to_dict(),
                "epoch": epoch, "step": step}, tmp)
    os.replace(tmp, path)


def main(argv=None, *, prog, description, **defaults):
    """The command line of main.py, mlp.py and cnn.py: parse flags, train, exit 2 on bad input."""
    config = parse_config(Config, argv, prog=prog, description=description, defaults=defaults)
    return main_guard(run, config)
