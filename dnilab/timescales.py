"""Two networks at two timescales: the paper's multi-network system (section 3, "Multi-Network
System"), in which a slow RNN's error reaches a fast RNN only through synthetic gradients.

The task (our choice: the paper's exact task could not be confirmed where this was written).
S streams of MNIST digits, one image per tick per stream, drawn at random from the training
split. Network A, an RNN, reads one digit every tick. Network B, an RNN, ticks once every T ticks
on the T outputs of A since its last tick (a_{t-T+1}, ..., a_t, concatenated in order) and predicts
a target of those T digits (`task`): "count", how many were odd, a class in 0..T (the default; the
gradient for a_t then depends on every other digit of the span, so a synthesizer that reads a_t
alone can predict only its expectation), or "parities", the parity of each digit (T two-way
answers, the loss summed over them; the gradient for a_t depends mostly on digit t). B's accuracy
is the fraction of spans it gets right (every parity right, under "parities"). Only B has this
loss; nothing tells A what to output except what comes back across the A-to-B interface.

    A:  a_t = GRUCell(relu(W x_t), a_{t-1})                  every tick; its state is its output
    B:  b_k = GRUCell([a_{kT-T+1}, ..., a_{kT}], b_{k-1});   every T ticks
        logits_k = V b_k                                     loss_k = CE(logits_k, target of span k)

Methods (`SYSTEM_METHODS`):
- "backprop": A waits for B. A keeps its graph over the span; B's backward gives d loss_k / d a_t
  for each of the span's T outputs, and A backpropagates them through its span (its state is cut
  at span boundaries). That is one backward through B and A over the span (the chain rule split
  at the interface, `a_backward`); A and B each step once per span.
- "dni": the interface is decoupled. At every tick A asks its synthesizer M for g_hat_t =
  M(a_t, position of t in the span), backpropagates g_hat_t / S through that tick alone (A's
  state is cut every tick) and steps at once (`dni.stage_update`): A never waits for B. Every T
  ticks B trains on the span's detached outputs (`dni.loss_update`) and the gradient its backward
  leaves on them is M's target (`dni.synthesizer_update`, bootstrapped target of paper section 2).
  No true gradient reaches A's parameters: only M's predictions do.
- "frozen": A is never trained (left at its initialisation); B trains on its outputs.
- "own_task": A trains on a task of its own, classifying each digit through its own linear head,
  every tick; B trains on its outputs, and nothing flows back from B.

A's learning rate under DNI (`dni_lr`) is a setting apart from backprop's (`lr`): Adam makes
every step the same size whatever the gradient's scale, and under DNI A steps every tick on the
synthesizer's predictions, nearly uninformed at first, where backprop steps once a span; too fast
a rate moves A's outputs faster than B can learn to read them (docs/choices.md says how its
default was set).

The synthesizer reads the one-hot position of the tick within the span as its context: B reads
the span in order, so the gradient for a_t depends on where t falls in it. It has no BatchNorm,
so its prediction for a trigger does not depend on what else is in the batch; then the
prediction M is trained on (recomputed from the stored triggers, `synthesizer_step`) is the one A
used, as long as M has not stepped in between: always so in one process; in two, M may have
stepped on the gradients of earlier spans that arrived after this span's ticks.

Where the synthesizer lives when A and B are two processes (`processes=2`, one core each, in
dnilab.timescales_train): with A.
B sends back d loss_k / d(span k), the gradient its backward produces on its inputs anyway; A
keeps each span's triggers until that gradient arrives and then trains M. A never blocks on it
under DNI; under backprop A must block on it before its update. Under the baselines B sends
nothing back. The other design (M living with B, sending weights back) would need B to hold A's
triggers and ship M's weights every step; this one ships what backprop would ship.

Evaluation: B's accuracy on the validation split (the last `val_size` training images, as main.py
holds them out), read as `val_streams` fixed streams in order; the test set is read once, at the
end. Time is training time: evaluation is outside it (in two processes, A keeps its weights and B
its weights and the time it finished each evaluated span; they are evaluated after training).
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from dni.errors import DNIError
from dni.interface import synthesize
from dni.stages import loss_update, stage_update, synthesizer_update
from dni.synthesizers import make_synthesizer
from dnilab.data import load_data, split_validation
from dnilab.parts import set_seed

SYSTEM_METHODS = ("backprop", "dni", "frozen", "own_task")
TASKS = ("count", "parities")  # what B predicts at each of its ticks (see `targets_of`)
TRAINS_A_FROM_B = ("backprop", "dni")  # methods under which B's error reaches A (truly or synthetically)


@dataclass
class TimescalesConfig:
    """Every default of `python timescales.py`, defined once."""
    method: str = field(default="dni", metadata=dict(help="how A learns", choices=SYSTEM_METHODS))
    task: str = field(default="count", metadata=dict(help="B's target: count (of odd digits in the span, 0..T) or "
                                                          "parities (of each digit of the span)", choices=TASKS))
    span: int = field(default=4, metadata=dict(help="T: A's ticks per tick of B", positive=True))
    processes: int = field(default=1, metadata=dict(help="1: A and B in one process; 2: one process (one core) each",
                                                    choices=(1, 2)))
    streams: int = field(default=64, metadata=dict(help="S: parallel digit streams (the batch)", positive=True))
    ticks: int = field(default=6000, metadata=dict(help="training ticks of A (B ticks ticks / T times)", positive=True))
    encoder: int = field(default=128, metadata=dict(help="units of A's linear encoder of the image", positive=True))
    hidden_a: int = field(default=32, metadata=dict(help="A's GRU units: the width of the interface", positive=True))
    hidden_b: int = field(default=64, metadata=dict(help="B's GRU units", positive=True))
    lr: float = field(default=1e-3, metadata=dict(help="Adam learning rate of B, and of A but under DNI", positive=True))
    dni_lr: float = field(default=1e-5, metadata=dict(help="Adam learning rate of A under DNI (one step a tick, on "
                                                           "the synthesizer's prediction)", positive=True))
    sg_lr: float = field(default=1e-3, metadata=dict(help="Adam learning rate of the synthesizer", positive=True))
    synth_layers: int = field(default=1, metadata=dict(help="hidden layers of the synthesizer (0: linear)"))
    synth_width: int = field(default=256, metadata=dict(help="units per hidden layer of the synthesizer",
                                                        positive=True))
    eval_every: int = field(default=500, metadata=dict(help="ticks between validation evaluations "
                                                            "(rounded up to whole spans)", positive=True))
    val_size: int = field(default=10000, metadata=dict(help="validation images held out of the end of the training set",
                                                       positive=True))
    val_streams: int = field(default=100, metadata=dict(help="streams the validation (and test) images are read as",
                                                        positive=True))
    in_flight: int = field(default=4, metadata=dict(help="processes=2: spans A may send ahead of B", positive=True))
    dataset: str = field(default="mnist", metadata=dict(help="digits", choices=("mnist",)))
    data_dir: str = field(default="data", metadata=dict(help="where the data set lives"))
    seed: int = field(default=0, metadata=dict(help="seed of the weights and of the digit streams"))
    out: str = field(default="results/timescales", metadata=dict(help="parent folder of the run folder"))
    overwrite: bool = field(default=False, metadata=dict(help="replace a finished run in <out>/<name>"))
    name: str = field(default="", metadata=dict(help="run folder name (default: T<T>_<method>[_parities][_2p]_s<seed>)"))

    def __post_init__(self):
        if self.synth_layers < 0:
            raise DNIError(f"--synth_layers must be >= 0, got {self.synth_layers}")
        if self.ticks < self.span:
            raise DNIError(f"--ticks {self.ticks} is less than one span of --span {self.span}: B would never tick")
        if not self.name:
            task = "" if self.task == "count" else f"_{self.task}"
            self.name = f"T{self.span}_{self.method}{task}{'_2p' if self.processes == 2 else ''}_s{self.seed}"
        if "/" in self.name or self.name in (".", ".."):
            raise DNIError(f"--name must be a plain folder name, got {self.name!r}")

    @property
    def spans(self):
        """B's ticks in training (the last partial span is dropped)."""
        return self.ticks // self.span

    @property
    def eval_spans(self):
        """Spans between evaluations."""
        return max(1, math.ceil(self.eval_every / self.span))


