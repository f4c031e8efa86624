"""Recurrent DNI: synthetic gradients at the boundaries of truncated BPTT windows (paper, section 3.2).

An LSTM core reads B streams of back-to-back episodes (the copy tasks of rnn.py; its state
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
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from dni.synthesizers import DenseSynthesizer, synthesizer_loss

SG_FACTOR = 0.1  # the paper's scale of the synthetic gradient
IGNORE = -100  # target of a step the model is not asked to answer (F.cross_entropy's ignore_index)


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


def window_backward(model, x, y, starts, state, *, sg_factor=SG_FACTOR, sg_discount=None):
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
