"""The hyperparameter search behind the DNI defaults in dnilab/presets.py: synthesizer
depth (0, 1 or 2 hidden layers) and width, synthesizer learning rate and stage learning rate,
for DNI and cDNI on the MNIST FCN (or CNN), a few epochs per run; backprop at each stage learning
rate beside.

    python -m experiments.search                     # the grid: 2 x 3 x 1 x 4 x 3 = 72 runs + 3 backprop, 2 epochs, seed 0
    python -m experiments.search --model_type cnn    # the same for the CNN's conv synthesizers: results/search_cnn.*
    python -m experiments.search --jobs 2            # two runs at once
    python -m experiments.search --quick             # 2 runs of 1 epoch: checks the plumbing
    python -m experiments.search --table_only        # rank the finished runs again

Every run is a dnilab.train run folder under <results>/search/ (reused when finished with the
same settings, so the search resumes); writes <results>/search.json and search.md, ranked by
validation error: each run holds out the last `--val_size` training images (dnilab.data) and only
they decide. The test set is not read here at all, so the defaults chosen from this ranking
leave every test number of experiments.table1 unbiased. A run without a validation split cannot be
ranked. Unset settings (network depth, widths, schedule, batch) are dnilab.config's defaults.
"""
import itertools
import json
import sys
import time
from pathlib import Path

import torch

from dnilab.cli import OneLineParser
from dnilab.config import Config
from dni.errors import DNIError
from dnilab.presets import OURS
from dnilab.runs import write_text
from experiments.grid import COLUMNS, add_grid_options, check_counts, grid_main, mean_std, pending, train_all
from experiments.provenance import modified_tree_line

SYNTH_LAYERS = (0, 1, 2)
SYNTH_WIDTHS = (1024,)
SG_LRS = (1e-4, 1e-3, 3e-3, 1e-2)
LRS = (3e-4, 1e-3, 3e-3)
SEARCHED = ("dni", "cdni", "backprop")  # columns of experiments.grid.COLUMNS, in the ranking's order
EPOCHS, SEEDS = 2, (0,)
QUICK_SEARCH = dict(synth_layers=[0], synth_widths=[64], sg_lrs=[1e-4], lrs=[1e-3], methods=["dni", "cdni"], epochs=1, seeds=[0])
TUNED = ("lr", "sg_lr", "synth_layers")
WIDTH = {"mlp": "synth_width", "cnn": "synth_channels"}  # what the search's "width" sets: dense units, conv filters



GRID_FLAGS = ("--synth_layers", "--synth_widths", "--sg_lrs", "--lrs", "--methods", "--epochs", "--seeds", "--quick")


def made_by(argv):
    """The command that trains the runs of a table: the one given, less what does not change the
    table (--table_only, a redraw; --jobs)."""
    argv, kept = list(argv), []
    while argv:
        arg = argv.pop(0)
        if arg == "--table_only":
            continue
        if arg == "--jobs":
            argv.pop(0) if argv else None
            continue
        kept.append(arg)
    return " ".join(["python -m experiments.search", *kept])

def run_name(method, synth_layers, synth_width, sg_lr, lr, seed):
    if method == "backprop":
        return f"backprop_lr{lr:g}_s{seed}"
    return f"{method}_sl{synth_layers}_w{synth_width}_sglr{sg_lr:g}_lr{lr:g}_s{seed}"


def points(args):
    """(method, synth_layers, synth_width, sg_lr, lr) of every run; backprop once per lr (it has
    no synthesizer); a linear synthesizer (no hidden layer, so no width) once per sg_lr and lr."""
    out = []
    for method in args.methods:
        if method == "backprop":
            out += [(method, None, None, None, lr) for lr in args.lrs]
        else:
            out += sorted({(method, s, w if s else min(args.synth_widths), g, lr) for s, w, g, lr in itertools.product(
                args.synth_layers, args.synth_widths, args.sg_lrs, args.lrs)})
    return out


def run_config(args, method, synth_layers, synth_width, sg_lr, lr, seed):
    name = run_name(method, synth_layers, synth_width, sg_lr, lr, seed)
    settings = dict(model_type=args.model_type, dataset="mnist", lr=lr, num_epochs=args.epochs, seed=seed, plot=False,
                    overwrite=True, out=str(Path(args.results) / args.stem / name), **COLUMNS[method])
    if method != "backprop":
        settings.update({"synth_layers": synth_layers, WIDTH[args.model_type]: synth_width, "sg_lr": sg_lr})
        if args.model_type == "cnn":  # its widths are conv filters: the search is over conv synthesizers
            settings["synth_type"] = "conv"
    for name in ("device", "data_dir"):
        if getattr(args, name):
            settings[name] = getattr(args, name)
    return Config(**settings)


