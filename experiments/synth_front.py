"""The synthesizer's cost-accuracy front on main.py's FCN: validation error against seconds per step,
from a linear synthesizer to one hidden layer of 2048 units, for DNI and cDNI.

    python -m experiments.synth_front --jobs 2          # train what is missing, then the front
    python -m experiments.synth_front --table_only      # the front from the finished run folders

Every run is main.py's FCN 4 at Table 1's CPU budget (experiments.grid.CPU_SETTINGS: 10 epochs,
stage lr 1e-3, chosen on validation) with our defaults but the synthesizer's size: linear (no
hidden layer), or one hidden layer of 256, 512, 1024 or 2048 units; seeds 0, 1, 2. A run is a
dnilab.train run folder under <results>/synth_front/, reused when finished. Only validation
error is read (the last 10,000 training images) and training seconds per step (wall time, one
thread, two runs sharing two cores; evaluation is outside it).

The rule, fixed before any run: per method, the best setting is the one with the lowest mean
validation error; a default is changed only where a cheaper setting (fewer seconds per step)
has a mean validation error within the best's spread over seeds (its mean plus one standard
deviation); the cheapest such setting is then the one to adopt, and what it changes is rerun.
Writes <results>/synth_front.{json,md,png}.
"""
import json
import statistics
import time
from pathlib import Path

import torch

from dnilab.cli import OneLineParser
from dnilab.config import Config
from dnilab.data import TRAIN_SIZES, num_batches
from dnilab.runs import write_json, write_text
from experiments.grid import COLUMNS, CPU_SETTINGS, SEEDS, add_grid_options, check_counts, grid_main, pending, train_all

SIZES = (0, 256, 512, 1024, 2048)  # units of the one hidden layer; 0: linear
FRONT_METHODS = ("dni", "cdni")  # columns of experiments.grid.COLUMNS


def size_name(units):
    return "linear" if units == 0 else f"1 x {units}"


def run_config(args, method, units, seed):
    settings = dict(model_type="mlp", seed=seed, plot=False, overwrite=True, **CPU_SETTINGS["mlp"], **COLUMNS[method],
                    synth_layers=0 if units == 0 else 1, synth_width=units or Config().synth_width,
                    out=str(Path(args.results) / "synth_front" / f"{method}_w{units}_s{seed}"))
    for name in ("device", "data_dir"):
        if getattr(args, name):
            settings[name] = getattr(args, name)
    return Config(**settings)


def configs(args):
    return [run_config(args, method, units, seed) for seed in args.seeds for units in SIZES for method in args.methods]


def collect(args):
    """Per method and size: validation errors per seed, mean, std and seconds per training step."""
    rows = []
    for method in args.methods:
        default = Config(model_type="mlp", **COLUMNS[method])
        default_units = 0 if default.synth_layers == 0 else default.synth_width
        for units in SIZES:
            errors, per_step = [], []
            for seed in args.seeds:
                path = Path(run_config(args, method, units, seed).out) / "summary.json"
                if not path.exists():
                    continue
                summary = json.loads(path.read_text())
                errors.append(round(100 * (1 - summary["val_acc"]), 4))
                steps = summary["epochs"] * num_batches(TRAIN_SIZES["mnist"] - 10_000, 256)
                per_step.append(summary["seconds"] / steps)
            rows.append(dict(method=method, units=units, default=units == default_units, val_error=errors,
                             mean=statistics.mean(errors) if errors else None,
                             std=statistics.stdev(errors) if len(errors) > 1 else None,
                             seconds_per_step=statistics.mean(per_step) if per_step else None,
                             complete=len(errors) == len(args.seeds)))
    return dict(seeds=list(args.seeds), rows=rows, verdict={m: verdict([r for r in rows if r["method"] == m])
                                                            for m in args.methods})


