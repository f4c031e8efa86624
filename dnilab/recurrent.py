"""The recurrent run of `python rnn.py`: Copy / Repeat Copy under a curriculum, an LSTM trained
on truncated BPTT windows with or without DNI (paper, section 3.2), and its run folder.

The model is dnilab.copy_tasks'; its synthetic gradients at the window boundaries are the
library's recurrent form, dni.RecurrentDNI, used as a user would.
"""
import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from tqdm import tqdm

from dni.errors import DNIError
from dni.recurrent import SG_FACTOR
from dnilab.config import DEVICES
from dnilab.copy_tasks import IGNORE, TASKS, CopyModel, Curriculum, EpisodeStream, make_task
from dnilab.runs import MetricsFile, claim_run_dir, environment, metrics_rows, record_environment, write_summary
from dnilab.parts import pick_device, set_seed


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
    aux_weight: float = field(default=0.0, metadata=dict(
        help="DNI + Aux: weight of the core's loss for predicting the window end's synthetic gradient (0: plain DNI)"))
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
    overwrite: bool = field(default=False, metadata=dict(help="replace a finished run in <out>/<name>"))
    name: str = field(default="", metadata=dict(help="run folder name "
                                                     "(default: task_T<T>_<bptt|dni[_f<sg_factor>][_d<sg_discount>]>[_N<length>]_s<seed>)"))

    def __post_init__(self):
        if self.clip < 0:
            raise DNIError(f"--clip must be >= 0, got {self.clip}")
        if self.length < 0:
            raise DNIError(f"--length must be >= 0, got {self.length}")
        if self.stagger < 0:
            raise DNIError(f"--stagger must be >= 0, got {self.stagger}")
        if self.aux_weight < 0 or (self.aux_weight and not self.dni):
            raise DNIError(f"--aux_weight must be >= 0, and acts only with --dni True; got {self.aux_weight}")
        if self.sg_discount == self.sg_factor:
            self.sg_discount = None                       # the paper's scheme, however it was asked for
        if not self.name:
            factor = factor_tag(self.sg_factor, self.sg_discount) if self.dni else ""
            factor += f"_aux{self.aux_weight:g}" if self.aux_weight else ""
            fixed = f"_N{self.length}" if self.length else ""
            self.name = f"{self.task}_T{self.truncation}_{'dni' if self.dni else 'bptt'}{factor}{fixed}_s{self.seed}"
        if "/" in self.name or self.name in (".", ".."):
            raise DNIError(f"--name must be a plain folder name, got {self.name!r}")


def build(config, device):
    """The task, the model on `device` and its optimizer, as `config` says."""
    task = make_task(config.task, symbols=config.symbols, max_repeats=config.max_repeats)
    model = CopyModel(input_features=task.input_features, hidden=config.hidden, classes=task.classes,
                      dni=config.dni, sg_factor=config.sg_factor, sg_discount=config.sg_discount,
                      aux_weight=config.aux_weight).to(device)
    groups = [dict(params=model.core.parameters(), lr=config.lr)]
    if model.aux is not None:
        groups[0]["params"] = [*model.core.parameters(), *model.aux.parameters()]
    if model.interface is not None:
        groups.append(dict(params=model.interface.parameters(), lr=config.sg_lr))
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
    core_params = list(model.core.parameters()) + ([] if model.aux is None else list(model.aux.parameters()))
    interface = model.interface
    state = model.core.initial_state(config.batch_size, device)
    bits, scored, sg_loss = 0.0, 0, 0.0  # since the last log line
    t0 = time.perf_counter()
    for step in tqdm(range(1, config.steps + 1), disable=not sys.stderr.isatty(), leave=False):
        x, y, starts, lengths = stream.read(config.truncation, curriculum.length)   # (T, B, F), 3 x (T, B)
        optimizer.zero_grad(set_to_none=True)
        if interface is not None:
            state = interface.begin(state)                                   # the window's start
        ce, end, aux = model(x.to(device), y.to(device), starts, state)     # (T, B), (B, 2H), aux or None
        loss = ce.sum() / config.batch_size                                  # summed over steps, mean over streams
        if interface is None:                                                # truncated BPTT
            loss.backward()
            state = end.detach()
        else:                                                                # and the synthetic gradient at the end
            state = interface.backward(loss, end, aux=aux)
        if config.clip > 0:
            nn.utils.clip_grad_norm_(core_params, config.clip)
        optimizer.step()

        step_bits = ce.detach().cpu() / math.log(2)                                 # (T, B)
        current = (lengths == curriculum.length) & (y != IGNORE)           # (T, B) scored at length N
        bits += float(step_bits.sum())
        scored += int((y != IGNORE).sum())
        sg_loss += 0.0 if interface is None or interface.sg_loss is None else float(interface.sg_loss)
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
    rows = metrics_rows(folder)
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


def metrics_row(event):
    """`train`'s event as a line of metrics.jsonl in the schema of every run folder (`dnilab.runs`):
    the time so far named "seconds", as the feed-forward runs name it."""
    return {("seconds" if key == "time" else key): value for key, value in event.items()}


def run(config, *, log=print):
    """Train as `config` says, in the run folder <out>/<name>/: config.json, command.txt, env.json,
    metrics.jsonl, summary.json, bits.png, length.png. Returns the summary dict."""
    device = pick_device(config.device)  # refuse a missing device before making the folder
    folder = claim_run_dir(Path(config.out) / config.name, overwrite=config.overwrite)
    record_environment(folder, config, device)
    with MetricsFile(folder, "w") as metrics:
        summary = train(config, log=log, metrics=lambda event: metrics.write(metrics_row(event)))
    plot_run(folder)
    summary.update(config=dataclasses.asdict(config), env=environment(device, folder))
    write_summary(folder, summary)
    method = "DNI" if config.dni else "BPTT"
    log(f"{config.task} T={config.truncation} {method}: longest length solved {summary['solved']}, error at "
        f"N={summary['length']} {summary['last_bits']:.3f} bits per step ({summary['wall_s']:.0f}s) -> {folder}")
    return summary