# ---------------------------------------------------------------- the two networks

class NetA(nn.Module):
    """The fast network: a linear encoder of the image, then a GRU cell whose state is its output.
    `digit_head` (a linear map to the 10 digits) is used only by the "own_task" baseline."""

    def __init__(self, *, in_features=784, encoder=128, hidden=32):
        super().__init__()
        self.hidden = hidden
        self.encoder = nn.Linear(in_features, encoder)
        self.cell = nn.GRUCell(encoder, hidden)
        self.digit_head = nn.Linear(hidden, 10)

    def forward(self, x, state):
        """One tick: image batch x (S, 784), previous output (S, H) -> output (S, H)."""
        return self.cell(F.relu(self.encoder(x)), state)


class NetB(nn.Module):
    """The slow network: a GRU cell that reads a whole span of A's outputs at once, and a linear
    readout of `classes` scores (`task_classes`)."""

    def __init__(self, *, span, in_features=32, hidden=64, classes=None):
        super().__init__()
        self.hidden = hidden
        self.cell = nn.GRUCell(span * in_features, hidden)
        self.readout = nn.Linear(hidden, span + 1 if classes is None else classes)

    def forward(self, outputs, state):
        """One tick of B: A's span of outputs (S, T, H_A), B's state (S, H_B) -> (logits (S, T+1), state)."""
        state = self.cell(outputs.flatten(1), state)
        return self.readout(state), state


