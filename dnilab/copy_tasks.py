"""Copy and Repeat Copy (Graves et al. 2014) as endless streams, with a length curriculum.

The recurrent DNI experiments of the paper (section 3.2, "Copy and Repeat Copy")
feed an LSTM episodes back to back: its state runs on from one episode into the
next, and backpropagation through time is truncated every T steps, wherever the
window boundaries fall. The length N of the episodes grows by one each time the
model solves the current length: its average error drops below 0.15 bits per
step (a scored output step; the paper says per character).

An episode is a sequence of steps with one input vector each and, on the steps
where the model must answer, a target class (a symbol, or `stop`); unscored steps
carry the target IGNORE.

- Copy: read N random symbols, then a delimiter; output the N symbols, then stop.
  2N + 2 steps, N + 1 of them scored.
- Repeat Copy: read N symbols, a delimiter, then a repeat count R (one step, a
  scalar channel R / max_repeats, R drawn from 1..max_repeats per batch of episodes);
  output the N symbols R times over, then stop. NR + N + 3 steps, NR + 1 scored.

The model that learns them (`CopyModel`) is an LSTM core whose state is reset where an episode
begins, with a readout, and, for DNI, the library's `dni.RecurrentDNI` at its window boundaries.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from dni.recurrent import SG_FACTOR, RecurrentDNI

IGNORE = -100  # target of a step the model is not asked to answer (F.cross_entropy's ignore_index)


class Copy:
    """Copy episodes over an alphabet of `symbols` one-hot symbols, a batch at a time.

    Input features: symbols + 1 (the delimiter). Output classes: symbols + 1 (stop).
    """

    def __init__(self, *, symbols=8):
        self.symbols = symbols
        self.input_features = symbols + 1
        self.classes = symbols + 1

    def _read(self, length, steps, batch_size, generator):
        """The reading phase shared by both tasks: N one-hot symbols, then the delimiter."""
        seq = torch.randint(self.symbols, (length, batch_size), generator=generator)   # (N, B)
        x = torch.zeros(steps, batch_size, self.input_features)                        # (L, B, F)
        x[:length] = F.one_hot(seq, self.input_features).float()
        x[length, :, self.symbols] = 1.0
        y = torch.full((steps, batch_size), IGNORE, dtype=torch.long)                 # (L, B)
        y[-1] = self.symbols                                                           # stop
        return seq, x, y

    def episodes(self, length, batch_size, generator):
        """B episodes of N = `length` symbols: inputs (2N+2, B, F) and targets (2N+2, B)."""
        seq, x, y = self._read(length, 2 * length + 2, batch_size, generator)
        y[length + 1:2 * length + 1] = seq
        return x, y


class RepeatCopy(Copy):
    """Repeat Copy episodes: Copy's symbols and delimiter, then a repeat-count channel.

    Input features: symbols + 2. Output classes: symbols + 1 (stop).
    """

    def __init__(self, *, symbols=8, max_repeats=3):
        super().__init__(symbols=symbols)
        self.max_repeats = max_repeats
        self.input_features = symbols + 2

    def episodes(self, length, batch_size, generator):
        """B episodes of N = `length` symbols repeated R times, R shared by the batch:
        inputs (NR+N+3, B, F) and targets (NR+N+3, B)."""
        repeats = int(torch.randint(1, self.max_repeats + 1, (1,), generator=generator))
        seq, x, y = self._read(length, length * repeats + length + 3, batch_size, generator)
        x[length + 1, :, self.symbols + 1] = repeats / self.max_repeats
        y[length + 2:length + 2 + length * repeats] = seq.repeat(repeats, 1)
        return x, y


TASKS = {"copy": Copy, "repeat_copy": RepeatCopy}


def make_task(name, *, symbols=8, max_repeats=3):
    """The task called `name` in TASKS."""
    if name == "repeat_copy":
        return RepeatCopy(symbols=symbols, max_repeats=max_repeats)
    return TASKS[name](symbols=symbols)


class EpisodeStream:
    """`batch_size` streams of back-to-back episodes, read `steps` steps at a time.

    The episodes are made a batch at a time, all of the same length N (the one
    asked for at that read), and would begin at the same step in every stream.
    With `stagger` > 0, stream b is delayed by its own d_b steps, drawn once from
    0..stagger-1 (an unscored blank before its first episode): the streams are
    then at different phases of their episodes, so a window of T steps holds
    reading and answering steps alike instead of one phase for the whole batch.
    Each read returns the next inputs (T, B, F), targets (T, B), episode starts
    (T, B), True at an episode's first step, and the length N of the episode
    each step belongs to (T, B; 0 on the blank), so that the curriculum only
    scores the current length.
    """

    def __init__(self, *, task, batch_size, generator, stagger=0):
        self.task, self.batch_size, self.generator = task, batch_size, generator
        self.delays = (torch.randint(stagger, (batch_size,), generator=generator) if stagger    # (B,)
                       else torch.zeros(batch_size, dtype=torch.long))
        self.max_delay = int(self.delays.max())
        self.position = 0      # steps read so far
        self.first = 0         # the step of the undelayed stream that self.buffer begins with
        self.buffer = (torch.zeros(0, batch_size, task.input_features),
                       torch.zeros(0, batch_size, dtype=torch.long),
                       torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.long))

    def read(self, steps, length):
        """The next `steps` steps of every stream; new episodes have N = `length`."""
        parts = [self.buffer]
        have = self.first + len(self.buffer[2])
        while have < self.position + steps:
            x, y = self.task.episodes(length, self.batch_size, self.generator)
            starts = torch.zeros(len(y), dtype=torch.bool)
            starts[0] = True
            parts.append((x, y, starts, torch.full((len(y),), length)))
            have += len(y)
        if len(parts) > 1:
            self.buffer = tuple(torch.cat(p) for p in zip(*parts))
        x, y, starts, lengths = self.buffer
        index = self.position + torch.arange(steps)[:, None] - self.delays - self.first    # (T, B)
        blank = index < 0
        index = index.clamp(min=0)
        streams = torch.arange(self.batch_size)
        window = (x[index, streams].masked_fill(blank[..., None], 0.0),
                  y[index, streams].masked_fill(blank, IGNORE),
                  starts[index] & ~blank,
                  lengths[index].masked_fill(blank, 0))
        self.position += steps
        keep = self.position - self.max_delay - self.first    # steps no stream will read again
        if keep > 0:
            self.buffer = tuple(t[keep:] for t in self.buffer)
            self.first += keep
        return window


class Curriculum:
    """The episode length N: starts at 1 and grows by one when N is solved (paper, section 3.2).

    `record` takes the error (bits summed over scored steps, and their count) of
    steps at the current length. Once at least `min_scored` such steps are in, their
    average decides: below `threshold` bits per step, N is solved and N + 1 begins;
    otherwise the count starts again. With `grow=False` the length stays at `length`
    and the decisions only say whether it has been solved.
    """

    def __init__(self, *, threshold=0.15, min_scored=2000, length=1, grow=True):
        self.threshold, self.min_scored, self.grow = threshold, min_scored, grow
        self.length = length
        self.solved = 0  # the longest length solved so far (0 if none)
        self.bits, self.scored = 0.0, 0
        self.last_average = float("nan")

    def record(self, bits, scored):
        """Add `scored` steps of total error `bits`; returns True when the length grew."""
        self.bits += bits
        self.scored += scored
        if self.scored < self.min_scored:
            return False
        self.last_average = self.bits / self.scored
        self.bits, self.scored = 0.0, 0
        if self.last_average >= self.threshold:
            return False
        self.solved = self.length
        if self.grow:
            self.length += 1
        return self.grow


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

    def forward(self, x, state, starts, *, outputs=False):
        """x (T, B, F), state (B, 2H), starts (T, B) bool on the CPU, True where a stream's episode
        begins -> logits (T, B, classes), state after the T steps (B, 2H); with `outputs`, also the
        LSTM's outputs (T, B, H)."""
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
        out = torch.cat(outputs)
        end = torch.cat([h[0], c[0]], dim=1)
        return (self.readout(out), end, out) if outputs else (self.readout(out), end)


