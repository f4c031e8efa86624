"""Recurrent DNI: synthetic gradients at the boundaries of truncated BPTT windows (paper, section 3.2, Figure 3).

A recurrent model trained by truncated BPTT runs windows of T steps, and nothing from the future
reaches a window. With DNI, a synthesizer M reads the state s at the window's end (its trigger:
a tensor, or a tuple such as nn.LSTM's (h, c)) and predicts the gradient of all future loss
w.r.t. it; that synthetic gradient, times `factor`, is backpropagated into the window together
with the window's own loss. The gradient that then reaches the window's start state is the
bootstrapped target of M's prediction there, where the previous window ended. `RecurrentDNI`
adds this to a user's own loop:

    sg = dni.RecurrentDNI(features=2 * hidden)       # a synthesizer for nn.LSTM's state (h, c)
    for x, y in windows:
        state = sg.begin(state)                      # the window's start: detached, requires grad
        out, state = lstm(x, state)
        loss = F.cross_entropy(readout(out).flatten(0, 1), y.flatten())
        optimizer.zero_grad()
        state = sg.backward(loss, state)             # was: loss.backward(); state = detached state
        optimizer.step()

It rests on dni.interface's update (`synthesize`, `synthesizer_objective`), with its scale
convention: M predicts per-example gradients, i.e. gradients of the batch-summed loss, and s,
the loss scale, is the batch size B for a loss averaged over the batch. The objective
backpropagated is loss + factor * <s_end, g_end> / s, and M's target at the start is
s * d objective / d s_start. Because the target includes the scaled synthetic gradient, M learns
a gradient of the future loss in which each further window counts `factor` times less (the
paper's scheme, factor 0.1; with factor 1, all of the future loss, finite where the state is
reset at episode boundaries). `discount` sets that discount apart from the scale the window is
sent: the target then counts the synthetic gradient M sent back `discount` times (one more
backward, of <s_end, g_end> to the start state, computes it).

The state is flattened per example into the trigger, (B, features): each tensor with its batch
dimension first (`batch_dim`; by default dim 1 of a 3-D tensor, as in nn.LSTM / nn.GRU /
nn.RNN's (num_layers, B, H), batch_first or not, and dim 0 otherwise, as in nn.LSTMCell's
(B, H)), then the tensors side by side; M's prediction is split back into the state's structure.
The default M is linear and zero-initialised, as in the paper: its first synthetic gradient is
exactly zero, so the first windows are plain truncated BPTT.

DNI + Aux, the paper's variant (section 3.2): the core also predicts, at each step of the window,
the synthetic gradient that the window's end will receive, g_end (M's prediction there,
detached); `aux_weight` times the squared error of that prediction trains the core. Pass the
core's predictions to backward (`sg.backward(loss, state, aux=predictions)`). Its gradient
reaches the core's parameters only: M's target is the gradient of the window's loss and
synthetic term alone, and M never sees the auxiliary loss.
"""
import functools
import math
import operator
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from dni.interface import InterfaceError, resolve_loss_scale, synthesize, synthesizer_objective
from dni.synthesizers import DenseSynthesizer

SG_FACTOR = 0.1  # the paper's scale of the synthetic gradient (section 3.2)
_IDLE = object()  # the start of a window that begin() has not opened


def _shape(dims):
    return "(" + ", ".join(str(d) for d in dims) + ")"


def _flatten(parts, dims):
    """The state's tensors as one (B, features) trigger: batch first, flattened, side by side."""
    flat = [t.movedim(d, 0).reshape(t.shape[d], -1) for t, d in zip(parts, dims)]
    return flat[0] if len(flat) == 1 else torch.cat(flat, dim=1)


