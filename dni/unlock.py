"""Unlocking experiments of the paper (section 3.3, Fig. 7): stochastic updates and complete unlock.

Stochastic updates (`--update_prob P`, Fig. 7 left). Every step runs the whole
forward pass; then each stage's update (its backward and its optimizer step)
happens only if that stage was picked, independently with probability P, by a
draw from a seeded torch.Generator (`draw_updates`: one uniform u_i per stage,
picked iff u_i < P, so P = 1 picks every stage and draws change nothing). The
generator of step t is seeded from (--seed, t) alone (`draw_seed`), so a run's
draws are the same on every device, every rerun and across --resume, with no
generator state to checkpoint.

- DNI / cDNI (`stochastic_dni_step`): a picked stage updates from its synthetic
  gradient whatever the others do. Synthesizer M_i learns whenever its target
  exists, i.e. whenever stage i+1 was picked and ran its backward, whether or
  not stage i itself was picked. A stage that is not picked runs its forward
  only: its parameters and its optimizer state (Adam's moments and step count)
  are left untouched. BatchNorm running statistics still move, as in any
  training-mode forward pass.
- Backprop (`stochastic_backprop_step`): the gradient of stage i has to come
  through every stage above it, so stage i updates only if it *and every stage
  above it* were picked in the same step: the classifier learns with
  probability P, stage i of L with probability P^(L-i+1), the first stage with
  P^L (P^4 for the 4-stage FCN).

Order. In an asynchronous system the picked stages would update in no fixed
(random) order. In this sequential simulation every quantity a step uses is
computed from the state at the start of the step (stage outputs are detached
and computed before their stage steps; each g_hat is computed before its
synthesizer learns), so any order of the picked updates gives the same
parameters bit for bit (tests/test_unlock.py applies them in shuffled orders to
check this). The code therefore visits the stages bottom-up and draws no order;
with P = 1 it is exactly `dni_step` and `backprop_step`.

Complete unlock (`--unlock complete`, Fig. 7 right): for every stage i > 1 a
synthetic-input model I_i (`InputModel`) predicts the stage's input h_{i-1}
from the network input x alone. One step (`complete_unlock_step`), in order:

    1. the real forward pass h_1 .. h_L (no graph): the input models' targets,
       and the loss that is logged; BatchNorm running statistics move here only
    2. for i = 1 .. L (each stage reads only x, y and its own models):
         s = x                          if i = 1
         s = I_i(x).detach()            else; then train I_i on ||I_i(x) - h_{i-1}||^2
         i < L: update f_i on s from g_hat_i = M_i(f_i(s), c)        (stage_update)
         i = L: update f_L on s from the real loss CE(f_L(s), y)      (loss_update)
         i > 1: train M_{i-1} on the gradient stage i's backward left on s (synthesizer_update)
    (steps 2 are `dni.stages.run_stages`, the loop of every stage-wise step, given these inputs)

So a stage needs neither its neighbours' forward pass (it runs on I_i(x)) nor
their backward pass (it learns from M_i); the real forward pass is only needed
to give the input models their targets, whenever it arrives. The stages'
BatchNorm running statistics are restored after the synthetic-input pass, so
they describe the real activations the test-time forward pass sees (at test
time the ordinary forward pass is used, as in the paper; input models and
synthesizers are not). The input-model loss is the mean over all elements of
the squared error (the synthesizers' convention). I_i is an MLP
(`--input_model_layers` hidden layers of `--input_model_width` units,
Linear -> BatchNorm -> ReLU) whose last layer starts at zero, weights and
bias, like a synthesizer's: its first prediction is exactly zero. It learns
with Adam at the stages' learning rate (`--lr`) and schedule.
"""
import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from dni.stages import StepStats, count_correct, run_stages
from dni.synthesizers import zero_head

UNLOCKS = ("update", "complete")
DRAW_SEED_TAG = 0x5EED_D1A1  # mixed into the draws' seeds, so they never share a stream with the data order
GOLDEN = 0x9E3779B9  # 2^32 / golden ratio: spreads the seeds of different runs over the 32-bit seed space


@dataclass
class UnlockStats(StepStats):
    """StepStats plus what only the unlocking steps measure, logged as extra keys of metrics.jsonl."""
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------- stochastic updates

def draw_seed(seed, step):
    """The seed of step `step`'s draws in a run with --seed `seed`. torch's CPU generator keeps only
    the low 32 bits of a seed, so this is a 32-bit number, distinct for every step of a run and
    for every (seed, step) with seeds < 1000 and steps < 2^20 (tested)."""
    return ((step % 2**32 ^ DRAW_SEED_TAG) + seed * GOLDEN) % 2**32


def draw_updates(num_stages, update_prob, generator):
    """Which stages may update this step: a list of num_stages bools, each True with probability P."""
    return (torch.rand(num_stages, generator=generator) < update_prob).tolist()


def backprop_updates(picked):
    """Under backprop stage i updates only if it and every stage above it were picked."""
    updates, chain = [], True
    for p in reversed(picked):
        chain = chain and p
        updates.append(chain)
    return updates[::-1]


