"""The paper's networks as sequences of stages (section 3.1, Table 1).

A stage is one layer: the unit a DNI decouples. A synthesizer sits after every
stage but the last, which ends in the classifier and sees the real loss.
- mlp: the FCN. Each hidden stage is Linear -> BatchNorm -> ReLU (256 units in the paper),
  then a linear classifier stage.
- cnn: conv stages (5x5 same conv -> BatchNorm -> ReLU -> 3x3/2 pooling: max for the first,
  average after, as in the paper), then a linear classifier stage.

Their default sizes and rates are presets (dnilab.presets), not part of the networks.
"""
import torch
import torch.nn as nn


def mlp_stages(*, in_shape, classes=10, depth=3, hidden=256, **_):
    """`depth` hidden stages of `hidden` units, then a linear classifier: depth + 1 stages."""
    stages, n_in = [], int(torch.tensor(in_shape).prod())
    for i in range(depth):
        flatten = [nn.Flatten()] if i == 0 else []
        stages.append(nn.Sequential(*flatten, nn.Linear(n_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU()))
        n_in = hidden
    stages.append(nn.Sequential(*([nn.Flatten()] if depth == 0 else []), nn.Linear(n_in, classes)))
    return nn.ModuleList(stages)


def cnn_stages(*, in_shape, classes=10, depth=2, channels=32, **_):
    """`depth` conv stages of `channels` 5x5 filters, each halving the resolution, then a linear
    classifier on the flattened maps: depth + 1 stages."""
    stages, (c_in, h, w) = [], in_shape
    for i in range(depth):
        pool = nn.MaxPool2d(3, stride=2, padding=1) if i == 0 else nn.AvgPool2d(3, stride=2, padding=1)
        stages.append(nn.Sequential(nn.Conv2d(c_in, channels, 5, padding=2), nn.BatchNorm2d(channels),
                                    nn.ReLU(), pool))
        c_in, h, w = channels, (h + 1) // 2, (w + 1) // 2
    stages.append(nn.Sequential(nn.Flatten(), nn.Linear(c_in * h * w, classes)))
    return nn.ModuleList(stages)


# The registry of --model_type: name -> the function that builds its stages.
MODELS = {"mlp": mlp_stages, "cnn": cnn_stages}


@torch.no_grad()
def stage_shapes(stages, in_shape):
    """Per-example output shape of every stage, from a dry run in eval mode."""
    was_training = stages.training
    stages.eval()
    x, shapes = torch.zeros(1, *in_shape, device=next(stages.parameters()).device), []
    for stage in stages:
        x = stage(x)
        shapes.append(tuple(x.shape[1:]))
    stages.train(was_training)
    return shapes
