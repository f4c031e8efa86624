"""The parameters of a model that holds interfaces, in two groups: the model's and its synthesizers'."""
from dni.interface import DNI
from dni.recurrent import RecurrentDNI
from dni.stages import DNINet


def param_groups(model, *, lr, sg_lr=None, **sg_options):
    """The parameters of `model` in two groups for any torch optimizer: the model's at `lr`, and its
    synthesizers' (those of every `DNI` and `RecurrentDNI` in it, and a `DNINet`'s) at `sg_lr` (default: `lr`), with
    `sg_options` (momentum, weight_decay, betas, ...) for their group only; e.g.
    `torch.optim.AdamW(dni.param_groups(model, lr=1e-3, weight_decay=0.0), weight_decay=0.01)`.

    Under SGD, what keeps DNI from diverging is a synthesizer without BatchNorm
    (`batch_norm=False`), not a lower rate for it: docs/design.md has the measurements.
    """
    synthesizers = []
    for m in model.modules():
        if isinstance(m, (DNI, RecurrentDNI)):
            synthesizers.append(m.synthesizer)
        elif isinstance(m, DNINet) and m.synthesizers is not None:
            synthesizers.append(m.synthesizers)
    sg_params = list({id(p): p for s in synthesizers for p in s.parameters()}.values())
    ids = {id(p) for p in sg_params}
    groups = [{"params": [p for p in model.parameters() if id(p) not in ids], "lr": lr},
              {"params": sg_params, "lr": lr if sg_lr is None else sg_lr, **sg_options}]
    return [g for g in groups if g["params"]]
