"""Local auxiliary losses at a cut: the decoupled method users pick beside DNI.

Decoupled Greedy Learning (Belilovsky, Eickenberg, Oyallon, ICML 2020) cuts a network like DNI
does, but the layers below a cut learn from a loss of their own instead of a synthetic gradient:
a small auxiliary head reads h and predicts the target, and its loss's gradient is all that the
layers below receive. The layers above read h as a constant, so no gradient crosses the cut
backwards: they wait for nothing from below, and below waits for nothing from above.

`LocalLoss` is the drop-in, shaped like `dni.DNI`: `h = cut(h, target)` anywhere in a forward,
the user's one `loss.backward()` trains the head and the layers below on the auxiliary loss and
the layers above on the user's loss, and `aux_loss` holds the head's loss after the forward.

`local_step` is the stage-wise form, `dni.stages.dni_step`'s twin for a `DNINet` whose `heads`
sit where a DNI net's synthesizers do (after every stage but the last):

    for i = 1..L:
        a   = h_{i-1}.detach()             # the cut: no backward call spans two stages
        h_i = f_i(a)
        i < L:  backward aux_i = CE(head_i(h_i), y) into f_i and head_i; step both
        i = L:  backward the real loss into f_L; step f_L

Each stage's backward stops at its input, so nothing crosses a cut backwards and no stage waits
for another's gradient (a pipeline worker sends activations only). `make_head` builds the
auxiliary classifiers DGL's simplest form uses.
"""
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from dni.stages import StepStats, count_correct, loss_update


class _Block(torch.autograd.Function):
    """Identity on h in forward. In backward the gradient from above stops here, and the auxiliary
    loss, an input of this node, receives a gradient of one: autograd carries it into the head and
    the layers below, as if the auxiliary loss had been added to the user's."""

    @staticmethod
    def forward(ctx, h, aux_loss):
        ctx.aux_like = aux_loss
        return h.clone()  # a new tensor, so the layers above may modify it in place

    @staticmethod
    def backward(ctx, grad):
        return None, torch.ones_like(ctx.aux_like)


class LocalLoss(nn.Module):
    """A cut trained by a local auxiliary loss: `h = cut(h, target)`.

    In training mode (autograd on, h needing a gradient), h passes unchanged; in the backward of
    the user's loss the layers below receive d aux_loss / d h only (the gradient from above is
    dropped), and `head` learns from the same auxiliary loss. In eval mode, under no_grad, or
    where nothing below needs a gradient, it is the identity and the head is not called.

    `head`: a module from h to the auxiliary prediction (for example a linear classifier, or as in
    DGL a small conv block and a pooled classifier). `loss_fn(prediction, target)`: the auxiliary
    loss, cross-entropy by default. `weight` multiplies it.
    """

    def __init__(self, head: nn.Module, *, loss_fn: Optional[Callable] = None, weight: float = 1.0):
        super().__init__()
        self.head, self.loss_fn, self.weight = head, loss_fn or F.cross_entropy, weight
        self.aux_loss: Optional[torch.Tensor] = None

    def forward(self, h, target=None):
        if not (self.training and torch.is_grad_enabled() and h.requires_grad):
            return h
        if target is None:
            raise ValueError(f"{type(self).__name__} needs the target of its auxiliary loss: cut(h, target)")
        aux_loss = self.weight * self.loss_fn(self.head(h), target)
        self.aux_loss = aux_loss.detach()
        return _Block.apply(h, aux_loss)


def make_head(shape, classes):
    """The auxiliary classifier of a stage whose output has per-example `shape`: for a vector
    (an FCN stage) a linear map to the classes; for feature maps (C, H, W) (a CNN stage) an
    average pool to 2x2 and a linear map of the 4C pooled features to the classes. These are the
    simplest auxiliary problems of Decoupled Greedy Learning (Belilovsky, Eickenberg, Oyallon,
    ICML 2020: a spatial average to a small map, then a linear classifier), without the extra
    conv and MLP layers of its larger heads."""
    if len(shape) == 1:
        return nn.Linear(shape[0], classes)
    if len(shape) == 3:
        return nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * shape[0], classes))
    raise ValueError(f"make_head(shape={tuple(shape)}) takes a (features,) or (channels, height, width) shape")


def local_update(stage, optimizer, head, head_optimizer, inputs, targets, *, loss_fn=None):
    """Forward a stage on its detached input and update it and its head at once from the
    auxiliary loss `loss_fn(head(h), targets)` (default: mean cross-entropy). The stage's backward
    stops at its input. Returns (h, aux_loss), both detached: h for the next stage.
    `optimizer` / `head_optimizer` None: the gradients are only accumulated (the caller steps)."""
    h = stage(inputs.detach())
    aux_loss = (loss_fn or F.cross_entropy)(head(h), targets)
    for opt in (optimizer, head_optimizer):
        if opt is not None:
            opt.zero_grad(set_to_none=True)
    aux_loss.backward()
    for opt in (optimizer, head_optimizer):
        if opt is not None:
            opt.step()
    return h.detach(), aux_loss.detach()


def local_step(net, stage_optimizers, head_optimizers, x, y, *, loss_fn=None):
    """One step of local losses on a batch: every stage but the last updated with its head from
    its auxiliary loss, the last from the real loss, in the order of the module docstring.

    `net`: a `dni.stages.DNINet` with `heads` (see `make_head`). `stage_optimizers` /
    `head_optimizers`: one optimizer per stage / head. `loss_fn(output, y)`: the real loss and
    every auxiliary one (default: mean cross-entropy). Returns `StepStats` with `aux_loss`, one
    value per head (sg_loss and sg_cos stay empty: there are no synthesizers)."""
    heads = getattr(net, "heads", None)
    if heads is None or len(heads) != len(net.stages) - 1:
        raise ValueError(f"local_step needs a DNINet with one head per stage but the last ({len(net.stages) - 1}), "
                         f"got {'none' if heads is None else len(heads)}")
    h, aux_losses, last = x, [], len(net.stages) - 1
    for i, stage in enumerate(net.stages[:-1]):
        h, aux_loss = local_update(stage, stage_optimizers[i], heads[i], head_optimizers[i], h, y, loss_fn=loss_fn)
        aux_losses.append(aux_loss)
    output, loss, _ = loss_update(net.stages[last], stage_optimizers[last], h, y, needs_input_grad=False,
                                  loss_fn=loss_fn)
    return StepStats(loss=loss, correct=count_correct(output, y), aux_loss=aux_losses)
