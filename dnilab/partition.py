"""How the stages of a net are shared among pipeline workers (dnilab.pipeline): balanced by
multiply-adds per example of each stage and its synthesizer (or auxiliary head), or as
`--partition 2,2` says."""
from functools import lru_cache

import torch
import torch.nn as nn

from dni.errors import DNIError
from dni.interface import synthesize


@torch.no_grad()
def stage_costs(net, in_shape):
    """Multiply-adds per example of each stage plus its synthesizer or its auxiliary head (forward
    pass): the work a worker does for that stage, up to a common factor for backward and update."""
    macs, current = [0] * len(net.stages), [0]

    def count(module, inputs, output):
        per_example = output[0].numel()
        if isinstance(module, nn.Linear):
            macs[current[0]] += per_example * module.in_features
        else:  # Conv2d
            kh, kw = module.kernel_size
            macs[current[0]] += per_example * module.in_channels // module.groups * kh * kw

    hooks = [m.register_forward_hook(count) for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    was_training = net.training
    net.eval()
    try:
        h = torch.zeros(1, *in_shape, device=next(net.parameters()).device)
        for i, stage in enumerate(net.stages):
            current[0] = i
            h = stage(h)
            if net.synthesizers is not None and i < len(net.synthesizers):
                synthesize(net.synthesizers[i], h, net.context(torch.zeros(1, dtype=torch.long, device=h.device)))
            if getattr(net, "heads", None) is not None and i < len(net.heads):  # local losses (dni.local)
                net.heads[i](h)
    finally:
        for hook in hooks:
            hook.remove()
        net.train(was_training)
    return macs


def balanced_partition(costs, workers):
    """Cut stages into `workers` consecutive groups so the busiest worker has the least work.

    Returns a list of ranges of stage indices, one per worker (exact, by dynamic programming)."""
    n = len(costs)
    if workers > n:
        raise DNIError(f"{workers} workers but the network has only {n} stages; "
                       "use fewer workers (--nproc_per_node) or a deeper net (--depth)")
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    @lru_cache(maxsize=None)
    def best(start, w):  # stages start.. shared by w workers -> (max load, stops)
        if w == 1:
            return prefix[n] - prefix[start], (n,)
        return min((max(prefix[stop] - prefix[start], best(stop, w - 1)[0]), (stop,) + best(stop, w - 1)[1])
                   for stop in range(start + 1, n - w + 2))

    stops = best(0, workers)[1]
    return [range(a, b) for a, b in zip((0,) + stops[:-1], stops)]


def parse_partition(text, num_stages, workers):
    """'2,2' (stages per worker, in order) -> [range(0, 2), range(2, 4)]; anything else is refused."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise DNIError(f"--partition {text!r}: expected stages per worker as positive integers, e.g. 2,2")
    if len(counts) != workers or sum(counts) != num_stages:
        raise DNIError(f"--partition {text!r} gives {len(counts)} workers {sum(counts)} stages, but there are "
                       f"{workers} workers and {num_stages} stages")
    stops = [sum(counts[:i + 1]) for i in range(workers)]
    return [range(a, b) for a, b in zip([0] + stops[:-1], stops)]


def describe_partition(parts, costs=None):
    """'worker 0: stages 1-2 (0.7M MACs) | worker 1: stages 3-4 (...)', stages counted from 1."""
    out = []
    for r, part in enumerate(parts):
        stages = f"stage {part.start + 1}" if len(part) == 1 else f"stages {part.start + 1}-{part.stop}"
        load = f" ({sum(costs[i] for i in part) / 1e6:.2f}M MACs)" if costs else ""
        out.append(f"worker {r}: {stages}{load}")
    return " | ".join(out)
