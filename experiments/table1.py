"""The paper's Table 1 (section 3.1): test error of FCNs of 3-6 layers and CNNs of 3-4 layers,
each trained four ways: No Bprop (only the top layer learns), Bprop, DNI and cDNI.

    python -m experiments.table1                               # the CPU grid: every cell, seeds 0 1 2
    python -m experiments.table1 --models mlp --jobs 2         # a part of it, two runs at once
    python -m experiments.table1 --dataset fashion_mnist       # -> results/fashion_table1.*
    python -m experiments.table1 --paper --device cuda         # the paper's budget: 500k steps, lr 3e-5
    python -m experiments.table1 --preset paper --models mlp   # the paper's own networks and synthesizers at
                                                       # this table's budget -> results/table1_preset_paper.*
    python -m experiments.table1 --quick                       # a 1-2 minute slice (the test's)
    python -m experiments.table1 --table_only                  # redraw tables and figures from the run folders

Layers are counted as in the paper: every layer with weights, the classifier included. FCN
"3 layers" is two hidden layers and the classifier (`--model_type mlp --depth 2`); CNN "3
layers" is two conv layers and the classifier (`--model_type cnn --depth 2`).

Each run is an ordinary `dnilab.train.run` folder, <results>/table1/<dataset>/<model><layers>_<method>_s<seed>
(table1_quick/ and table1_paper/ for those budgets). A finished one (summary.json) is reused
if it was trained with the settings asked for now, so an interrupted table resumes; one trained
with other settings (say the defaults in dnilab/config.py moved) stops the table with a message,
unless --retrain_stale. Ctrl-C or `kill PID` stops the table after its running runs saved a
checkpoint (exit 130/143); the same command then continues them (dnilab.train --resume). Unset
hyperparameters (sg_lr, synthesizer depth...) are dnilab.config's defaults at run time. Writes
<results>/table1.json, .md, _curves.png and _sg.png (Fashion-MNIST: fashion_table1.*),
rewriting the tables after every run; `--table_only` redraws them from the run folders.
"""
import time

import torch

from dnilab.cli import OneLineParser
from dnilab.presets import PAPER_ITERATIONS, PRESETS
from experiments.grid import (COLUMNS, CPU_SETTINGS, SEEDS, add_grid_options, check_counts, grid_main, pending,
                             train_all)
from experiments.table1_figures import plot_curves, plot_sg
from experiments.table1_grid import (DATASET_TITLES, LAYERS, PAPER_METHODS, PAPER_SETTINGS, QUICK_TABLE, grid_cells,
                                     output_base, run_config, stem)
from experiments.table1_table import collect, markdown, write_tables


def train_grid(args, log=print):
    """Train every missing run of the grid, rewriting the tables after each; returns failures."""
    configs = [run_config(args, model, layers, method, seed) for model, layers in grid_cells(args)
               for method in args.methods for seed in args.seeds]
    todo = pending(configs, args.retrain_stale)
    log(f"{stem(args)} {args.dataset}: {len(todo)} run(s) to train, --jobs {args.jobs}")
    return train_all(todo, jobs=args.jobs, threads=args.threads, log=log,
                     after_each=lambda failures: write_tables(args, collect(args, failures)))


def make_table(args, log=print):
    """Train what is missing (unless --table_only), then write the tables and figures."""
    start = time.perf_counter()
    failures = {} if args.table_only else train_grid(args, log)
    table = collect(args, failures)
    write_tables(args, table)
    base = output_base(args)
    paths = [base.with_name(base.name + ".md"), base.with_name(base.name + ".json")]
    for suffix, plot in (("_curves.png", plot_curves), ("_sg.png", plot_sg)):
        if plot(args, table, base.with_name(base.name + suffix)):
            paths.append(base.with_name(base.name + suffix))
    log(markdown(table))
    log(f"wrote {', '.join(map(str, paths))} in {time.perf_counter() - start:.0f} s")
    return table


# ---------------------------------------------------------------- command line

def parse_args(argv=None):
    parser = OneLineParser(prog="python -m experiments.table1", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist", choices=list(DATASET_TITLES))
    parser.add_argument("--seeds", type=int, nargs="+", help=f"seeds per cell (default: {' '.join(map(str, SEEDS))})")
    parser.add_argument("--models", nargs="+", choices=list(LAYERS), help="networks (default: mlp cnn)")
    parser.add_argument("--layers", type=int, nargs="+",
                        help="only these layer counts (default: the paper's, FCN 3-6 and CNN 3-4)")
    parser.add_argument("--methods", nargs="+", choices=list(COLUMNS),
                        help="columns (default: the paper's four; local adds local auxiliary losses beside them)")
    parser.add_argument("--epochs", type=int,
                        help="epochs of every run (default: "
                             + ", ".join(f"{k} {v['num_epochs']}" for k, v in CPU_SETTINGS.items()) + ")")
    parser.add_argument("--paper", action="store_true",
                        help=f"the paper's budget: {PAPER_ITERATIONS} iterations, "
                             + ", ".join(f"{k} {v}" for k, v in PAPER_SETTINGS.items()) + " (for a GPU)")
    parser.add_argument("--quick", action="store_true", help="a 1-2 minute slice: FCN 3, Bprop/DNI/cDNI, 1 seed, 1 epoch")
    parser.add_argument("--preset", choices=list(PRESETS), default="ours",
                        help="ours: our networks and synthesizers (dnilab/presets.py); paper: section 3.1's, nothing of "
                             "ours, at this table's budget and stage lr (sg_lr = lr) unless --paper (default: ours)")
    add_grid_options(parser, "table1")
    args = parser.parse_args(argv)
    if args.quick and args.paper:
        parser.error("--quick and --paper are two different budgets; pick one")
    if args.paper and args.epochs:
        parser.error("--paper sets the epochs itself (500k iterations); drop --epochs")
    defaults = QUICK_TABLE if args.quick else dict(models=list(LAYERS), layers=None, methods=list(PAPER_METHODS),
                                             seeds=list(SEEDS), epochs=None)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    check_counts(parser, args)
    if any(n < 2 for n in args.layers or ()):
        parser.error("argument --layers: a network has at least 2 layers (one hidden + the classifier)")
    if len(set(args.seeds)) < len(args.seeds):
        parser.error("argument --seeds: a seed is repeated")
    return args


def main(argv=None):
    """Exit 2 on bad input; 130/143 after SIGINT/SIGTERM, with every running run checkpointed:
    the same command continues the table."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    return grid_main(make_table, args)


if __name__ == "__main__":
    main()
