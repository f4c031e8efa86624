"""Synthetic gradient models M_i (paper section 2; cDNI in section 2 and 3.1).

A synthesizer reads a stage's output h_i (the *trigger*, always detached) and,
optionally, a *context* c (the one-hot label under cDNI), and predicts the
gradient of the loss w.r.t. h_i. Its last layer starts at zero, weights and
bias, so its first synthetic gradient is exactly zero (paper, section 3.1).

One kind per trigger shape (`make_synthesizer`): dense for (F,) (or any shape,
flattened), conv for feature maps (C, H, W), per-position for sequences (T, D),
and, asked for with kind="conv1d", a 1-D conv for channels over time (C, L) (the
output of a Conv1d: audio, time series). A 2-D shape is read as (T, D) unless
the caller says otherwise: the two cannot be told apart from the shape.
Any module with forward(trigger, context) returning a tensor shaped like the
trigger is a synthesizer too. The built-in ones use the context in the trigger's
dtype, so a float64 or bfloat16 network takes a float32 one-hot as it is.

Scale convention: a synthesizer predicts the *per-example* gradient
d loss_n / d h_n, i.e. the gradient of the batch-summed loss. The mean-reduced
loss's gradient is that divided by the batch size; `dni.interface` applies the
factor (its `loss_scale`, the batch size unless told otherwise), so a
synthesizer's output does not depend on the batch size.

Loss convention (one, used everywhere): `synthesizer_loss` is the mean over all
elements of (g_hat - g)^2, so dense and conv synthesizers share a learning rate.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def synthesizer_loss(g_hat, target):
    """L2 between synthetic and target gradient: mean over batch and features."""
    return F.mse_loss(g_hat, target.detach())


def zero_head(layer):
    """`layer` (a Linear or a convolution) with zero weight and bias: the last layer of every
    synthesizer (and of any model that must start by predicting exactly zero, paper section 3.1)."""
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class DenseSynthesizer(nn.Module):
    """M(h, c) on the flattened trigger (B, features), any trigger shape: `hidden_layers` x
    (Linear -> BatchNorm -> ReLU) of `width` units, then a zero-initialised Linear back to
    `features`, shaped like the trigger. hidden_layers=0 is linear; batch_norm=False drops the
    BatchNorm (what SGD needs, docs/design.md).

    Under cDNI the context joins the trigger at the input and, with `label_map`, also reaches
    the output through a zero-initialised linear map, as in ConvSynthesizer: below a linear
    classifier the true gradient W^T (p - y) has a part linear in the label, which this map
    can hold directly rather than through the hidden layer's BatchNorm and ReLU.
    """

    def __init__(self, *, features, context_features=0, hidden_layers=1, width=1024, label_map=True, batch_norm=True):
        super().__init__()
        self.context_features = context_features
        layers, n_in = [], features + context_features
        for _ in range(hidden_layers):
            layers += [nn.Linear(n_in, width), nn.BatchNorm1d(width) if batch_norm else nn.Identity(), nn.ReLU()]
            n_in = width
        layers.append(zero_head(nn.Linear(n_in, features)))
        self.net = nn.Sequential(*layers)
        self.context_map = zero_head(nn.Linear(context_features, features)) if context_features and label_map else None

    def forward(self, trigger, context=None):
        x = trigger.flatten(1)  # (B, features)
        if context is None:
            return self.net(x).view(trigger.shape)
        context = context.flatten(1).to(x.dtype)  # (B, context_features)
        out = self.net(torch.cat([x, context], dim=1))  # input (B, features + classes)
        if self.context_map is not None:
            out = out + self.context_map(context)
        return out.view(trigger.shape)


class ConvSynthesizer(nn.Module):
    """M(h, c) for feature maps (B, C, H, W): `hidden_layers` x (5x5 same conv -> BatchNorm -> ReLU)
    of `width` channels, then a zero-initialised 5x5 conv back to C. Under cDNI the one-hot
    context joins the trigger as extra planes, broadcast over height and width (the paper).

    Convolutions cannot tell one position from another, but a CNN that ends in a dense
    classifier has position-specific gradients (dL/dh = W^T (p - y) reshaped to C x H x W).
    So a zero-initialised map is added to the output: a learnt (C, H, W) bias, and under cDNI
    a linear map of the label to (C, H, W), which can hold -W^T y exactly. `position_map=False`
    drops both: the paper's conv synthesizer (section 3.1), label planes only.
    """

    conv, norm, spatial = nn.Conv2d, nn.BatchNorm2d, ("H", "W")  # Conv1dSynthesizer: one dimension

    def __init__(self, *, shape, context_features=0, hidden_layers=1, width=64, kernel_size=5, position_map=True,
                 batch_norm=True):
        super().__init__()
        self.context_features = context_features
        channels, pad = shape[0], kernel_size // 2
        layers, n_in = [], channels + context_features
        for _ in range(hidden_layers):
            layers += [self.conv(n_in, width, kernel_size, padding=pad),
                       self.norm(width) if batch_norm else nn.Identity(), nn.ReLU()]
            n_in = width
        layers.append(zero_head(self.conv(n_in, channels, kernel_size, padding=pad)))
        self.net = nn.Sequential(*layers)
        self.shape = tuple(shape)
        self.position = nn.Parameter(torch.zeros(self.shape)) if position_map else None  # (C, *spatial)
        # trigger dims of any size, for DNI's checks
        self.free_dims = {} if position_map else {i + 1: name for i, name in enumerate(self.spatial)}
        self.context_map = zero_head(nn.Linear(context_features, math.prod(shape[1:]) * channels)) \
            if context_features and position_map else None

    def forward(self, trigger, context=None):
        B, sizes = trigger.shape[0], trigger.shape[2:]
        out = self.position if self.position is not None else 0
        if context is not None:
            context = context.flatten(1).to(trigger.dtype)  # (B, context_features)
            planes = context.view(*context.shape, *[1] * len(sizes)).expand(B, context.shape[1], *sizes)
            trigger = torch.cat([trigger, planes], dim=1)  # (B, C + context_features, *spatial)
            if self.context_map is not None:
                out = out + self.context_map(context).view(B, *self.shape)
        return self.net(trigger) + out


class SequenceSynthesizer(DenseSynthesizer):
    """M(h, c) for sequences (B, T, D): one small dense synthesizer (see DenseSynthesizer, of
    `features` = D) applied at every position, so it serves any length T. The context is one per
    sequence, (B, context_features), read at every position, or one per position,
    (B, T, context_features). Its BatchNorm statistics are over all B * T positions.
    """

    free_dims = {0: "T"}  # any length, for DNI's checks

    def forward(self, trigger, context=None):
        B, T, D = trigger.shape
        if context is not None:
            if context.dim() == 2:  # one per sequence: every position reads it
                context = context[:, None, :].expand(B, T, context.shape[1])
            context = context.reshape(B * T, -1)
        return super().forward(trigger.reshape(B * T, D), context).view(B, T, D)


class Conv1dSynthesizer(ConvSynthesizer):
    """M(h, c) for channels over time (B, C, L), the output of a Conv1d (audio, time series):
    ConvSynthesizer in one dimension. `hidden_layers` x (same Conv1d of `kernel_size` -> BatchNorm
    -> ReLU) of `width` channels, then a zero-initialised Conv1d back to C; under cDNI the context,
    (B, context_features), joins the trigger as constant channels. `position_map` (as in
    ConvSynthesizer): a learnt (C, L) bias and under cDNI a linear map of the context to (C, L),
    both starting at zero; without it the synthesizer serves any length L.
    """

    conv, norm, spatial = nn.Conv1d, nn.BatchNorm1d, ("L",)


KINDS = ("conv", "dense", "conv1d")


def make_synthesizer(shape, *, kind="conv", context_features=0, hidden_layers=1, width=1024, conv_width=64,
                     label_map=True, position_map=True, batch_norm=True):
    """The synthesizer for a trigger of per-example `shape`: (features,) -> dense; (C, H, W) -> conv;
    (T, D) -> per-position (SequenceSynthesizer, `width` units). `kind` "dense": dense on the
    flattened trigger, any shape; "conv1d": a 2-D shape is (C, L), channels over time
    (Conv1dSynthesizer, `conv_width` channels); "conv", the default, leaves a 2-D shape (T, D).
    `label_map`: see DenseSynthesizer; `position_map`: see ConvSynthesizer. `batch_norm=False`:
    hidden layers without BatchNorm, which SGD needs (docs/design.md); Adam runs keep it."""
    if kind is not None and kind not in KINDS:  # None: the default (the CLI's unset --synth_type)
        raise ValueError(f"make_synthesizer got kind={kind!r}; expected one of {', '.join(KINDS)}")
    if kind == "conv1d":
        if len(shape) != 2:
            raise ValueError(f"make_synthesizer(kind='conv1d') got shape {tuple(shape)}; expected (C, L)")
        return Conv1dSynthesizer(shape=shape, context_features=context_features, hidden_layers=hidden_layers,
                                 width=conv_width, position_map=position_map, batch_norm=batch_norm)
    if len(shape) == 2 and kind != "dense":
        return SequenceSynthesizer(features=shape[1], context_features=context_features,
                                   hidden_layers=hidden_layers, width=width, label_map=label_map,
                                   batch_norm=batch_norm)
    if len(shape) == 1 or kind == "dense":
        return DenseSynthesizer(features=math.prod(shape), context_features=context_features,
                                hidden_layers=hidden_layers, width=width, label_map=label_map,
                                batch_norm=batch_norm)
    if len(shape) == 3:
        return ConvSynthesizer(shape=shape, context_features=context_features,
                               hidden_layers=hidden_layers, width=conv_width, position_map=position_map,
                               batch_norm=batch_norm)
    raise ValueError(f"no synthesizer for trigger shape {tuple(shape)}")
