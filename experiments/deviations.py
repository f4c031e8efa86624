"""What each of our deviations from the paper's model is worth, on the validation split.

Every row is a baseline with one setting changed to ours, trained over seeds at Table 1's CPU
budget (10 epochs) and reported as validation error (the last `--val_size` training images) and
training seconds per epoch, with the difference to its baseline beside it. Two baselines:

- "paper": `--preset paper` itself (section 3.1, nothing of ours), whose optimiser is Adam 3e-5
  for the stages and the synthesizers, divided by 10 at 60% and 80% of the run. Its rows change
  the stage rate, the schedule, the synthesizer rate or the synthesizer. At 10 epochs rather
  than the paper's 500k iterations, 3e-5 measures undertraining, not the paper's choice.
- "table": the paper's model and synthesizers trained as Table 1 trains ours (the table's stage
  rate, sg_lr = that rate, cosine schedule). Its rows change the synthesizer or its rate.

"all of ours" is `--preset ours` at the same budget, shown under both. The test set is not read.

    python -m experiments.deviations --jobs 2                # every row, seeds 0 1 2 -> results/deviations.*
    python -m experiments.deviations --models mlp --jobs 2   # the FCN rows only
    python -m experiments.deviations --baselines paper --jobs 2   # the rows against the paper's optimiser
    python -m experiments.deviations --table_only           # redraw the table from the run folders

A row is a difference that acts in `--preset ours`; the FCN's "label map to the output" is kept
as the measurement that took the map out of ours. The CNN rows use our 16-filter network on both
sides: the paper's 128 filters cost hours a run on 2 CPU cores, so the width row stays
unmeasured until a GPU is at hand.
"""
import json
import sys
from pathlib import Path

import torch

from dnilab.cli import OneLineParser
from dnilab.config import Config
from dnilab.runs import write_text
from experiments.grid import (CPU_SETTINGS, SEEDS, add_grid_options, check_counts, grid_main, mean_std, pending, short,
                              train_all, typed_command)
from experiments.provenance import modified_tree_line

# model -> (network depth as in main.py, settings shared by every row of that model)
NETWORKS = {"mlp": dict(depth=3), "cnn": dict(depth=2, channels=16)}
# (model, method) -> [(row name, settings of ours that the row adds to the "table" baseline)];
# None is "all of ours" (--preset ours).
ROWS = {
    ("mlp", "dni"): [("paper preset", {}), ("2048-unit hidden layer", dict(synth_width=2048)),
                     ("our sg_lr", "sg_lr"), ("all of ours", None)],
    ("mlp", "cdni"): [("paper preset", {}), ("label map to the output", dict(synth_label_map=True)),
                      ("1 hidden layer of 1024", dict(synth_layers=1)), ("all of ours", None)],
    ("cnn", "dni"): [("paper preset", {}), ("dense synthesizer on the flattened maps",
                                            dict(synth_type="dense", synth_width=1024)),
                     ("our sg_lr", "sg_lr"), ("all of ours", None)],
    ("cnn", "cdni"): [("paper preset", {}), ("per-position bias and label map", dict(synth_position_map=True)),
                      ("our sg_lr", "sg_lr"), ("all of ours", None)],
}
# The "paper" baseline's rows: its optimiser's three settings, then the synthesizer rows above
# that act in ours ("label map to the output" does not).
OPTIMISER_ROWS = [("paper preset", {}), ("our stage rate", "lr"), ("our schedule", dict(schedule="cosine")),
                  ("our sg_lr", "sg_lr")]
BASELINES = {
    "paper": {key: OPTIMISER_ROWS + [(row, change) for row, change in rows[1:]
                                     if isinstance(change, dict) and row != "label map to the output"]
                   + [("all of ours", None)] for key, rows in ROWS.items()},
    "table": ROWS,
}
PREFIX = {"paper": "opt_", "table": ""}  # run folder names: the "table" rows keep their first names


