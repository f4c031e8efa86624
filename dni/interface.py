"""The decoupled neural interface (paper, section 2): the update, written once, and its drop-in form.

The update (`synthesize`, `synthetic_gradient`, `synthesizer_objective`). At a cut after
activation h (the trigger), with context c and loss scale s:

    g_hat = M(h.detach(), c)                 the synthetic gradient, per example (dni.synthesizers)
    below the cut:  backward g_hat / s        instead of the true gradient
    M learns:       || g_hat - s * dL/dh ||^2  dL/dh, the gradient the layers above send back: the
                                              bootstrapped target (their own gradient is synthetic too)

s is the loss scale: synthesizers predict per-example gradients (of the batch-summed loss), so
with a loss averaged over the batch s is the batch size B (the default, `loss_scale=None`); with
a summed loss s = 1; with a loss averaged over B sequences of T tokens, s = B * T makes the
synthesizer predict per-token gradients. Any number, or a function of h, can be given.

Three forms use it:

- `DNI`, the drop-in (here): `h = interface(h, context=c)` anywhere in a user's forward. The user
  keeps their loss, optimizer and loop; one `loss.backward(); optimizer.step()` a step gives the
  layers below the cut g_hat / s (never the true gradient), and the synthesizer the gradient of
  its objective on the true gradient that the layers above sent back in that same backward.
- The stage-wise form (`dni.stages`: `DNINet`, `dni_step`), which the paper's experiments,
  `dni.unlock` and `dnilab.pipeline` run: each stage updates from its synthetic gradient before
  the next one runs.
- The recurrent form (`dni.recurrent.RecurrentDNI`): the cut is the boundary between two
  truncated-BPTT windows (section 3.2).

Every quantity of a step is computed from the parameters at its start (stage outputs are
detached before their stage steps; g_hat before its synthesizer learns), so a `DNI` after every
stage of the same net, trained by one loss.backward() and one step, gives the stage-wise
form's parameters bit for bit (tests/test_api.py). What differs is only when each update can
happen: the stage-wise form steps stage i before stage i+1 runs, which is what a pipeline of
workers needs; the drop-in applies g_hat when the user's backward reaches the cut, so that
`zero_grad` and `step` keep their usual places (forward never writes `.grad`).
"""
import functools
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from dni.errors import DNIError
from dni.synthesizers import make_synthesizer, synthesizer_loss


class InterfaceError(DNIError, ValueError):
    """A `DNI` used in a way it cannot serve (a trigger or context of the wrong shape, batch or
    dtype, a gradient reaching h by another path); the message, one sentence, names the interface,
    what it got and what it expected."""


# ---------------------------------------------------------------- the update, written once

def resolve_loss_scale(loss_scale, h):
    """The factor s between per-example gradients and those of the loss backpropagated: `loss_scale`
    as given (a number, or a function of h), or the batch size len(h) when None (a batch-mean loss)."""
    if loss_scale is None:
        return len(h)
    return loss_scale(h) if callable(loss_scale) else loss_scale


def synthesize(synthesizer, h, context=None):
    """g_hat = M(h.detach(), c): the synthetic gradient for h, per example, with its graph to M's
    parameters (kept for M's own update, so its BatchNorm statistics move once). The context, any
    tensor, is used in the trigger's dtype and device."""
    trigger = h.detach()
    if context is not None:
        context = context.to(device=trigger.device, dtype=trigger.dtype)
    return synthesizer(trigger, context)


def synthetic_gradient(g_hat, loss_scale, dtype):
    """What the layers below a cut receive as d loss / d h: g_hat / s, in h's `dtype`."""
    return (g_hat.detach() / loss_scale).to(dtype)


def synthesizer_objective(g_hat, grad, loss_scale):
    """The synthesizer's loss on its bootstrapped target s * grad (`grad`: d loss / d h as the layers
    above sent it back), in at least float32; returns (loss, with its graph to g_hat; cosine of
    g_hat with the target, detached)."""
    dtype = torch.promote_types(g_hat.dtype, torch.float32)
    target = grad.detach().to(dtype) * loss_scale
    g_hat = g_hat.to(dtype)
    loss = synthesizer_loss(g_hat, target)
    cos = F.cosine_similarity(g_hat.detach().flatten(), target.flatten(), dim=0)
    return loss, cos


# ---------------------------------------------------------------- the drop-in form

