"""The update a training run gives each batch, chosen from its Config: the stage-wise DNI step
(paper, section 2), backprop, the paper's No Bprop, local auxiliary losses (dni.local, Decoupled
Greedy Learning), or an unlocking step (section 3.3)."""
import warnings

import torch

from dni.local import local_step
from dni.stages import backprop_step, dni_step, nobprop_step
from dni.unlock import complete_unlock_step, draw_seed, draw_updates, stochastic_backprop_step, stochastic_dni_step


def uses_unlock(config):
    """Whether `config` needs this module's step instead of the ordinary dni_step / backprop_step."""
    return config.update_prob < 1 or config.unlock == "complete"


class UnlockStep:
    """The training step of a run with --update_prob < 1 or --unlock complete: `step(x, y, t)`
    for the run's step t (0-based), whose update draws come from a generator seeded with
    draw_seed(config.seed, t)."""

    def __init__(self, config, net, optimizers):
        self.config, self.net, self.optimizers = config, net, optimizers
        self.generator = torch.Generator()
        # A stage skipped at step 0 has not stepped its optimizer when its schedule steps: that is intended.
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")

    def __call__(self, x, y, step):
        net, opt = self.net, self.optimizers
        if self.config.unlock == "complete":
            return complete_unlock_step(net, opt.stages, opt.synthesizers, opt.inputs, x, y)
        self.generator.manual_seed(draw_seed(self.config.seed, step))
        picked = draw_updates(len(net.stages), self.config.update_prob, self.generator)
        if self.config.method == "backprop":
            return stochastic_backprop_step(net, opt.stages, x, y, picked)
        return stochastic_dni_step(net, opt.stages, opt.synthesizers, x, y, picked)


def make_train_step(config, net, optimizers):
    """The update one batch gets, as `step(x, y, step_index) -> StepStats`, by method."""
    if uses_unlock(config):  # --update_prob < 1 or --unlock complete (dni.unlock)
        return UnlockStep(config, net, optimizers)
    if config.method == "dni":
        return lambda x, y, _: dni_step(net, optimizers.stages, optimizers.synthesizers, x, y)
    if config.method == "local":
        return lambda x, y, _: local_step(net, optimizers.stages, optimizers.heads, x, y)
    if config.method == "nobprop":
        return lambda x, y, _: nobprop_step(net, optimizers.stages, x, y)
    return lambda x, y, _: backprop_step(net, optimizers.stages, x, y)
