"""Recurrent DNI: synthetic gradients at the boundaries of truncated BPTT windows (paper, section 3.2).

An LSTM core reads B streams of back-to-back episodes (dni.copy_tasks; its state
is reset where an episode begins; the streams are staggered so that a window
mixes phases of the episodes) and is trained on windows of T steps, wherever
their boundaries fall in the episodes. Within a window, ordinary BPTT. Truncated BPTT stops there: nothing
from the future reaches the window. With DNI, a synthesizer M reads the state
s = [h, c] at the window's end and predicts the gradient of all future loss
w.r.t. it; that synthetic gradient, scaled by `sg_factor`, is backpropagated
into the window with the window's own loss. The scale is the paper's 0.1 by
default; 1 is the undiscounted future loss, finite because the state, and so the
gradient, is reset where each episode begins (docs/recurrent.md compares the
factors, with their tables and commands). The gradient that reaches the
window's start state is the bootstrapped target for M at that state, which is
where the previous window ended (paper, Figure 3 and section 3.2).

Scale convention (that of dni.synthesizers): M predicts per-example gradients,
i.e. gradients of the batch-summed loss. The parameters follow the mean over the
batch of each stream's loss summed over the window's steps, so the objective
backpropagated is (sum of losses + sg_factor * <s_end, g_hat_end>) / B and the
target is B times the gradient w.r.t. the start state. Because the target
includes the scaled synthetic gradient, M learns a gradient of the future loss
in which each further window counts sg_factor times less (the paper's scheme;
with factor 1, all of the episode's future loss). `sg_discount` sets that
discount apart from the scale the core is sent: the target then counts the
synthetic gradient M sent back sg_discount times (one more backward, of
<s_end, g_hat_end> to the start state, computes it).

The Aux variant of the paper (also predicting future synthetic gradients) is not
implemented.
"""
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from dni.copy_tasks import IGNORE, TASKS, Curriculum, EpisodeStream, make_task
from dni.errors import DNIError
from dni.synthesizers import DenseSynthesizer, synthesizer_loss
from dni.runs import command_line, environment, save_diff, write_json
from dni.parts import pick_device, set_seed

DEVICES = ("cpu", "cuda", "auto")
SG_FACTOR = 0.1  # the paper's scale of the synthetic gradient


def factor_tag(sg_factor, sg_discount=None):
    """How run folders and table files name a synthetic-gradient scale: "" for the paper's, else "_f<factor>";
    then "_d<discount>" for a target discount of its own."""
    factor = "" if sg_factor == SG_FACTOR else f"_f{sg_factor:g}"
    return factor + ("" if sg_discount is None else f"_d{sg_discount:g}")