def _unflatten(flat, parts, dims):
    """A (B, features) tensor split back into tensors shaped as `parts`."""
    sizes = [math.prod(t.shape) // t.shape[d] for t, d in zip(parts, dims)]
    pieces = flat.split(sizes, dim=1)
    return [p.reshape(t.movedim(d, 0).shape).movedim(0, d) for p, t, d in zip(pieces, parts, dims)]


def _rebuild(state, parts):
    """`parts` in the structure of `state`: a tensor, a tuple (a named one too) or a list."""
    if isinstance(state, torch.Tensor):
        return parts[0]
    return type(state)(*parts) if hasattr(state, "_fields") else type(state)(parts)


class RecurrentDNI(nn.Module):
    """Synthetic gradients at the boundaries of a user's truncated-BPTT windows (section 3.2).

    At each window: `state = sg.begin(state)` before the forward (the start state, detached and
    requiring grad; None stays None, for a model that starts from its own zero state), then the
    user's forward from it, then `state = sg.backward(loss, end_state)` in place of
    `loss.backward()`. backward, in this order: (1) the synthesizer reads the start and end states
    (detached) in one pass: g_end, the synthetic gradient at the window's end, and g_start, its
    prediction at the start; (2) backward of loss + factor * <s_end, g_end> / s, which accumulates
    into .grad the gradients of the user's parameters and of the start state; (3) the synthesizer
    learns: `synthesizer_objective` of g_start on the target s * d objective / d s_start, zero
    where no gradient reaches the start (a model that resets its state there); its gradient
    accumulates into its parameters' .grad. Returns the end
    state, detached, where the next window begins. The caller zeroes grads before and steps its
    optimizer(s) after, as with loss.backward(); with these parameters in one optimizer
    (`model.parameters()` of a model that holds this module) one step updates both. A first
    window begun from None makes no prediction at its start, so the synthesizer does not learn.

    `features`: the state's size per example (2 * hidden * num_layers for nn.LSTM's (h, c)); the
    default synthesizer is `DenseSynthesizer(features=features, hidden_layers=0)`, linear and
    zero-initialised, as in the paper. `synthesizer`: any module with forward(trigger, context),
    as for `dni.DNI` (called with context None), returning a tensor shaped like the (B, features)
    trigger. `factor`: the synthetic gradient's scale (default SG_FACTOR, the paper's 0.1);
    `discount`: the target's discount when it differs from `factor` (module docstring).
    `batch_dim`: the batch dimension of every state tensor (default: 1 for 3-D, 0 otherwise).
    `loss_scale`: s, as for `dni.DNI` (default: the batch size, for a batch-mean loss).
    After each backward, `sg_loss` and `sg_cos` hold the synthesizer's loss and the cosine of its
    prediction with the target (None when the window began from None), `synthetic` g_end and
    `target` the target, both (B, features) and detached. A state of another structure or size
    than the synthesizer's, tensors of different batch sizes, or backward without begin raise
    `dni.InterfaceError` in one sentence.
    """

    def __init__(self, synthesizer=None, *, features=None, factor=SG_FACTOR, discount=None, batch_dim=None,
                 loss_scale=None, aux_weight=0.0):
        super().__init__()
        if synthesizer is None and features is None:
            raise InterfaceError("RecurrentDNI needs the state's size per example (features=...) or a synthesizer module")
        if synthesizer is not None and not isinstance(synthesizer, nn.Module):
            raise InterfaceError(f"RecurrentDNI got a synthesizer of type {type(synthesizer).__name__}; expected a "
                                 f"module (for the default one, pass the state's size as features=...)")
        self.synthesizer = synthesizer if synthesizer is not None else DenseSynthesizer(features=features,
                                                                                       hidden_layers=0)
        self.features, self.factor, self.discount = features, factor, discount
        self.batch_dim, self.loss_scale, self.aux_weight = batch_dim, loss_scale, aux_weight
        self.sg_loss: Optional[torch.Tensor] = None
        self.sg_cos: Optional[torch.Tensor] = None
        self.aux_loss: Optional[torch.Tensor] = None
        self.synthetic: Optional[torch.Tensor] = None
        self.target: Optional[torch.Tensor] = None
        self._start = _IDLE

    def _label(self):
        """How error messages name this interface."""
        if self.features is not None:
            return f"RecurrentDNI(features={self.features})"
        return f"RecurrentDNI({type(self.synthesizer).__name__})"

    def _parts(self, state, what):
        """The tensors of a state and the batch dimension of each, checked against the synthesizer."""
        parts = [state] if isinstance(state, torch.Tensor) else list(state) if isinstance(state, (tuple, list)) else []
        if not parts or not all(isinstance(t, torch.Tensor) for t in parts):
            raise InterfaceError(f"{self._label()} got {what} of type {type(state).__name__}; expected a tensor or a "
                                 f"tuple of tensors, such as nn.LSTM's (h, c)")
        dims = [self.batch_dim if self.batch_dim is not None else 1 if t.dim() == 3 else 0 for t in parts]
        shapes = ", ".join(_shape(t.shape) for t in parts)
        if any(t.dim() <= d for t, d in zip(parts, dims)):
            raise InterfaceError(f"{self._label()} got {what} of shape {shapes}, without a batch dimension "
                                 f"{dims[0] if len(set(dims)) == 1 else dims}; pass batch_dim=... to say where it is")
        if len({t.shape[d] for t, d in zip(parts, dims)}) > 1:
            raise InterfaceError(f"{self._label()} got {what} whose tensors hold different batch sizes: shapes "
                                 f"{shapes}, batch dimension {dims[0] if len(set(dims)) == 1 else dims}")
        features = sum(math.prod(t.shape) // t.shape[d] for t, d in zip(parts, dims) if t.shape[d])
        if self.features is not None and features != self.features:
            raise InterfaceError(f"{self._label()} got {what} of shape {shapes}, {features} features per example; "
                                 f"expected {self.features}")
        return parts, dims

    @staticmethod
    def _layout(parts, dims):
        """What two states must share to be the same state: each tensor's shape and batch dimension."""
        return [(tuple(t.shape), d) for t, d in zip(parts, dims)]

    def begin(self, state):
        """The window's start: `state` (a tensor, a tuple of tensors, or None) detached from the last
        window and requiring grad, so that backward can read the gradient that reaches it."""
        if state is None:
            self._start = None
            return None
        parts, dims = self._parts(state, "a start state")
        leaves = [t.detach().requires_grad_() for t in parts]
        self._start = (leaves, dims)
        return _rebuild(state, leaves)

    def backward(self, loss, state, *, aux=None):
        """Backward of the window's `loss` (a scalar, reduced as `loss_scale` says) and of the
        synthetic gradient at its end `state`; trains the synthesizer on the start's target.
        Returns the end state, detached. See the class docstring for the order.

        `aux` (DNI + Aux, with aux_weight > 0): the core's predictions of the synthetic gradient
        at the window's end, shaped (B, features) or (T, B, features) (one per step, time first);
        `aux_weight` times their mean squared error to g_end (detached) is backpropagated after
        the target is read, so it trains the core's parameters and nothing else."""
        label = self._label()
        if self._start is _IDLE:
            raise InterfaceError(f"{label}.backward() came without begin(): call state = sg.begin(state) at the "
                                 f"window's start, before the forward")
        start, self._start = self._start, _IDLE
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            got = _shape(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise InterfaceError(f"{label}.backward() got a loss of shape {got}; expected a scalar tensor")
        end, dims = self._parts(state, "an end state")
        if start is not None and self._layout(*start) != self._layout(end, dims):
            shapes = ", ".join(_shape(t.shape) for t in start[0])
            raise InterfaceError(f"{label} got an end state of shape {', '.join(_shape(t.shape) for t in end)}; "
                                 f"expected its window's start state's, {shapes}")
        if not any(t.requires_grad for t in end):
            raise InterfaceError(f"{label} got an end state that does not require grad (detached, or made under "
                                 f"torch.no_grad): the synthetic gradient could not reach the window")
        flat_end = _flatten(end, dims)                                                 # (B, features)
        B = len(flat_end)
        trigger = flat_end if start is None else torch.cat([_flatten(*start), flat_end])  # (2B, features)
        g_hat = self._synthesize(trigger)
        g_start, g_end = (None, g_hat) if start is None else g_hat.split(B)                # (B, features) each
        synthetic = functools.reduce(operator.add, [(t * g.detach()).sum() for t, g in
                                                    zip(end, _unflatten(g_end, end, dims))])
        scale = resolve_loss_scale(self.loss_scale, flat_end)
        objective = loss + self.factor * synthetic / scale
        rescale = start is not None and self.discount is not None and self.discount != self.factor
        aux_loss = self._aux_loss(aux, g_end, label)
        objective.backward(retain_graph=rescale or aux_loss is not None)
        self.synthetic, self.sg_loss, self.sg_cos, self.target = g_end.detach(), None, None, None
        if start is not None:
            leaves, _ = start
            # (B, features); zero where no gradient reaches the start (the model reset its state there)
            grad = _flatten([t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves], dims)
            target = grad * scale                                                      # (B, features)
            if rescale and any(t.grad is not None for t in leaves):
                carried = torch.autograd.grad(synthetic, leaves, allow_unused=True,
                                              retain_graph=aux_loss is not None)  # J^T g_end: what M sent back
                if any(c is not None for c in carried):
                    target = target + (self.discount - self.factor) * _flatten(
                        [c if c is not None else torch.zeros_like(t) for c, t in zip(carried, leaves)], dims)
            sg_loss, self.sg_cos = synthesizer_objective(g_start, target, 1)  # the target is per example already
            sg_loss.backward()
            self.sg_loss, self.target = sg_loss.detach(), target.detach()
        if aux_loss is not None:  # after the target was read: the core's parameters alone learn from it
            aux_loss.backward()
            self.aux_loss = aux_loss.detach()
        return _rebuild(state, [t.detach() for t in end])

    def _aux_loss(self, aux, g_end, label):
        """aux_weight * the mean squared error of the core's predictions `aux` to g_end, detached;
        None without aux or at weight 0 (plain DNI)."""
        self.aux_loss = None
        if aux is None or not self.aux_weight:
            return None
        if not isinstance(aux, torch.Tensor) or aux.shape[-2:] != g_end.shape or aux.dim() > 3:
            got = _shape(aux.shape) if isinstance(aux, torch.Tensor) else type(aux).__name__
            raise InterfaceError(f"{label}.backward() got aux predictions of shape {got}; expected (B, features) or "
                                 f"(T, B, features) with (B, features) = {_shape(g_end.shape)}")
        target = g_end.detach().to(aux.dtype).expand_as(aux)
        return self.aux_weight * F.mse_loss(aux, target)

    def _synthesize(self, trigger):
        """g_hat = M(trigger): the synthetic gradients of the states in `trigger`, (n, features)."""
        try:
            g_hat = synthesize(self.synthesizer, trigger)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, ValueError, TypeError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise InterfaceError(f"{self._label()} could not run its synthesizer on a trigger of shape "
                                 f"{_shape(trigger.shape)} (the state per example, start and end states stacked; "
                                 f"a synthesizer is called as forward(trigger, context=None)) ({reason})") from error
        if g_hat.shape != trigger.shape:
            raise InterfaceError(f"{self._label()} got a synthetic gradient of shape {_shape(g_hat.shape)} from its "
                                 f"synthesizer; expected the trigger's, {_shape(trigger.shape)}")
        return g_hat