class CopyModel(nn.Module):
    """The core and, when `dni`, the recurrent interface at its window boundaries (`dni.RecurrentDNI`,
    paper section 3.2): a linear synthesizer of the state [h, c], zero-initialised so that its first
    output is 0. (A hidden layer would bring DenseSynthesizer's BatchNorm, whose batch here is B
    states all at the same step of their episodes.) With `aux_weight` > 0, DNI + Aux: a linear
    head on the LSTM's output predicts, at every step, the synthetic gradient of the window's end
    (dni.recurrent)."""

    def __init__(self, *, input_features, hidden, classes, dni=True, sg_factor=SG_FACTOR, sg_discount=None,
                 aux_weight=0.0):
        super().__init__()
        self.core = RecurrentCore(input_features=input_features, hidden=hidden, classes=classes)
        self.interface = RecurrentDNI(features=2 * hidden, factor=sg_factor, discount=sg_discount,
                                      aux_weight=aux_weight) if dni else None
        self.aux = nn.Linear(hidden, 2 * hidden) if dni and aux_weight else None

    def forward(self, x, y, starts, state):
        """x (T, B, F) inputs, y (T, B) targets (IGNORE where unscored), starts (T, B) episode starts
        (on the CPU), state (B, 2H) -> per-step cross-entropy in nats (T, B), 0 on unscored steps,
        the state at the window's end (B, 2H), and the auxiliary predictions (T, B, 2H) or None."""
        logits, end, out = self.core(x, state, starts, outputs=True)                # (T, B, C), (B, 2H), (T, B, H)
        ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE,
                             reduction="none").view_as(y)                             # (T, B)
        return ce, end, None if self.aux is None else self.aux(out)