@dataclass
class RecurrentConfig:
    """Every default of `python rnn.py`, defined once."""
    task: str = field(default="copy", metadata=dict(help="task", choices=TASKS))
    truncation: int = field(default=3, metadata=dict(help="T: steps per BPTT window", positive=True))
    dni: bool = field(default=True, metadata=dict(help="synthetic gradients at window ends; False: truncated BPTT"))
    sg_factor: float = field(default=SG_FACTOR, metadata=dict(help="scale of the synthetic gradient",
                                                              positive=True))
    sg_discount: Optional[float] = field(default=None, metadata=dict(
        help="how much the synthesizer's target counts the next window's synthetic gradient "
             "(default: sg_factor, the paper's scheme)", positive=True))
    hidden: int = field(default=128, metadata=dict(help="LSTM units", positive=True))
    symbols: int = field(default=8, metadata=dict(help="alphabet size", positive=True))
    max_repeats: int = field(default=3, metadata=dict(help="repeat_copy: R drawn from 1..max_repeats", positive=True))
    length: int = field(default=0, metadata=dict(help="train at this episode length N only (no curriculum); "
                                                      "0: the curriculum, from N = 1"))
    batch_size: int = field(default=256, metadata=dict(help="parallel streams", positive=True))
    stagger: int = field(default=64, metadata=dict(help="delay each stream by 0..stagger-1 steps, so that windows "
                                                        "mix phases of the episodes; 0: streams in step"))
    lr: float = field(default=3e-3, metadata=dict(help="Adam learning rate of the core", positive=True))
    sg_lr: float = field(default=1e-3, metadata=dict(help="Adam learning rate of the synthesizer", positive=True))
    clip: float = field(default=1.0, metadata=dict(help="max gradient norm of the core, 0: no clipping"))
    steps: int = field(default=15000, metadata=dict(help="training windows (= parameter updates)", positive=True))
    threshold: float = field(default=0.15, metadata=dict(help="solved below this many bits per step", positive=True))
    min_scored: int = field(default=2000, metadata=dict(help="scored steps per curriculum decision", positive=True))
    seed: int = field(default=0, metadata=dict(help="seed of the weights and of the data"))
    device: str = field(default="cpu", metadata=dict(help="device", choices=DEVICES))
    threads: int = field(default=1, metadata=dict(help="torch CPU threads", positive=True))
    log_every: int = field(default=500, metadata=dict(help="windows between log lines", positive=True))
    out: str = field(default="results/rnn", metadata=dict(help="parent folder of the run folder"))
    name: str = field(default="", metadata=dict(help="run folder name "
                                                     "(default: task_T<T>_<bptt|dni[_f<sg_factor>][_d<sg_discount>]>[_N<length>]_s<seed>)"))

    def __post_init__(self):
        if self.clip < 0:
            raise DNIError(f"--clip must be >= 0, got {self.clip}")
        if self.length < 0:
            raise DNIError(f"--length must be >= 0, got {self.length}")
        if self.stagger < 0:
            raise DNIError(f"--stagger must be >= 0, got {self.stagger}")
        if self.sg_discount == self.sg_factor:
            self.sg_discount = None                       # the paper's scheme, however it was asked for
        if not self.name:
            factor = factor_tag(self.sg_factor, self.sg_discount) if self.dni else ""
            fixed = f"_N{self.length}" if self.length else ""
            self.name = f"{self.task}_T{self.truncation}_{'dni' if self.dni else 'bptt'}{factor}{fixed}_s{self.seed}"
        if "/" in self.name or self.name in (".", ".."):
            raise DNIError(f"--name must be a plain folder name, got {self.name!r}")


class RecurrentCore(nn.Module):
    """An LSTM and a linear readout. The state is one tensor s = [h, c] of shape (B, 2 * hidden);
    it is reset to zero at the first step of each episode, stream by stream (so the gradient stops there too).
    The forget gate's bias starts at `forget_bias` (1: remember by default, Jozefowicz et al. 2015)."""

    def __init__(self, *, input_features, hidden, classes, forget_bias=1.0):
        super().__init__()
        self.hidden = hidden
        self.lstm = nn.LSTM(input_features, hidden)
        self.readout = nn.Linear(hidden, classes)
        with torch.no_grad():  # gates are stacked (input, forget, cell, output)
            self.lstm.bias_ih_l0[hidden:2 * hidden].fill_(forget_bias)
            self.lstm.bias_hh_l0[hidden:2 * hidden].zero_()

    def initial_state(self, batch_size, device=None):
        """The zero state s_0, (B, 2 * hidden)."""
        return torch.zeros(batch_size, 2 * self.hidden, device=device)

    def forward(self, x, state, starts):
        """x (T, B, F), state (B, 2H), starts (T, B) bool on the CPU, True where a stream's episode
        begins -> logits (T, B, classes), state after the T steps (B, 2H)."""
        T = x.shape[0]
        resets = starts.any(dim=1)                                                 # (T,)
        bounds = [0] + [t for t in resets.nonzero().flatten().tolist() if t > 0] + [T]
        keep = (~starts).to(x.device, x.dtype)[..., None]                          # (T, B, 1)
        h, c = (part[None].contiguous() for part in state.chunk(2, dim=1))   # (1, B, H) each
        outputs = []
        for a, b in zip(bounds[:-1], bounds[1:]):                           # runs of steps without a reset
            if resets[a]:
                h, c = h * keep[a], c * keep[a]
            out, (h, c) = self.lstm(x[a:b], (h, c))                         # (b - a, B, H)
            outputs.append(out)
        return self.readout(torch.cat(outputs)), torch.cat([h[0], c[0]], dim=1)