def slug(name):
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def run_config(args, model, method, baseline, row, change, seed):
    """The Config of one row's run: the baseline at the table's budget, plus `change`."""
    name = "all_of_ours" if change is None else PREFIX[baseline] + slug(row)  # one "all of ours" run for both
    budget = dict(model_type=model, seed=seed, plot=False, overwrite=True, **NETWORKS[model],
                  num_epochs=CPU_SETTINGS[model]["num_epochs"], method="dni", conditioned=method == "cdni",
                  out=str(Path(args.results) / "deviations" / f"{model}_{method}_{name}_s{seed}"))
    if args.data_dir:
        budget["data_dir"] = args.data_dir
    if args.device:
        budget["device"] = args.device
    table_rate = CPU_SETTINGS[model]["lr"]
    if change is None:
        return Config(preset="ours", lr=table_rate, **budget)
    if change == "sg_lr":  # our synthesizer rate, whatever dnilab/presets.py holds now
        change = dict(sg_lr=Config(model_type=model, conditioned=method == "cdni").sg_lr)
    elif change == "lr":  # our stage rate: the table's
        change = dict(lr=table_rate)
    base = {} if baseline == "paper" else dict(schedule="cosine", lr=table_rate, sg_lr=table_rate)
    return Config(preset="paper", **{**base, **budget, **change})


def grid(args):
    return [(model, method, baseline, row, change) for baseline in args.baselines
            for (model, method), rows in BASELINES[baseline].items()
            if model in args.models and method in args.methods for row, change in rows
            if args.rows is None or row in args.rows]


def collect(args):
    """The table dict from the finished run folders of the grid: a row missing some seeds keeps
    the ones it has and says how many."""
    rows, commands, run_dirs = [], set(), []
    for model, method, baseline, row, change in grid(args):
        errors, per_epoch, rates = [], [], set()
        for seed in args.seeds:
            run_dir = Path(run_config(args, model, method, baseline, row, change, seed).out)
            if (run_dir / "summary.json").exists():
                summary = json.loads((run_dir / "summary.json").read_text())
                errors.append(round(100 * (1 - summary["val_acc"]), 4))
                per_epoch.append(summary["seconds"] / summary["epochs"])
                rates.add(json.loads((run_dir / "config.json").read_text())["lr"])
                run_dirs.append(run_dir)
                if (run_dir / "command.txt").exists():
                    commands.add(typed_command((run_dir / "command.txt").read_text().splitlines()[0]))
        mean, std = mean_std(errors) if errors else (None, None)
        rows.append(dict(model=model, method=method, baseline=baseline, row=row, lr=sorted(rates),
                         val_error=errors, mean=mean, std=std,
                         seconds_per_epoch=sum(per_epoch) / len(per_epoch) if per_epoch else None))
    return dict(rows=rows, seeds=list(args.seeds), commands=sorted(commands), modified_tree=modified_tree_line(list(dict.fromkeys(run_dirs))),
                command="python -m experiments.deviations " + " ".join(sys.argv[1:]), torch=torch.__version__)


HEADINGS = {
    "paper": ("Against the paper's own optimiser",
              "the baseline is `--preset paper` at 10 epochs (stage and synthesizer Adam 3e-5, /10 at 60% and "
              "80% of the run); each row changes one setting to ours. At 10 epochs rather than the paper's 500k "
              "iterations, 3e-5 measures undertraining, not the paper's choice."),
    "table": ("At the table's stage rate",
              "the baseline is the paper's model and synthesizers trained as Table 1 trains ours (the table's "
              "stage lr, sg_lr = lr, cosine schedule, 10 epochs); each row changes one setting to ours."),
}


def _same_rate_as_baseline(row, base):
    """Whether a row's runs and its baseline's share the stage rate they should: a row that changes
    the rate (against the paper's optimiser: "our stage rate", "all of ours") differs by design;
    any other row differs in one setting only if both were trained at the same single rate (a
    rerun at a new table rate lands row by row)."""
    if base is None:
        return False
    if row.get("baseline", "table") == "paper" and row["row"] in ("our stage rate", "all of ours"):
        return len(row.get("lr", [])) <= 1
    return row.get("lr") == base.get("lr") and len(row.get("lr", [])) <= 1