def validation_error(run_dir):
    """Validation error (%) of a finished run: the only number a choice may read."""
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    if summary.get("val_acc") is None:
        raise DNIError(f"{run_dir} has no validation accuracy (trained with --val_size 0 or before the split "
                       "existed); nothing may be chosen from it: retrain it with --retrain_stale")
    return round(100 * (1 - summary["val_acc"]), 4), summary["seconds"]


def collect(args, failures=None):
    """Every point's validation error over seeds, ranked within each method; and the current defaults."""
    failures, rows, recorded, run_dirs = failures or {}, [], set(), []  # recorded: epochs as the run folders say
    for method, synth_layers, synth_width, sg_lr, lr in points(args):
        errors, seconds, failed = [], [], []
        for seed in args.seeds:
            run_dir = Path(run_config(args, method, synth_layers, synth_width, sg_lr, lr, seed).out)
            if run_dir.name in failures:
                failed.append(failures[run_dir.name])
            if (run_dir / "summary.json").exists():
                error, secs = validation_error(run_dir)
                recorded.add(json.loads((run_dir / "summary.json").read_text()).get("epochs", "?"))
                run_dirs.append(run_dir)
                errors.append(error)
                seconds.append(secs)
        mean, std = mean_std(errors) if errors else (None, None)
        rows.append(dict(method=method, synth_layers=synth_layers, synth_width=synth_width, sg_lr=sg_lr, lr=lr,
                         val_error=errors, mean=mean, std=std, seconds=seconds, failed=failed))
    best = {}
    for method in args.methods:
        done = [r for r in rows if r["method"] == method and r["mean"] is not None]
        if done:
            best[method] = min(done, key=lambda r: r["mean"])
    defaults, tuned = Config(model_type=args.model_type), TUNED + (WIDTH[args.model_type],)
    defaults_now = {m: {k: getattr(Config(model_type=args.model_type, **COLUMNS[m]), k) for k in tuned}
                    for m in args.methods if m != "backprop"}
    size = dict(hidden=defaults.hidden) if args.model_type == "mlp" else dict(channels=defaults.channels)
    meta = dict(epochs="/".join(map(str, sorted(recorded, key=str))) or "no", seeds=list(args.seeds), runs_done=sum(len(r["val_error"]) for r in rows),
                runs_total=len(rows) * len(args.seeds), defaults_now=defaults_now,
                network=dict(model_type=args.model_type, depth=defaults.depth, **size, schedule=defaults.schedule,
                             batch_size=defaults.batch_size, val_size=defaults.val_size),
                torch=torch.__version__, command=made_by(args.argv), modified_tree=modified_tree_line(run_dirs))
    return dict(meta=meta, best=best, rows=rows)


def _fmt(row):
    if row["mean"] is None:
        return "failed" if row["failed"] else "—"
    return f"{row['mean']:.2f}" + (f" ± {row['std']:.2f}" if row["std"] is not None else "")


def markdown(table):
    meta = table["meta"]
    model = meta["network"]["model_type"]
    width_name = WIDTH[model].replace("_", " ")
    lines = [f"# DNI / cDNI hyperparameter search (MNIST {dict(mlp='FCN', cnn='CNN')[model]})", "",
             f"{meta['runs_done']} of {meta['runs_total']} runs finished"
             + (" (**partial**)" if meta["runs_done"] < meta["runs_total"] else "")
             + f"; {meta['epochs']} epoch(s) per run, seeds {meta['seeds']}; validation error (%), best first per "
             f"method (the last {meta['network']['val_size']:,} training images; the test set is not read).",
             "", f"| method | synth layers | {width_name} | sg_lr | lr | val error | train s |",
             "|---|---|---|---|---|---|---|"]
    key = lambda r: (list(SEARCHED).index(r["method"]), r["mean"] is None, r["mean"] or 0)
    blank = lambda value, fmt="": "" if value is None else format(value, fmt)
    for r in sorted(table["rows"], key=key):
        width = r.get("synth_width") if r["synth_layers"] else None  # a linear synthesizer has none
        lines.append(f"| {r['method']} | {blank(r['synth_layers'])} | {blank(width)} | {blank(r['sg_lr'], 'g')} | {r['lr']:g} | "
                     f"{_fmt(r)} | {blank(sum(r['seconds']) / len(r['seconds']) if r['seconds'] else None, '.0f')} |")
    lines += ["", "Best per method: " + "; ".join(
        f"{m}: synth_layers {b['synth_layers']}, {WIDTH[model]} {b['synth_width']}, sg_lr {b['sg_lr']}, lr {b['lr']} "
        f"({_fmt(b)}%)"
        for m, b in table["best"].items()) if table["best"] else "Best per method: no finished run yet.",
        "Defaults in dnilab/presets.py now: " + "; ".join(
            f"{m}: " + ", ".join(f"{k} {v}" for k, v in d.items()) for m, d in meta["defaults_now"].items()) + ".",
        "Network: " + ", ".join(f"{k} {v}" for k, v in meta["network"].items()) + f"; torch {meta['torch']}.",
        *([meta["modified_tree"]] if meta.get("modified_tree") else []),
        f"Made by `{meta['command'].strip()}`; `--table_only` redraws it from the run folders.", ""]
    return "\n".join(lines)