class RecurrentDNI(nn.Module):
    """The core and, when `dni`, the synthesizer of its state: linear, as in the paper (section 3.2),
    zero-initialised so that its first output is 0. (A hidden layer would bring
    DenseSynthesizer's BatchNorm, whose batch here is B states all at the same step of their episodes.)"""

    def __init__(self, *, input_features, hidden, classes, dni=True):
        super().__init__()
        self.core = RecurrentCore(input_features=input_features, hidden=hidden, classes=classes)
        self.synthesizer = DenseSynthesizer(features=2 * hidden, hidden_layers=0) if dni else None


@dataclass
class Window:
    """What one window's backward leaves behind.

    ce: per-step cross-entropy in nats (T, B), 0 on unscored steps; end_state: the
    state at the window's end (B, 2H), detached, where the next window starts.
    With DNI: synthetic (B, 2H), M's output at the window's end (unscaled);
    target (B, 2H), the bootstrapped target at the window's start; sg_loss.
    """
    ce: torch.Tensor
    end_state: torch.Tensor
    synthetic: torch.Tensor = None
    target: torch.Tensor = None
    sg_loss: torch.Tensor = None


def window_backward(model, x, y, starts, state, *, sg_factor=0.1, sg_discount=None):
    """Gradients of one truncation window, accumulated into .grad (the caller zeroes and steps).

    x (T, B, F) inputs, y (T, B) targets (IGNORE where unscored), starts (T,)
    episode starts (on the CPU), state (B, 2H) at the window's start. In this order:
      1. forward T steps of the core from the state, detached: nothing flows back
         past the window's start (truncated BPTT);
      2. with DNI, the synthesizer reads the start and end states (detached
         triggers) in one pass: g_end is the synthetic gradient for this window's
         end, g_start its prediction at the start, where the previous window ended;
      3. backward (window loss + sg_factor * <s_end, g_end>) / B: the core's
         gradients and the gradient w.r.t. the start state;
      4. with DNI, the synthesizer learns: synthesizer_loss(g_start, target), where
         target = B * d objective / d s_start (per example, as M predicts).
    Without DNI this is truncated BPTT (steps 1 and 3, no synthetic term).
    """
    B = x.shape[1]
    dni = model.synthesizer is not None
    start = state.detach().requires_grad_(dni)
    logits, end = model.core(x, start, starts)                                        # (T, B, C), (B, 2H)
    ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE,
                         reduction="none").view_as(y)                            # (T, B)
    objective = ce.sum()
    if not dni:
        (objective / B).backward()
        return Window(ce=ce.detach(), end_state=end.detach())
    g_start, g_end = model.synthesizer(torch.cat([start, end]).detach()).split(B)  # (B, 2H) each
    synthetic = (end * g_end.detach()).sum()
    objective = objective + sg_factor * synthetic
    rescale = sg_discount is not None and sg_discount != sg_factor
    (objective / B).backward(retain_graph=rescale)
    # (B, 2H); no gradient reaches the start state when the window begins with new episodes
    target = torch.zeros_like(start) if start.grad is None else start.grad * B
    if rescale and start.grad is not None:
        carried, = torch.autograd.grad(synthetic, start, allow_unused=True)     # J^T g_end: what M sent back
        if carried is not None:
            target = target + (sg_discount - sg_factor) * carried
    sg_loss = synthesizer_loss(g_start, target)
    sg_loss.backward()
    return Window(ce=ce.detach(), end_state=end.detach(), synthetic=g_end.detach(), target=target,
                  sg_loss=sg_loss.detach())


def build(config, device):
    """The task, the model on `device` and its optimizer, as `config` says."""
    task = make_task(config.task, symbols=config.symbols, max_repeats=config.max_repeats)
    model = RecurrentDNI(input_features=task.input_features, hidden=config.hidden, classes=task.classes,
                         dni=config.dni).to(device)
    groups = [dict(params=model.core.parameters(), lr=config.lr)]
    if model.synthesizer is not None:
        groups.append(dict(params=model.synthesizer.parameters(), lr=config.sg_lr))
    optimizer = torch.optim.Adam(groups, foreach=True)
    return task, model, optimizer