def markdown(table):
    label = {"mlp": "FCN 4", "cnn": "CNN 3"}
    lines = ["# Deviations from the paper's preset, one at a time (validation error)", "",
             f"Validation error (%) after the last epoch, mean ± std over seeds {table['seeds']}, and the "
             "difference to the row's baseline (none where the two ran at different stage rates, other than by "
             "the row's own change); 'all of ours' is `--preset ours` at the same budget. Seconds per "
             "epoch of training, one thread a run, on a shared two-core machine: the runs against the table's "
             "stage rate (and 'all of ours') ran two at a time, the FCN runs against the paper's optimiser "
             "beside two or three others, so their seconds are inflated and compare only among themselves."]
    for baseline in dict.fromkeys(r.get("baseline", "table") for r in table["rows"]):
        title, says = HEADINGS[baseline]
        lines += ["", f"## {title}", "", says[0].upper() + says[1:], "",
                  "| network | method | row | stage lr | val error | vs baseline | s / epoch |",
                  "|---|---|---|---|---|---|---|"]
        rows = [r for r in table["rows"] if r.get("baseline", "table") == baseline]
        base = {(r["model"], r["method"]): r for r in rows if r["row"] == "paper preset"}
        for r in rows:
            ref = base.get((r["model"], r["method"]), {}).get("mean")
            if not _same_rate_as_baseline(r, base.get((r["model"], r["method"]))):
                ref = None  # trained at another stage rate than its baseline: no difference is measured
            error = "not measured" if r["mean"] is None else \
                f"{r['mean']:.2f}" + (f" ± {r['std']:.2f}" if r["std"] is not None else "")
            if r["val_error"] and len(r["val_error"]) < len(table["seeds"]):
                error += f" ({len(r['val_error'])} of {len(table['seeds'])} seeds)"
            gap = "" if r["mean"] is None or ref is None or r["row"] == "paper preset" else f"{r['mean'] - ref:+.2f}"
            rate = ", ".join(map(short, r.get("lr", [])))  # as the run folders say, not as the grid asks
            speed = "—" if r["seconds_per_epoch"] is None else f"{r['seconds_per_epoch']:.1f}"
            lines.append(f"| {label[r['model']]} | {'cDNI' if r['method'] == 'cdni' else 'DNI'} | {r['row']} | "
                         f"{rate} | {error} | {gap} | {speed} |")
    trained = ", ".join(f"`{c}`" for c in table.get("commands", []))
    lines += ["", (f"Runs trained by {trained}; " if trained else "") + f"table made by `{table['command'].strip()}`; "
              f"torch {table['torch']}. The test set is not read.",
              *([table["modified_tree"]] if table.get("modified_tree") else []), ""]
    return "\n".join(lines)


def write(args, table):
    base = Path(args.results) / "deviations"
    base.parent.mkdir(parents=True, exist_ok=True)
    write_text(base.with_suffix(".json"), json.dumps(table, indent=2) + "\n")
    write_text(base.with_suffix(".md"), markdown(table))


def deviations(args, log=print):
    if not args.table_only:
        configs = list({c.out: c for c in (run_config(args, *point, seed) for point in grid(args)
                                            for seed in args.seeds)}.values())  # "all of ours" once
        todo = pending(configs, args.retrain_stale)
        log(f"deviations: {len(todo)} run(s) to train, --jobs {args.jobs}")
        train_all(todo, jobs=args.jobs, threads=args.threads, log=log, after_each=lambda _: write(args, collect(args)))
    table = collect(args)
    write(args, table)
    log(markdown(table))
    return table


def parse_args(argv=None):
    parser = OneLineParser(prog="python -m experiments.deviations", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(NETWORKS), default=list(NETWORKS))
    parser.add_argument("--methods", nargs="+", choices=["dni", "cdni"], default=["dni", "cdni"])
    parser.add_argument("--baselines", nargs="+", choices=list(BASELINES), default=list(BASELINES),
                        help="the rows against these baselines (default: both)")
    parser.add_argument("--rows", nargs="+", choices=sorted({row for rows in BASELINES["paper"].values()
                                                             for row, _ in rows} | {row for rows in ROWS.values()
                                                                                    for row, _ in rows}),
                        help="only these rows (default: every row)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    add_grid_options(parser, "deviations")
    args = parser.parse_args(argv)
    check_counts(parser, args, names=("threads", "jobs"))
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    return grid_main(deviations, args)


if __name__ == "__main__":
    main()
