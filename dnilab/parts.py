"""What every training loop of the package is built from: the sequential one (`dnilab.train`), the
pipelined one (`dnilab.pipeline`) and the recurrent one (`dnilab.recurrent`) all import it, and it
imports none of them.

- `set_seed`, `pick_device`: seeds and the device, in one place.
- `load_run_data`: the data set with its validation split held out.
- `build_net`: the stages of a model (`dnilab.models`) with a synthesizer after each but the last
  (paper, section 2), or under local losses an auxiliary head there, as a `dni.stages.DNINet`.
- `Optimizers`: one Adam and one schedule per stage, per synthesizer and per head, so each can
  live on its own worker.
- `evaluate_splits`, `check_finite`: what an epoch ends with; what every step is checked for.
"""
import math
import random
import re
import warnings

import torch

from dnilab.data import load_data, split_validation
from dni.errors import DNIError
from dni.local import make_head
from dni.stages import DNINet
from dnilab.models import MODELS, stage_shapes
from dnilab.runs import one_line
from dni.synthesizers import make_synthesizer
from dni.unlock import add_input_models


def set_seed(seed):
    """Seed every generator the run draws from (weights, dropout-free ops, data order)."""
    random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name):
    """'auto' | 'cpu' | 'cuda' -> torch.device; asking for CUDA without a GPU is an error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise DNIError("--device cuda asked for, but no CUDA GPU is visible; use --device cpu")
    return torch.device(name)


def build_net(config, in_shape, num_classes):
    """The stages of `config.model_type`, with synthesizers when the method is DNI and auxiliary
    heads (`dni.local.make_head`) when it is local losses."""
    stages = MODELS[config.model_type](in_shape=in_shape, classes=num_classes, depth=config.depth,
                                             hidden=config.hidden, channels=config.channels)
    synthesizers = None
    if config.method == "dni":
        context = num_classes if config.conditioned else 0
        synthesizers = torch.nn.ModuleList(
            make_synthesizer(shape, kind=config.synth_type, context_features=context,
                             hidden_layers=config.synth_layers, width=config.synth_width,
                             conv_width=config.synth_channels, label_map=config.synth_label_map,
                             position_map=config.synth_position_map)
            for shape in stage_shapes(stages, in_shape)[:-1])
    heads = None
    if config.method == "local":
        heads = torch.nn.ModuleList(make_head(shape, num_classes) for shape in stage_shapes(stages, in_shape)[:-1])
    net = DNINet(stages=stages, synthesizers=synthesizers, conditioned=config.conditioned,
                 num_classes=num_classes, heads=heads)
    if config.unlock == "complete":  # synthetic-input models I_i (dni.unlock)
        add_input_models(net, in_shape=in_shape, stage_shapes=stage_shapes(stages, in_shape),
                         hidden_layers=config.input_model_layers, width=config.input_model_width)
    if config.model_type == "cnn":  # the same maths, on the layout the CPU's max-pooling is fast on
        net = net.to(memory_format=torch.channels_last)
    return net


def lr_factor(schedule, total_steps):
    """Multiplier of the learning rate at a step, for torch's LambdaLR."""
    if schedule == "constant":
        return lambda step: 1.0
    if schedule == "paper":  # 3e-5 divided by 10 at 300k and 400k of 500k iterations
        return lambda step: 0.1 ** ((step >= 0.6 * total_steps) + (step >= 0.8 * total_steps))
    return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))


def adam(module, lr):
    """Adam over one module's parameters; fused: one kernel for all of them rather than a loop
    over its tensors, a cost every pipeline worker pays every step."""
    return torch.optim.Adam(module.parameters(), lr=lr, fused=True)