def verdict(rows):
    """The rule of the module docstring, once every size of the method has all its seeds."""
    if not rows or not all(r["complete"] for r in rows):
        return None
    best = min(rows, key=lambda r: r["mean"])
    bar = best["mean"] + (best["std"] or 0.0)
    default = next(r for r in rows if r["default"])
    cheapest = min((r for r in rows if r["mean"] <= bar), key=lambda r: r["seconds_per_step"])
    return dict(best=best["units"], bar=bar, cheapest_within=cheapest["units"], default=default["units"],
                change=cheapest["seconds_per_step"] < default["seconds_per_step"] and cheapest["units"] != default["units"])


def markdown(table):
    lines = ["# The synthesizer's cost-accuracy front, FCN 4, Table 1's CPU budget", "",
             f"Validation error (%) after the last epoch, mean ± std over seeds {table['seeds']}, and training "
             "seconds per step (one thread, two runs sharing two cores). The test set is not read.", "",
             "| method | synthesizer | val error | s / step | default |", "|---|---|---|---|---|"]
    for r in table["rows"]:
        error = "not run" if r["mean"] is None else f"{r['mean']:.2f}" + ("" if r["std"] is None else f" ± {r['std']:.2f}")
        if r["val_error"] and not r["complete"]:
            error += f" ({len(r['val_error'])} of {len(table['seeds'])} seeds)"
        speed = "—" if r["seconds_per_step"] is None else f"{1000 * r['seconds_per_step']:.1f} ms"
        lines.append(f"| {'cDNI' if r['method'] == 'cdni' else 'DNI'} | {size_name(r['units'])} | {error} | {speed} | "
                     f"{'yes' if r['default'] else ''} |")
    lines.append("")
    for method, v in table["verdict"].items():
        name = "cDNI" if method == "cdni" else "DNI"
        lines.append(f"- {name}: not decided yet (runs missing)." if v is None else
                     f"- {name}: best {size_name(v['best'])}; the cheapest within its spread is "
                     f"{size_name(v['cheapest_within'])}; the default ({size_name(v['default'])}) "
                     + ("should change to it." if v["change"] else "stays."))
    lines += ["", "Made by `python -m experiments.synth_front --jobs 2`; rule: experiments/synth_front.py's docstring.", ""]
    return "\n".join(lines)


def plot(table, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for method in dict.fromkeys(r["method"] for r in table["rows"]):
        done = [r for r in table["rows"] if r["method"] == method and r["mean"] is not None]
        ax.errorbar([1000 * r["seconds_per_step"] for r in done], [r["mean"] for r in done],
                    yerr=[r["std"] or 0 for r in done], marker="o", label="cDNI" if method == "cdni" else "DNI")
        for r in done:
            ax.annotate(size_name(r["units"]), (1000 * r["seconds_per_step"], r["mean"]), fontsize=7)
    ax.set(xlabel="ms per training step", ylabel="validation error (%)", title="FCN 4: synthesizer size")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def front(args, log=print):
    start = time.perf_counter()
    if not args.table_only:
        todo = pending(configs(args), args.retrain_stale)
        log(f"synth_front: {len(todo)} run(s) to train, --jobs {args.jobs}")
        train_all(todo, jobs=args.jobs, threads=args.threads, log=log)
    table = collect(args)
    base = Path(args.results) / "synth_front"
    write_json(base.with_suffix(".json"), table)
    write_text(base.with_suffix(".md"), markdown(table))
    if any(r["mean"] is not None for r in table["rows"]):
        plot(table, base.with_suffix(".png"))
    log(markdown(table))
    log(f"wrote {base}.md in {time.perf_counter() - start:.0f} s")
    return table


def parse_args(argv=None):
    parser = OneLineParser(prog="python -m experiments.synth_front", description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", choices=list(FRONT_METHODS), default=list(FRONT_METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    add_grid_options(parser, "synth_front")
    args = parser.parse_args(argv)
    check_counts(parser, args, names=("threads", "jobs"))
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    return grid_main(front, args)


if __name__ == "__main__":
    main()