@dataclass
class System:
    """A, B, the synthesizer at their interface (None unless DNI) and one Adam for each."""
    a: NetA
    b: NetB
    synthesizer: nn.Module
    opt_a: torch.optim.Optimizer
    opt_b: torch.optim.Optimizer
    opt_m: torch.optim.Optimizer


def build(config):
    """The two networks, the synthesizer and their optimizers, as `config` says; the same weights
    for every method at a seed (A, B and the synthesizer are built in that order, whatever is used)."""
    set_seed(config.seed)
    a = NetA(encoder=config.encoder, hidden=config.hidden_a)
    b = NetB(span=config.span, in_features=config.hidden_a, hidden=config.hidden_b,
             classes=task_classes(config.task, config.span))
    m = make_synthesizer((config.hidden_a,), kind="dense", context_features=config.span,
                         hidden_layers=config.synth_layers, width=config.synth_width, batch_norm=False)
    dni = config.method == "dni"
    return System(a=a, b=b, synthesizer=m if dni else None,
                  opt_a=torch.optim.Adam(a.parameters(), lr=config.dni_lr if dni else config.lr),
                  opt_b=torch.optim.Adam(b.parameters(), lr=config.lr),
                  opt_m=torch.optim.Adam(m.parameters(), lr=config.sg_lr) if dni else None)


def position_context(position, span, streams):
    """The synthesizer's context at a tick: the one-hot position (S, T) of the tick in its span."""
    return F.one_hot(torch.full((streams,), position), span).float()


def odd_count(digits):
    """How many of a span's digits (S, T) are odd, (S,) in 0..T."""
    return (digits % 2).sum(1)


def task_classes(task, span):
    """B's scores per tick: T + 1 counts, or two per digit of the span."""
    return span + 1 if task == "count" else 2 * span


def targets_of(task, digits):
    """B's target for a span's digits (S, T): "count", the number of odd ones (S,) in 0..T, one
    answer that depends on every digit of the span; "parities", each digit's parity (S, T)."""
    return odd_count(digits) if task == "count" else digits % 2