class _Cut(torch.autograd.Function):
    """Identity in forward. In backward, the gradient arriving from above (the true one) becomes the
    synthesizer's target, and the layers below receive the synthetic gradient instead.

    `multiplier` k: the factor the user's loss carries (GradScaler's scale, 1 / accumulation steps):
    the target is the true gradient divided by it, the layers below receive g_hat times it, and so
    does the synthesizer's own gradient, as every other gradient of that backward. k = 1 (the
    default) skips all three multiplications, so the default update is the same to the bit."""

    @staticmethod
    def forward(ctx, h, g_hat, loss_scale, multiplier, record, sent):
        ctx.save_for_backward(g_hat)
        ctx.loss_scale, ctx.multiplier, ctx.record, ctx.sent, ctx.h_dtype = loss_scale, multiplier, record, sent, h.dtype
        return h.clone()  # a new tensor, so the layers above may modify it in place

    @staticmethod
    def backward(ctx, grad):
        (g_hat,) = ctx.saved_tensors
        k = ctx.multiplier
        scale = ctx.loss_scale if k == 1 else ctx.loss_scale / k  # target s * grad / k; below g_hat * k / s
        with torch.enable_grad():  # d objective / d g_hat, which autograd carries on into M's parameters
            leaf = g_hat.detach().requires_grad_()
            loss, cos = synthesizer_objective(leaf, grad, scale)
            (g_hat_grad,) = torch.autograd.grad(loss, leaf)
        if k != 1:
            g_hat_grad = g_hat_grad * k
        ctx.record(loss.detach(), cos)
        below = synthetic_gradient(g_hat, scale, ctx.h_dtype)
        if ctx.sent is not None:  # for the leak check on h (DNI._leak_check)
            ctx.sent["grad"], ctx.sent["version"] = below, below._version
        return below, g_hat_grad.to(g_hat.dtype), None, None, None, None


def _shape(dims):
    return "(" + ", ".join(str(d) for d in dims) + ")"


def resolve_loss_multiplier(loss_multiplier):
    """k, the factor the loss carries: 1 when None; a number as given; `get_scale()` of a
    torch.amp.GradScaler (its scale as of this step; 1 when disabled); or a function's value."""
    if loss_multiplier is None:
        return 1
    if hasattr(loss_multiplier, "get_scale"):
        return float(loss_multiplier.get_scale())
    value = loss_multiplier() if callable(loss_multiplier) else loss_multiplier
    return float(value) if isinstance(value, torch.Tensor) else value