def step_schedules(schedules):
    """Step every schedule once. An optimizer that has not stepped yet is expected here (No Bprop's
    frozen stages never do; a pipeline's boundary synthesizer first steps k batches late), so
    PyTorch's warning about that order is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
        for schedule in schedules:
            schedule.step()


class Optimizers:
    """One Adam (and its schedule) per stage, per synthesizer and per auxiliary head, so each can
    live on its own worker. Heads learn at the stages' rate (--lr): they are classifiers, as the
    last stage is. `schedules` lists the stages', synthesizers', inputs' and heads' in that order.

    `owned`: the stage indices whose optimizers this process builds (a pipeline worker's share;
    stage i's synthesizer or head goes with it); the others are None. Default: all."""

    def __init__(self, net, config, total_steps, owned=None):
        factor = lr_factor(config.schedule, total_steps)

        def build(i, module, lr):
            return adam(module, lr) if owned is None or i in owned else None
        self.stages = [build(i, s, config.lr) for i, s in enumerate(net.stages)]
        self.synthesizers = [build(i, m, config.sg_lr) for i, m in enumerate(net.synthesizers or [])]
        self.inputs = [adam(m, config.lr) for m in getattr(net, "input_models", [])]  # synthetic inputs (dni.unlock)
        self.heads = [build(i, m, config.lr) for i, m in enumerate(net.heads or [])]  # local losses (dni.local)
        self.schedules = [None if o is None else torch.optim.lr_scheduler.LambdaLR(o, factor)
                          for o in self.stages + self.synthesizers + self.inputs + self.heads]

    def step_schedules(self):
        step_schedules(self.schedules)

    def state_dict(self):
        """The states by kind; "heads" only where there are heads, so a DNI or backprop checkpoint
        holds what it held before local losses existed."""
        heads = {"heads": [o.state_dict() for o in self.heads]} if self.heads else {}
        return {"stages": [o.state_dict() for o in self.stages],
                "synthesizers": [o.state_dict() for o in self.synthesizers],
                "inputs": [o.state_dict() for o in self.inputs], **heads,
                "schedules": [s.state_dict() for s in self.schedules]}

    def load_state_dict(self, state):
        """Inverse of `state_dict`; a ValueError if the counts differ (another model)."""
        for kind, objects in (("stages", self.stages), ("synthesizers", self.synthesizers),
                              ("inputs", self.inputs), ("heads", self.heads), ("schedules", self.schedules)):
            if len(state.get(kind, [])) != len(objects):
                raise ValueError(f"{len(state.get(kind, []))} {kind} optimizer states for {len(objects)} {kind}")
            for obj, obj_state in zip(objects, state.get(kind, [])):
                obj.load_state_dict(obj_state)


@torch.no_grad()
def evaluate(net, x, y, batch_size=1000):
    """Test accuracy (fraction) of the plain forward pass, in eval mode."""
    was_training = net.training
    net.eval()
    correct = sum((net(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum().item()
                  for i in range(0, len(x), batch_size))
    net.train(was_training)
    return correct / len(x)


EXPLODED_LOSS = 1e3  # cross-entropy starts at ln(10) = 2.3: far above, the stages have blown up too


def check_finite(stats, step):
    """Stop at the first non-finite loss, naming the stage, the step and the lever to pull.

    A synthesizer loss that overflows while the classifier's loss is sane points at --sg_lr;
    a non-finite or exploded classifier loss points at --lr (its huge gradients are the
    synthesizers' targets, so their losses overflow with it), and so does a non-finite auxiliary
    loss (local losses: the heads learn at --lr)."""
    loss = stats["loss"]
    bad_sg = [(i + 1, v) for i, v in enumerate(stats.get("sg_loss", [])) if not math.isfinite(v)]
    bad_aux = [(i + 1, v) for i, v in enumerate(stats.get("aux_loss", [])) if not math.isfinite(v)]
    if not bad_sg and not bad_aux and math.isfinite(loss):
        return
    cuts = len(stats.get("sg_loss") or stats.get("aux_loss") or [])
    last = f"stage {cuts + 1} (the classifier)" if cuts else "the classifier"
    what, levers = [], []
    if not math.isfinite(loss) or loss > EXPLODED_LOSS:
        what.append(f"the loss of {last} is {loss:.4g}")
        levers.append("--lr")
    if bad_aux:  # a head learns at the stages' rate: --lr is its lever too
        what.append(f"the auxiliary loss of stage {bad_aux[0][0]} is {bad_aux[0][1]}")
        levers.append("--lr")
    if bad_sg:
        what.append(f"the synthesizer loss of stage {bad_sg[0][0]} is {bad_sg[0][1]}")
        levers.append("--sg_lr")
    raise DNIError(f"{' and '.join(what)} at step {step}; lower {' or '.join(dict.fromkeys(levers))}")


def load_run_data(config, device, load=load_data):
    """`load` (`dnilab.data.load_data`) with `config.val_size` training images held out
    (`split_validation`); an unreadable file or folder becomes a one-line DNIError."""
    try:
        data = load(config.dataset, config.data_dir, device)
    except OSError as e:
        raise DNIError(f"cannot read {e.filename or config.data_dir}: {e.strerror or one_line(e)}; "
                       f"fix its permissions, or delete it and rerun to rebuild --data_dir {config.data_dir}") from None
    return split_validation(data, config.val_size)


def evaluate_splits(net, data):
    """{"val_acc": ..., "test_acc": ...} after an epoch; no val_acc without a validation split."""
    accs = {"val_acc": evaluate(net, data.val_x, data.val_y)} if len(data.val_x) else {}
    return {**accs, "test_acc": evaluate(net, data.test_x, data.test_y)}
