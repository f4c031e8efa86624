"""The decoupled neural interface: how stages and synthesizers are wired (paper, section 2).

One DNI step, for stages f_1..f_L and synthesizers M_1..M_{L-1} (see shared DNI.md):

    for i = 1..L:
        a   = h_{i-1}.detach()             # the stage boundary: no backward call spans two stages
        h_i = f_i(a)
        i < L:  g_hat_i = M_i(h_i.detach(), c); backward g_hat_i / B into f_i; step f_i
        i = L:  backward the real loss into f_L; step f_L
        i > 1:  train M_{i-1} on || g_hat_{i-1} - B * a.grad ||^2     (the bootstrapped target)

Update order, the same everywhere: stage i updates first, then the synthesizer
before it learns from the gradient stage i's backward produced. Only the last
stage sees the loss; every other gradient is synthetic. B is the batch size:
synthesizers predict per-example gradients (see `dni.synthesizers`).

The per-stage pieces (`stage_update`, `loss_update`, `synthesizer_update`) touch
one stage and one synthesizer each, so a worker that owns a single stage can run
them as they are.
"""
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from dni.synthesizers import synthesizer_loss


class DNINet(nn.Module):
    """A network cut into `stages`, with a synthesizer after every stage but the last.

    `synthesizers` is None for a plain backprop network. In train and eval mode alike,
    forward() is the ordinary forward pass: synthesizers are not used at test time.
    """

    def __init__(self, *, stages, synthesizers=None, conditioned=False, num_classes=10):
        super().__init__()
        self.stages = stages
        self.synthesizers = synthesizers
        self.conditioned = conditioned
        self.num_classes = num_classes
        if synthesizers is not None:
            assert len(synthesizers) == len(stages) - 1, "one synthesizer per stage but the last"

    def forward(self, x):
        for stage in self.stages:
            x = stage(x)
        return x

    def context(self, y):
        """The synthesizers' context c: one-hot labels under cDNI, else None."""
        return F.one_hot(y, self.num_classes).float() if self.conditioned else None


@dataclass
class StepStats:
    """What one training step measured; tensors stay on the device until logged."""
    loss: torch.Tensor
    correct: torch.Tensor
    sg_loss: list = field(default_factory=list)  # per synthesizer
    sg_cos: list = field(default_factory=list)   # cosine(g_hat, target) per synthesizer


def stage_update(stage, optimizer, synthesizer, inputs, context, *, needs_input_grad=True):
    """Forward a stage on its detached input and update it at once from its synthetic gradient.

    Returns (h, g_hat, input_grad): the output, detached, for the next stage; the synthetic
    gradient with its graph to the synthesizer (kept for the synthesizer's own update, so
    its BatchNorm statistics move once); and dL/d(input) as this stage sees it, which is the
    previous synthesizer's target (None for the first stage).
    """
    a = inputs.detach().requires_grad_(needs_input_grad)
    h = stage(a)
    g_hat = synthesizer(h.detach(), context)  # per-example gradient, same shape as h
    optimizer.zero_grad(set_to_none=True)
    h.backward(g_hat.detach() / len(h))
    optimizer.step()
    return h.detach(), g_hat, a.grad


def loss_update(stage, optimizer, inputs, targets, *, needs_input_grad=True):
    """The last stage: forward, backward the real (mean cross-entropy) loss, update.

    Returns (logits, loss, input_grad), logits and loss detached."""
    a = inputs.detach().requires_grad_(needs_input_grad)
    logits = stage(a)
    loss = F.cross_entropy(logits, targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return logits.detach(), loss.detach(), a.grad


def synthesizer_update(optimizer, g_hat, input_grad):
    """Train a synthesizer on the true gradient of the batch its `g_hat` was made for.

    `input_grad` is dL/dh from the next stage's backward (mean loss); the target is its
    per-example scale. Returns (sg_loss, cosine) detached.
    """
    target = input_grad * len(input_grad)
    loss = synthesizer_loss(g_hat, target)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    cos = F.cosine_similarity(g_hat.detach().flatten(), target.flatten(), dim=0)
    return loss.detach(), cos


def dni_step(net, stage_optimizers, synth_optimizers, x, y):
    """One DNI step on a batch: every stage updated from its synthetic gradient, every
    synthesizer from the bootstrapped target of the same batch. See the module docstring."""
    context, last = net.context(y), len(net.stages) - 1
    h, g_hat_prev, sg_losses, sg_coses = x, None, [], []
    for i, (stage, optimizer) in enumerate(zip(net.stages, stage_optimizers)):
        if i < last:
            h, g_hat, input_grad = stage_update(stage, optimizer, net.synthesizers[i], h, context,
                                                needs_input_grad=i > 0)
        else:
            logits, loss, input_grad = loss_update(stage, optimizer, h, y, needs_input_grad=i > 0)
        if i > 0:
            sg_loss, cos = synthesizer_update(synth_optimizers[i - 1], g_hat_prev, input_grad)
            sg_losses.append(sg_loss)
            sg_coses.append(cos)
        g_hat_prev = g_hat if i < last else None
    return StepStats(loss=loss, correct=(logits.argmax(1) == y).sum(), sg_loss=sg_losses, sg_cos=sg_coses)


def backprop_step(net, stage_optimizers, x, y):
    """One ordinary backprop step: the baseline every DNI number is compared against."""
    for optimizer in stage_optimizers:
        optimizer.zero_grad(set_to_none=True)
    logits = net(x)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    for optimizer in stage_optimizers:
        optimizer.step()
    return StepStats(loss=loss.detach(), correct=(logits.detach().argmax(1) == y).sum())


def nobprop_step(net, stage_optimizers, x, y):
    """The paper's "No Bprop" baseline (Table 1): only the last stage learns, from the real loss;
    the stages below keep their random initial weights (their BatchNorm statistics still move)."""
    with torch.no_grad():
        h = x
        for stage in net.stages[:-1]:
            h = stage(h)
    logits, loss, _ = loss_update(net.stages[-1], stage_optimizers[-1], h, y, needs_input_grad=False)
    return StepStats(loss=loss, correct=(logits.argmax(1) == y).sum())