def stochastic_dni_step(net, stage_optimizers, synth_optimizers, x, y, picked):
    """A DNI step in which only the `picked` stages update (see the module docstring): the stage
    loop of `dni.stages.run_stages`, with `picked`.

    With every stage picked this is exactly `dni_step`. Returns UnlockStats; per-synthesizer
    losses are in extra["sg_loss_partial"] (null where M_i had no target this step)."""
    result = run_stages(net, stage_optimizers, synth_optimizers, x, y, context=net.context(y), picked=picked)
    extra = {"updated": [int(p) for p in picked],
             "sg_loss_partial": [None if v is None else v.item() for v in result.sg_loss],
             "sg_cos_partial": [None if v is None else v.item() for v in result.sg_cos]}
    return UnlockStats(loss=result.loss, correct=count_correct(result.output, y), extra=extra)


def stochastic_backprop_step(net, stage_optimizers, x, y, picked):
    """A backprop step in which stage i updates only if it and all stages above it were picked.

    The stages below the lowest updating one run without a graph; with every stage picked this
    is exactly `backprop_step`."""
    updates = backprop_updates(picked)
    first = updates.index(True) if any(updates) else len(updates)
    h = x
    with torch.no_grad():
        for stage in net.stages[:first]:
            h = stage(h)
    for optimizer in stage_optimizers[first:]:
        optimizer.zero_grad(set_to_none=True)
    for stage in net.stages[first:]:
        h = stage(h)
    loss = F.cross_entropy(h, y)
    if first < len(updates):
        loss.backward()
        for optimizer in stage_optimizers[first:]:
            optimizer.step()
    return UnlockStats(loss=loss.detach(), correct=(h.detach().argmax(1) == y).sum(),
                       extra={"updated": [int(u) for u in updates]})


# ---------------------------------------------------------------- complete unlock

class InputModel(nn.Module):
    """Synthetic-input model I_i: predicts a stage's input h_{i-1} (per-example `shape`) from x.

    `hidden_layers` x (Linear -> BatchNorm -> ReLU) of `width` units on the flattened x, then a
    zero-initialised Linear (weights and bias) to prod(shape), reshaped: the first prediction is
    exactly zero. Used in training only; the test-time forward pass never calls it."""

    def __init__(self, *, in_features, shape, hidden_layers=1, width=512):
        super().__init__()
        self.shape = tuple(shape)
        layers, n_in = [nn.Flatten()], in_features
        for _ in range(hidden_layers):
            layers += [nn.Linear(n_in, width), nn.BatchNorm1d(width), nn.ReLU()]
            n_in = width
        self.net = nn.Sequential(*layers, zero_head(nn.Linear(n_in, int(torch.tensor(self.shape).prod()))))

    def forward(self, x):
        return self.net(x).view(len(x), *self.shape)  # (B, *shape)


def input_model_loss(guess, target):
    """L2 between predicted and real activation: mean over batch and features (as synthesizer_loss)."""
    return F.mse_loss(guess, target.detach())


def add_input_models(net, *, in_shape, stage_shapes, hidden_layers=1, width=512):
    """Register one InputModel per stage but the first as `net.input_models` (so .to(), state_dict
    and checkpoints see them). `stage_shapes` are the stages' per-example output shapes."""
    in_features = int(torch.tensor(in_shape).prod())
    net.input_models = nn.ModuleList(
        InputModel(in_features=in_features, shape=shape, hidden_layers=hidden_layers, width=width)
        for shape in stage_shapes[:-1])
    return net


@contextlib.contextmanager
def frozen_statistics(module):
    """Run `module` in train mode (batch statistics) without moving its BatchNorm running
    statistics or batch counts. A stage that trains on a synthetic input, or a synthesizer asked a
    second time for a batch it has seen, must not count that batch in the statistics the network
    is tested with. The momentum is 0 inside (running = 1 * running + 0 * batch, exactly), rather
    than the buffers restored afterwards: a backward after the block still finds the running
    statistics its graph saved, unmodified."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
             for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


def complete_unlock_step(net, stage_optimizers, synth_optimizers, input_optimizers, x, y):
    """One step of complete unlock: every stage trains on a synthetic input and a synthetic gradient.

    See the module docstring for the order; the stage loop is `dni.stages.run_stages`, given
    the synthetic inputs. Returns UnlockStats: loss and correct of the real forward pass (the
    network as it is tested), sg_loss / sg_cos per synthesizer, and the input models' losses in
    extra["in_loss"]."""
    with torch.no_grad():  # 1. the real forward pass: targets for the input models
        real = [x]
        for stage in net.stages:
            real.append(stage(real[-1]))
    logits = real[-1]
    loss = F.cross_entropy(logits, y)

    in_losses = []

    def synthetic_input(i, _):
        """Stage i's input: x for the first stage, else I_i(x), after I_i learns from the real h_{i-1}."""
        if i == 0:
            return x
        guess = net.input_models[i - 1](x)  # (B, *shape of h_{i-1})
        in_loss = input_model_loss(guess, real[i])
        input_optimizers[i - 1].zero_grad(set_to_none=True)
        in_loss.backward()
        input_optimizers[i - 1].step()
        in_losses.append(in_loss.item())
        return guess.detach()

    result = run_stages(net, stage_optimizers, synth_optimizers, x, y, context=net.context(y),  # 2. each stage alone
                        stage_inputs=synthetic_input, stage_scope=frozen_statistics)
    return UnlockStats(loss=loss, correct=count_correct(logits, y), sg_loss=result.sg_loss, sg_cos=result.sg_cos,
                       extra={"in_loss": in_losses, "synthetic_input_loss": result.loss.item()})
