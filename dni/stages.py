"""The stage-wise form of DNI (paper, section 2): a network cut into stages, updated one stage at a time.

A `DNINet` is a list of stages and a synthesizer after each but the last; `dni_step` takes one
decoupled step on a batch, and the paper's experiments, `dni.unlock` and `dnilab.pipeline` run
it (the update itself, `synthesize` / `synthetic_gradient` / `synthesizer_objective`, is
dni.interface's, shared with the drop-in `DNI`):

    for i = 1..L:
        a   = h_{i-1}.detach()             # the stage boundary: no backward call spans two stages
        h_i = f_i(a)
        i < L:  g_hat_i = M_i(h_i.detach(), c); backward g_hat_i / s into f_i; step f_i
        i = L:  backward the real loss into f_L; step f_L
        i > 1:  train M_{i-1} on || g_hat_{i-1} - s * a.grad ||^2     (the bootstrapped target)

Update order, the same everywhere: stage i updates first, then the synthesizer before it
learns from the gradient stage i's backward produced. Only the last stage sees the loss.
The per-stage pieces (`stage_update`, `loss_update`, `synthesizer_update`) touch one stage and
one synthesizer each, so a worker that owns a single stage can run them as they are.
"""
import contextlib
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from dni.interface import resolve_loss_scale, synthesize, synthesizer_objective, synthetic_gradient


class DNINet(nn.Module):
    """A network cut into `stages`, with a synthesizer after every stage but the last.

    `synthesizers` is None for a plain backprop network. `heads`: for local losses
    (`dni.local.local_step`) the auxiliary classifier after every stage but the last, in place of
    the synthesizers; None otherwise. In train and eval mode alike, forward() is the ordinary
    forward pass: synthesizers and heads are not used at test time.
    """

    def __init__(self, *, stages, synthesizers=None, conditioned=False, num_classes=10, heads=None):
        super().__init__()
        self.stages = stages
        self.synthesizers = synthesizers
        self.conditioned = conditioned
        self.num_classes = num_classes
        if synthesizers is not None:
            assert len(synthesizers) == len(stages) - 1, "one synthesizer per stage but the last"
        self.heads = heads  # None: a plain attribute, so other nets' state_dicts are unchanged
        if heads is not None:
            assert len(heads) == len(stages) - 1, "one auxiliary head per stage but the last"

    def forward(self, x):
        for stage in self.stages:
            x = stage(x)
        return x

    def context(self, y):
        """The synthesizers' context c: one-hot labels under cDNI, else None (cast to each
        trigger's dtype where it is used, see `synthesize`)."""
        return F.one_hot(y, self.num_classes).float() if self.conditioned else None


@dataclass
class StepStats:
    """What one training step measured; tensors stay on the device until logged. `correct` is
    the number of right argmax predictions, None when the targets are not class indices."""
    loss: torch.Tensor
    correct: Optional[torch.Tensor]
    sg_loss: list = field(default_factory=list)  # per synthesizer
    sg_cos: list = field(default_factory=list)   # cosine(g_hat, target) per synthesizer
    aux_loss: list = field(default_factory=list)  # per auxiliary head (local losses, dni.local)


def count_correct(output, targets):
    """Right argmax predictions of (B, C) scores for class indices `targets`, else None."""
    if output.dim() != 2 or targets.dim() != 1 or targets.is_floating_point():
        return None
    return (output.argmax(1) == targets).sum()


def stage_update(stage, optimizer, synthesizer, inputs, context, *, needs_input_grad=True, loss_scale=None):
    """Forward a stage on its detached input and update it at once from its synthetic gradient.

    Returns (h, g_hat, input_grad): the output, detached, for the next stage; the synthetic
    gradient with its graph to the synthesizer; and dL/d(input) as this stage sees it, which is
    the previous synthesizer's target (None for the first stage). `optimizer` None: the gradient
    is only accumulated (the caller zeroes and steps).
    """
    a = inputs.detach().requires_grad_(needs_input_grad)
    h = stage(a)
    g_hat = synthesize(synthesizer, h, context)  # per-example gradient, same shape as h
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    h.backward(synthetic_gradient(g_hat, resolve_loss_scale(loss_scale, h), h.dtype))
    if optimizer is not None:
        optimizer.step()
    return h.detach(), g_hat, a.grad


def loss_update(stage, optimizer, inputs, targets, *, needs_input_grad=True, loss_fn=None):
    """The last stage: forward, backward the real loss (`loss_fn(output, targets)`, by default the
    mean cross-entropy), update. Returns (output, loss, input_grad), output and loss detached."""
    a = inputs.detach().requires_grad_(needs_input_grad)
    logits = stage(a)
    loss = (loss_fn or F.cross_entropy)(logits, targets)
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if optimizer is not None:
        optimizer.step()
    return logits.detach(), loss.detach(), a.grad


def synthesizer_update(optimizer, g_hat, input_grad, *, loss_scale=None):
    """Train a synthesizer on the true gradient of the batch its `g_hat` was made for.

    `input_grad` is dL/dh from the next stage's backward; the target is s times it (see
    `resolve_loss_scale`; default: the batch size). Returns (sg_loss, cosine) detached.
    """
    loss, cos = synthesizer_objective(g_hat, input_grad, resolve_loss_scale(loss_scale, input_grad))
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if optimizer is not None:
        optimizer.step()
    return loss.detach(), cos