def write(args, table):
    base = Path(args.results) / args.stem
    base.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(table, indent=2) + "\n"), (".md", markdown(table))):
        write_text(base.with_name(base.name + suffix), text)


def search(args, log=print):
    start = time.perf_counter()
    failures = {}
    if not args.table_only:
        configs = [run_config(args, *p, seed) for p in points(args) for seed in args.seeds]
        todo = pending(configs, args.retrain_stale)
        log(f"{args.stem}: {len(todo)} run(s) to train, --jobs {args.jobs}")
        failures = train_all(todo, jobs=args.jobs, threads=args.threads, log=log,
                             after_each=lambda f: write(args, collect(args, f)))
    table = collect(args, failures)
    write(args, table)
    log(markdown(table))
    log(f"wrote {Path(args.results) / args.stem}.md and .json in {time.perf_counter() - start:.0f} s")
    return table


def parse_args(argv=None):
    parser = OneLineParser(prog="python -m experiments.search", description=__doc__.splitlines()[0])
    parser.add_argument("--model_type", choices=list(WIDTH), default="mlp", help="network (default: mlp)")
    parser.add_argument("--synth_layers", type=int, nargs="+", choices=SYNTH_LAYERS,
                        help=f"synthesizer hidden layers (default: {' '.join(map(str, SYNTH_LAYERS))})")
    parser.add_argument("--synth_widths", type=int, nargs="+",
                        help=f"units (cnn: filters) per synthesizer hidden layer "
                             f"(default: mlp {' '.join(map(str, SYNTH_WIDTHS))}, cnn {OURS['synth_channels']})")
    parser.add_argument("--sg_lrs", type=float, nargs="+", help=f"synthesizer lrs (default: {' '.join(map(str, SG_LRS))})")
    parser.add_argument("--lrs", type=float, nargs="+", help=f"stage lrs (default: {' '.join(map(str, LRS))})")
    parser.add_argument("--methods", nargs="+", choices=list(SEARCHED), help="default: dni cdni backprop")
    parser.add_argument("--epochs", type=int, help=f"epochs per run (default: {EPOCHS})")
    parser.add_argument("--seeds", type=int, nargs="+", help=f"default: {' '.join(map(str, SEEDS))}")
    parser.add_argument("--quick", action="store_true", help="2 runs of 1 epoch, written as search_quick.*")
    add_grid_options(parser, "search")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    stored = Path(args.results) / ("search" if args.model_type == "mlp" else f"search_{args.model_type}")
    if args.table_only and not any(a.split("=")[0] in GRID_FLAGS for a in argv) \
            and stored.with_suffix(".json").exists():  # a bare redraw: the grid the table was made with
        typed = json.loads(stored.with_suffix(".json").read_text())["meta"]["command"].split()[3:]
        argv = typed + [a for a in argv if a not in typed]
        args = parser.parse_args(argv)
    args.argv = argv
    widths = list(SYNTH_WIDTHS) if args.model_type == "mlp" else [OURS["synth_channels"]]
    defaults = QUICK_SEARCH if args.quick else dict(synth_layers=list(SYNTH_LAYERS), synth_widths=widths,
                                             sg_lrs=list(SG_LRS), lrs=list(LRS), methods=list(SEARCHED),
                                             epochs=EPOCHS, seeds=list(SEEDS))
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    check_counts(parser, args)
    if any(w < 1 for w in args.synth_widths):
        parser.error("argument --synth_widths: must be > 0")
    for name in ("sg_lrs", "lrs"):
        if any(not v > 0 for v in getattr(args, name)):
            parser.error(f"argument --{name}: learning rates must be > 0")
    args.stem = "search_quick" if args.quick else "search" if args.model_type == "mlp" else f"search_{args.model_type}"
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    return grid_main(search, args)


if __name__ == "__main__":
    main()
