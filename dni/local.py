"""Local auxiliary losses at a cut: the decoupled method users pick beside DNI.

Decoupled Greedy Learning (Belilovsky, Eickenberg, Oyallon, ICML 2020) cuts a network like DNI
does, but the layers below a cut learn from a loss of their own instead of a synthetic gradient:
a small auxiliary head reads h and predicts the target, and its loss's gradient is all that the
layers below receive. The layers above read h as a constant, so no gradient crosses the cut
backwards: they wait for nothing from below, and below waits for nothing from above.

`LocalLoss` is the drop-in, shaped like `dni.DNI`: `h = cut(h, target)` anywhere in a forward,
the user's one `loss.backward()` trains the head and the layers below on the auxiliary loss and
the layers above on the user's loss, and `aux_loss` holds the head's loss after the forward.
"""
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


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