def train(config, *, log=print, metrics=None):
    """Train on the stream for config.steps windows under the curriculum (or at config.length);
    returns the summary dict.

    `metrics`, if given, receives one dict per event: kind "log" every log_every
    windows (error averaged since the last one) and kind "length" when N grows.
    """
    torch.set_num_threads(config.threads)
    device = pick_device(config.device)
    set_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)  # the data's own stream
    task, model, optimizer = build(config, device)
    stream = EpisodeStream(task=task, batch_size=config.batch_size, generator=generator, stagger=config.stagger)
    curriculum = Curriculum(threshold=config.threshold, min_scored=config.min_scored,
                            length=config.length or 1, grow=not config.length)
    core_params = list(model.core.parameters())
    state = model.core.initial_state(config.batch_size, device)
    bits, scored, sg_loss = 0.0, 0, 0.0  # since the last log line
    t0 = time.perf_counter()
    for step in tqdm(range(1, config.steps + 1), disable=not sys.stderr.isatty(), leave=False):
        x, y, starts, lengths = stream.read(config.truncation, curriculum.length)   # (T, B, F), 3 x (T, B)
        optimizer.zero_grad(set_to_none=True)
        window = window_backward(model, x.to(device), y.to(device), starts, state, sg_factor=config.sg_factor,
                                 sg_discount=config.sg_discount)
        if config.clip > 0:
            nn.utils.clip_grad_norm_(core_params, config.clip)
        optimizer.step()
        state = window.end_state

        step_bits = window.ce.cpu() / math.log(2)                                   # (T, B)
        current = (lengths == curriculum.length) & (y != IGNORE)           # (T, B) scored at length N
        bits += float(step_bits.sum())
        scored += int((y != IGNORE).sum())
        sg_loss += 0.0 if window.sg_loss is None else float(window.sg_loss)
        if curriculum.record(float(step_bits[current].sum()), int(current.sum())) and metrics is not None:
            metrics(dict(kind="length", step=step, length=curriculum.length, solved=curriculum.solved))
        if step % config.log_every == 0:
            row = dict(kind="log", step=step, length=curriculum.length, solved=curriculum.solved,
                       bits=bits / max(scored, 1), sg_loss=sg_loss / config.log_every,
                       time=round(time.perf_counter() - t0, 2))
            if metrics is not None:
                metrics(row)
            log(f"step {step} length {row['length']} solved {row['solved']} bits {row['bits']:.4f} "
                f"sg_loss {row['sg_loss']:.2e} {row['time']:.1f}s")
            bits, scored, sg_loss = 0.0, 0, 0.0
    wall = time.perf_counter() - t0
    return dict(solved=curriculum.solved, length=curriculum.length, steps=config.steps,
                last_bits=curriculum.last_average, wall_s=round(wall, 2),
                windows_per_s=round(config.steps / wall, 1), device=str(device))


def plot_run(folder):
    """Draw bits.png and length.png of a run folder from its metrics.jsonl (no retraining)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line]
    logged = [r for r in rows if r["kind"] == "log"]
    title = folder.name
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in logged], [r["bits"] for r in logged])
    ax.set(xlabel="window (parameter update)", ylabel="error (bits per scored step)", yscale="log", title=title)
    fig.tight_layout()
    fig.savefig(folder / "bits.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.step([0] + [r["step"] for r in rows], [0] + [r["solved"] for r in rows], where="post")
    ax.set(xlabel="window (parameter update)", ylabel="longest length solved", title=title)
    fig.tight_layout()
    fig.savefig(folder / "length.png", dpi=100)
    plt.close(fig)


def run(config, *, log=print):
    """Train as `config` says, in the run folder <out>/<name>/: config.json, command.txt, env.json,
    metrics.jsonl, summary.json, bits.png, length.png. Returns the summary dict."""
    device = pick_device(config.device)  # refuse a missing device before making the folder
    folder = Path(config.out) / config.name
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "config.json", dataclasses.asdict(config))
    (folder / "command.txt").write_text(command_line() + "\n")
    env = environment(device)
    write_json(folder / "env.json", env)
    save_diff(folder, env)
    with open(folder / "metrics.jsonl", "w") as f:
        summary = train(config, log=log, metrics=lambda row: f.write(json.dumps(row) + "\n"))
    plot_run(folder)
    summary.update(config=dataclasses.asdict(config), env=environment(device))
    write_json(folder / "summary.json", summary)  # written last: its presence marks a finished run
    method = "DNI" if config.dni else "BPTT"
    log(f"{config.task} T={config.truncation} {method}: longest length solved {summary['solved']}, error at "
        f"N={summary['length']} {summary['last_bits']:.3f} bits per step ({summary['wall_s']:.0f}s) -> {folder}")
    return summary