@dataclass
class StagePass:
    """What one pass of `run_stages` left: the last stage's output and loss (detached), and per
    synthesizer its loss and cosine (None where it had no target in this pass)."""
    output: torch.Tensor
    loss: torch.Tensor
    sg_loss: list
    sg_cos: list


def _optimizer(optimizers, i):
    return None if optimizers is None else optimizers[i]


def run_stages(net, stage_optimizers, synth_optimizers, x, y, *, context, loss_fn=None, loss_scale=None,
               picked=None, stage_inputs=None, stage_scope=None):
    """The one loop over the stages of every stage-wise DNI step (`dni_step`, `dni.unlock`'s steps),
    in the order of the module docstring.

    `stage_optimizers` / `synth_optimizers`: one per stage / synthesizer, or None when one optimizer
    over the whole net is zeroed and stepped by the caller. `picked[i]` False: stage i only runs
    forward (no graph) and does not update, and its synthesizer is asked for g_hat only when stage
    i+1 will give it a target (dni.unlock's stochastic updates; None: every stage updates).
    `stage_inputs(i, h)`: stage i's input given the previous stage's detached output h (default h;
    dni.unlock's complete unlock gives synthetic inputs). `stage_scope(stage)`: a context manager
    around each stage's update (complete unlock keeps BatchNorm statistics with it).
    """
    last = len(net.stages) - 1
    h, g_hat_prev = x, None
    sg_losses, sg_coses = [None] * last, [None] * last
    for i, stage in enumerate(net.stages):
        inputs = h if stage_inputs is None else stage_inputs(i, h)
        g_hat = None
        if picked is None or picked[i]:
            with stage_scope(stage) if stage_scope is not None else contextlib.nullcontext():
                if i < last:
                    h, g_hat, input_grad = stage_update(stage, _optimizer(stage_optimizers, i), net.synthesizers[i],
                                                        inputs, context, needs_input_grad=i > 0, loss_scale=loss_scale)
                else:
                    output, loss, input_grad = loss_update(stage, _optimizer(stage_optimizers, i), inputs, y,
                                                           needs_input_grad=i > 0, loss_fn=loss_fn)
            if i > 0 and g_hat_prev is not None:
                sg_losses[i - 1], sg_coses[i - 1] = synthesizer_update(
                    _optimizer(synth_optimizers, i - 1), g_hat_prev, input_grad, loss_scale=loss_scale)
        else:
            with torch.no_grad():  # forward only: no update, no gradient for anyone
                h = stage(inputs)
            if i == last:
                output, loss = h, (loss_fn or F.cross_entropy)(h, y)
            elif picked[i + 1]:  # M_i gets a target from stage i+1 this step: it needs its prediction
                g_hat = synthesize(net.synthesizers[i], h, context)
        g_hat_prev = g_hat
    return StagePass(output=output, loss=loss, sg_loss=sg_losses, sg_cos=sg_coses)


def dni_step(net, stage_optimizers, synth_optimizers, x, y, *, loss_fn=None, context=None, loss_scale=None):
    """One DNI step on a batch: every stage updated from its synthetic gradient, every
    synthesizer from the bootstrapped target of the same batch. See the module docstring.

    `stage_optimizers`: one optimizer per stage, and `synth_optimizers` one per synthesizer; or a
    single optimizer over all of `net`'s parameters and `synth_optimizers` None. `loss_fn(output, y)`:
    the last stage's loss (default: mean cross-entropy). `context`: the synthesizers' context
    (default: `net.context(y)`, one-hot labels under cDNI). `loss_scale`: see the module docstring.
    """
    single = isinstance(stage_optimizers, torch.optim.Optimizer)
    if single:
        stage_optimizers.zero_grad(set_to_none=True)
    result = run_stages(net, None if single else stage_optimizers, None if single else synth_optimizers, x, y,
                        context=net.context(y) if context is None else context, loss_fn=loss_fn,
                        loss_scale=loss_scale)
    if single:
        stage_optimizers.step()
    return StepStats(loss=result.loss, correct=count_correct(result.output, y), sg_loss=result.sg_loss,
                     sg_cos=result.sg_cos)


def backprop_step(net, stage_optimizers, x, y, *, loss_fn=None):
    """One ordinary backprop step: the baseline every DNI number is compared against.
    `stage_optimizers`: a list, or one optimizer over the net."""
    optimizers = [stage_optimizers] if isinstance(stage_optimizers, torch.optim.Optimizer) else stage_optimizers
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    logits = net(x)
    loss = (loss_fn or F.cross_entropy)(logits, y)
    loss.backward()
    for optimizer in optimizers:
        optimizer.step()
    return StepStats(loss=loss.detach(), correct=count_correct(logits.detach(), y))


def nobprop_step(net, stage_optimizers, x, y, *, loss_fn=None):
    """The paper's "No Bprop" baseline (Table 1): only the last stage learns, from the real loss;
    the stages below keep their random initial weights (their BatchNorm statistics still move)."""
    with torch.no_grad():
        h = x
        for stage in net.stages[:-1]:
            h = stage(h)
    logits, loss, _ = loss_update(net.stages[-1], stage_optimizers[-1], h, y, needs_input_grad=False,
                                  loss_fn=loss_fn)
    return StepStats(loss=loss, correct=count_correct(logits, y))