class DNI(nn.Module):
    """A decoupled neural interface at any point of a user's forward: `h = interface(h, context=c)`.

    In training mode (with autograd on), the value of h passes unchanged; in the backward of the
    user's loss the layers below receive the synthetic gradient M(h, c) / s and not the true one,
    and the synthesizer M learns from the true gradient that arrives from above (the target of
    the module docstring). Its parameters are this module's, so the user's optimizer over the
    model's parameters updates it with everything else (`dni.param_groups` gives them a rate and
    options of their own; under SGD with momentum build it with `batch_norm=False`). In eval
    mode, under torch.no_grad, or where nothing below h needs a gradient, it is the identity and
    M is not called: synthesizers are not used at test time. Works under autocast and
    torch.compile (dynamo breaks the graph at each interface: the synthesizer's objective is
    differentiated inside the backward).

    A cut needs every use of h above it to go through the interface: a gradient that reaches h by
    another path (a skip connection around the interface, a second use of h) would reach the layers
    below beside the synthetic one, so the backward raises `InterfaceError` naming the interface,
    unless `allow_leaks=True`. Weights tied across the cut cannot be seen from h and are not
    supported. Triggers and contexts of the wrong shape, batch or dtype raise `InterfaceError` too.

    `synthesizer`: any module with forward(trigger, context) returning a tensor shaped like the
    trigger; or `shape` (the trigger's per-example shape: (F,), (C, H, W), (T, D), or (C, L) with
    kind="conv1d") and the keywords of `dni.synthesizers.make_synthesizer` to build one.
    `loss_scale`: s, see the module docstring (default: the batch size, for a batch-mean loss).
    `loss_multiplier`: k, a factor the loss carries beyond its reduction, so that the synthesizer's
    target stays the gradient of the loss without it: a number (a constant weight; 1 / n for a loss
    divided over n accumulated micro-batches), a function returning one, or a torch.amp.GradScaler
    (its current scale is read at each forward). After each backward through it, `sg_loss` and
    `sg_cos` hold the synthesizer's loss and the cosine of g_hat with its target.
    """

    def __init__(self, synthesizer=None, *, shape=None, loss_scale=None, loss_multiplier=None, allow_leaks=False,
                 **synth_kwargs):
        super().__init__()
        if (synthesizer is None) == (shape is None):
            raise InterfaceError("DNI needs a synthesizer module or the trigger's per-example shape, not both")
        self.synthesizer = synthesizer if synthesizer is not None else make_synthesizer(shape, **synth_kwargs)
        self.shape = None if shape is None else tuple(shape)
        self.loss_scale = loss_scale
        self.loss_multiplier = loss_multiplier
        self.allow_leaks = allow_leaks
        self.sg_loss: Optional[torch.Tensor] = None
        self.sg_cos: Optional[torch.Tensor] = None

    def _label(self):
        """How error messages name this interface."""
        return f"DNI(shape={self.shape})" if self.shape is not None else f"DNI({type(self.synthesizer).__name__})"

    def _record(self, sg_loss, sg_cos):
        self.sg_loss, self.sg_cos = sg_loss, sg_cos

    def _expected_trigger(self):
        """The trigger's expected dims after the batch: ints, or names where any size serves."""
        free = getattr(self.synthesizer, "free_dims", {})
        return tuple(free.get(i, d) for i, d in enumerate(self.shape))

    def _check(self, h, context):
        """Say in one sentence what is wrong with a trigger or context, before the synthesizer fails
        on it somewhere deep (a matmul, a cat, BatchNorm); cheap: shapes and dtypes only."""
        if self.shape is not None:
            expected = self._expected_trigger()
            got = tuple(h.shape[1:])
            if len(got) != len(expected) or any(isinstance(e, int) and e != g for e, g in zip(expected, got)):
                raise InterfaceError(f"{self._label()} got a trigger of shape {_shape(h.shape)}; expected {_shape(('B',) + expected)}")
        features = getattr(self.synthesizer, "context_features", None)
        if features is not None:
            if features and context is None:
                raise InterfaceError(f"{self._label()} got no context; expected one of shape {_shape((len(h), features))} "
                                     f"(its synthesizer has context_features={features})")
            if not features and context is not None:
                raise InterfaceError(f"{self._label()} got a context of shape {_shape(context.shape)}; expected none "
                                     f"(its synthesizer has context_features=0)")
            width_ok = context is not None and context.dim() >= 2 and features in (context.shape[-1],
                                                                                  math.prod(context.shape[1:]))
            if context is not None and (not width_ok or len(context) != len(h)):
                raise InterfaceError(f"{self._label()} got a context of shape {_shape(context.shape)} for a trigger of batch "
                                     f"{len(h)}; expected {_shape((len(h), features))}")
            weight = next((p for p in self.synthesizer.parameters() if p.is_floating_point()), None)
            if weight is not None and h.dtype != weight.dtype and not torch.is_autocast_enabled(h.device.type):
                raise InterfaceError(f"{self._label()} got a trigger of dtype {h.dtype}; expected {weight.dtype}, its "
                                     f"synthesizer's (convert the model and the interface together, or use autocast)")

    def _synthesize(self, h, context):
        self._check(h, context)
        try:
            g_hat = synthesize(self.synthesizer, h, context)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, ValueError, TypeError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            if "more than 1 value per channel" in reason:
                raise InterfaceError(f"{self._label()} got a batch of {len(h)} (trigger {_shape(h.shape)}); its synthesizer's "
                                     f"BatchNorm needs more than one value per channel in training: use batches of "
                                     f"two or more, or a synthesizer without BatchNorm (hidden_layers=0)") from error
            where = "" if context is None else f" and a context of shape {_shape(context.shape)}"
            raise InterfaceError(f"{self._label()} could not run its synthesizer on a trigger of shape {_shape(h.shape)}"
                                 f"{where} ({reason})") from error
        if g_hat.shape != h.shape:
            raise InterfaceError(f"{self._label()} got a synthetic gradient of shape {_shape(g_hat.shape)} from its "
                                 f"synthesizer; expected the trigger's, {_shape(h.shape)}")
        return g_hat

    def _leak_check(self, sent, grad):
        """Tensor hook on h: what arrives must be what the cut sent. The first backward checks; the
        identity test is free, values are compared only where autograd made a new tensor."""
        if sent.get("checked"):
            return
        sent["checked"] = True
        ours, version = sent.pop("grad", None), sent.pop("version", None)
        if ours is not None and (grad is ours and ours._version == version or
                                 grad is not ours and torch.equal(grad, ours)):
            return
        raise InterfaceError(f"{self._label()} found a gradient reaching its input by another path than the interface "
                             f"(a skip connection around it, or a second use of h), which the layers below "
                             f"would learn from beside the synthetic gradient: route every use of h through the "
                             f"interface, or pass allow_leaks=True to allow it")

    def forward(self, h, context=None):
        if not (self.training and torch.is_grad_enabled() and h.requires_grad):
            return h
        g_hat = self._synthesize(h, context)
        sent = None if self.allow_leaks else {}
        out = _Cut.apply(h, g_hat, resolve_loss_scale(self.loss_scale, h), resolve_loss_multiplier(self.loss_multiplier),
                         self._record, sent)
        if sent is not None:
            h.register_hook(functools.partial(self._leak_check, sent))
        return out
