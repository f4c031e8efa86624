"""What the scripts under examples/ share: their methods, where their cuts sit, and their run folders.

Each example trains one model of its own by one of `EXAMPLE_METHODS`: backprop; DNI or cDNI (a `dni.DNI`
at each cut, Jaderberg et al. 2016, section 2); or local losses (a `dni.LocalLoss` at each cut, as
in Decoupled Greedy Learning, Belilovsky et al. 2020: the layers below a cut learn from a small
auxiliary head's loss alone, the layers above read the cut's activation as a constant). The cuts
sit at the same places for DNI and for local losses (`cut_positions`).

A run writes a folder as main.py's runs do (`dnilab.runs`): config.json, command.txt and env.json
when it starts, one metrics.jsonl line per evaluation, summary.json last (its presence marks the
run finished, and a finished run is never overwritten without --overwrite True).
"""
import json
from pathlib import Path

from dni.errors import DNIError
from dnilab.runs import claim_run_dir, record_environment, write_json

EXAMPLE_METHODS = ("backprop", "dni", "cdni", "local")  # what --method accepts in every example
EXAMPLES_DIR = Path("results/examples")  # where the examples' runs live by default


def cut_positions(layers, cuts):
    """After how many of `layers` consecutive layers (blocks, residual groups) each cut sits:
    `cuts` of them spread evenly, so 1 is the middle and `layers - 1` (or 0) is one between every
    pair of consecutive layers. (4, 1) -> (2,); (4, 3) or (4, 0) -> (1, 2, 3)."""
    cuts = cuts or layers - 1
    if not 0 < cuts < layers:
        raise DNIError(f"--cuts {cuts} does not fit {layers} layers: give 1 to {layers - 1}, or 0 for all")
    return tuple(round(layers * j / (cuts + 1)) for j in range(1, cuts + 1))


def check_sg_lr(method, sg_lr):
    """Refuse a synthesizers' rate (--sg_lr) that is negative, or given where there is no synthesizer."""
    if not 0 <= sg_lr < float("inf"):
        raise DNIError(f"--sg_lr must be at least 0 and finite, got {sg_lr}")
    if sg_lr and method not in ("dni", "cdni"):
        raise DNIError(f"--sg_lr sets the synthesizers' rate: --method {method} has none (give dni or cdni)")


def parameter_groups(model, lr, sg_lr=0.0):
    """The optimizer's parameter groups for an example's `model`: every parameter at `lr` in one
    group, as the examples had it before --sg_lr existed (sg_lr 0); otherwise the parameters of
    `model.cuts` (the synthesizers) at `sg_lr` in a second group, after the rest at `lr`. A
    schedule scales both groups alike."""
    if not sg_lr:
        return [{"params": list(model.parameters()), "lr": lr}]
    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if not n.startswith("cuts.")], "lr": lr},
            {"params": [p for n, p in named if n.startswith("cuts.")], "lr": sg_lr}]


def run_name(example, method, cuts, seed):
    """A run folder's name: resnet_fashion_local_cuts1_seed0; without the cuts where they are the
    default (0) or there are none (backprop)."""
    cut = f"_cuts{cuts}" if cuts and method != "backprop" else ""
    return f"{example}_{method}{cut}_seed{seed}"


def start_run(settings, device, example):
    """Claim the run folder (`settings.out`, or results/examples/<run_name> by default, where a
    finished run is kept and a fresh name-2 is taken) and write config.json, command.txt and env.json."""
    default = EXAMPLES_DIR / run_name(example, settings.method, settings.cuts, settings.seed)
    run_dir = claim_run_dir(Path(settings.out or default), overwrite=settings.overwrite, explicit=bool(settings.out))
    record_environment(run_dir, settings, device)
    return run_dir


def log_metrics(run_dir, line):
    """Append one line to metrics.jsonl (flushed, so a killed run keeps its curve so far)."""
    with open(Path(run_dir) / "metrics.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")


def finish_run(run_dir, summary):
    """Write summary.json, last: from now on the run counts as finished."""
    write_json(Path(run_dir) / "summary.json", summary)
    return summary