def task_loss(task):
    """B's loss on its scores (S, classes): cross-entropy over the count, or summed over the span's
    T parities (averaged over streams, so the loss scale is S under both)."""
    if task == "count":
        return F.cross_entropy
    return lambda logits, targets: F.cross_entropy(logits.view(-1, 2), targets.flatten(), reduction="sum") / len(targets)


def correct_spans(task, logits, targets):
    """Spans B got right: the count, or every parity of the span."""
    if task == "count":
        return int((logits.argmax(1) == targets).sum())
    return int((logits.view(len(targets), -1, 2).argmax(2) == targets).all(1).sum())


# ---------------------------------------------------------------- the steps, one per clock

def a_tick_dni(system, x, state, position, span):
    """One tick of A under DNI (`dni.stage_update`): forward from the detached state, backward the
    synthetic gradient g_hat / S of this tick alone, step A. Returns (output (S, H) detached: the
    next state and what B will read; its trigger context)."""
    context = position_context(position, span, len(x))
    h, _, _ = stage_update(lambda image: system.a(image, state), system.opt_a, system.synthesizer, x, context,
                           needs_input_grad=False)
    return h, context


def synthesizer_step(system, triggers, contexts, input_grad):
    """Train A's synthesizer on one span (`dni.synthesizer_update`): its predictions for the span's
    T outputs of A, triggers (S, T, H) with contexts (S, T, T), against S times the gradient B's
    backward left on them, input_grad (S, T, H). Returns (sg_loss, cosine)."""
    streams = len(triggers)
    g_hat = synthesize(system.synthesizer, triggers.flatten(0, 1), contexts.flatten(0, 1))  # (S*T, H)
    return synthesizer_update(system.opt_m, g_hat, input_grad.flatten(0, 1), loss_scale=streams)


def a_span_graph(system, xs, state):
    """A's forward over a span for backprop: xs (T, S, 784) from `state` (detached: A's graph
    stops at span boundaries) -> outputs (S, T, H) with their graph to A's parameters."""
    outputs = []
    for x in xs:
        state = system.a(x, state)
        outputs.append(state)
    return torch.stack(outputs, 1)


def a_backward(system, outputs, grad):
    """A's backprop update once B's gradient d loss / d outputs (S, T, H) has come back: backward
    through A's span, step A."""
    system.opt_a.zero_grad(set_to_none=True)
    outputs.backward(grad)
    system.opt_a.step()


def b_tick(system, outputs, targets, state, *, input_grad, task="count", step=True):
    """One tick of B (`dni.loss_update`) on A's detached span outputs (S, T, H): forward from its
    detached state, backward its loss, step B unless `step` False (the caller steps it later).
    Returns (logits, loss, d loss / d outputs or None, B's next state, detached)."""
    new = {}

    def stage(a):
        logits, new["state"] = system.b(a, state.detach())
        return logits

    if not step:
        system.opt_b.zero_grad(set_to_none=True)
    logits, loss, grad = loss_update(stage, system.opt_b if step else None, outputs, targets,
                                     needs_input_grad=input_grad, loss_fn=task_loss(task))
    return logits, loss, grad, new["state"].detach()


def a_tick_own(system, x, digits, state):
    """One tick of A on its own task: classify the digit x through A's digit head, step A.
    Returns A's output (S, H), detached."""
    system.opt_a.zero_grad(set_to_none=True)
    h = system.a(x, state)
    F.cross_entropy(system.a.digit_head(h), digits).backward()
    system.opt_a.step()
    return h.detach()


def a_ticks(system, config, xs, digits, a_state):
    """A's T ticks of a span under every method but backprop: under DNI A steps at each tick from
    its synthesizer (no wait for B), under own_task from its own head, frozen not at all.
    Returns the state after the span, A's outputs (S, T, H) and, under DNI, the synthesizer's
    contexts (S, T, T), else None."""
    outputs, contexts = [], []
    for t in range(config.span):
        if config.method == "dni":
            a_state, context = a_tick_dni(system, xs[t], a_state, t, config.span)
            contexts.append(context)
        elif config.method == "own_task":
            a_state = a_tick_own(system, xs[t], digits[t], a_state)
        else:
            with torch.no_grad():
                a_state = system.a(xs[t], a_state)
        outputs.append(a_state)
    return a_state, torch.stack(outputs, 1), torch.stack(contexts, 1) if contexts else None


def span_step(system, config, xs, digits, a_state, b_state):
    """One span of T ticks of the whole system in one process, as `config.method` says.
    xs (T, S, 784), digits (T, S). Returns (a_state, b_state, stats dict)."""
    targets = targets_of(config.task, digits.T)  # (S,) or (S, T)
    stats = {}
    if config.method == "backprop":
        outputs = a_span_graph(system, xs, a_state)                       # (S, T, H), graph to A
        logits, loss, grad, b_state = b_tick(system, outputs.detach(), targets, b_state, input_grad=True,
                                                 task=config.task)
        a_backward(system, outputs, grad)                                 # A waited for B's gradient
        a_state = outputs[:, -1].detach()
    else:
        dni = config.method == "dni"
        a_state, outputs, contexts = a_ticks(system, config, xs, digits, a_state)  # (S, T, H), (S, T, T) or None
        logits, loss, grad, b_state = b_tick(system, outputs, targets, b_state, input_grad=dni, task=config.task)
        if dni:
            stats["sg_loss"], stats["sg_cos"] = (float(v) for v in synthesizer_step(system, outputs, contexts, grad))
    stats["loss"] = float(loss)
    stats["correct"] = correct_spans(config.task, logits, targets)
    return a_state, b_state, stats


# ---------------------------------------------------------------- data and evaluation

class DigitStream:
    """S streams of digits drawn uniformly from `images` (N, 784) with labels (N,), from a
    generator of their own: `read(T)` -> images (T, S, 784), digits (T, S)."""

    def __init__(self, images, labels, streams, seed):
        self.images, self.labels, self.streams = images, labels, streams
        self.generator = torch.Generator().manual_seed(seed)

    def read(self, ticks):
        index = torch.randint(len(self.images), (ticks, self.streams), generator=self.generator)
        return self.images[index], self.labels[index]


def fixed_streams(images, labels, streams, span):
    """Images read in order as `streams` streams of whole spans: (L, V, 784), (L, V), L a multiple of T."""
    length = len(images) // streams // span * span
    if length == 0:
        raise DNIError(f"{len(images)} images make no span of {span} in each of {streams} streams; "
                       f"lower --val_streams")
    n = length * streams
    return images[:n].view(streams, length, -1).transpose(0, 1), labels[:n].view(streams, length).T


@torch.no_grad()
def accuracy(a, b, images, digits, span, task="count"):
    """B's accuracy (spans right) on fixed streams (L, V, 784), both networks from zero states."""
    L, V = digits.shape
    a_state, b_state = torch.zeros(V, a.hidden), torch.zeros(V, b.hidden)
    correct = 0
    for k in range(L // span):
        outputs = []
        for t in range(k * span, (k + 1) * span):
            a_state = a(images[t], a_state)
            outputs.append(a_state)
        logits, b_state = b(torch.stack(outputs, 1), b_state)
        correct += correct_spans(task, logits, targets_of(task, digits[k * span:(k + 1) * span].T))
    return correct / (V * (L // span))


def load_digits(config, load=load_data):
    """(train, val, test) as (images (N, 784), labels (N,)) pairs: the training set less its last
    `val_size` images, those images, and the test set."""
    if config.val_size >= 60000:
        raise DNIError(f"--val_size must be below the 60000 training images, got {config.val_size}")
    data = split_validation(load(config.dataset, config.data_dir, "cpu"), config.val_size)
    flat = lambda x: x.flatten(1)
    return ((flat(data.train_x), data.train_y), (flat(data.val_x), data.val_y), (flat(data.test_x), data.test_y))
