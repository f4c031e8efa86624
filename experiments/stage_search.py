"""The stage learning rate and budget of main.py's networks, chosen on the validation split.

    python -m experiments.stage_search --model_type mlp --jobs 2   # FCN 4 (main.py --model_type mlp)
    python -m experiments.stage_search --model_type cnn --jobs 2   # CNN 3 (main.py --model_type cnn)
    python -m experiments.stage_search --model_type mlp --table_only   # rank the finished runs again

Every candidate (stage lr, epochs) is trained with backprop, DNI and cDNI at main.py's defaults
otherwise (our synthesizers, cosine schedule, batch 256), three seeds each. A run is a
dnilab.train run folder under <results>/stage_search/<model>/, reused when finished, so the search
resumes. Only validation error is read (the last 10,000 training images); the test set is not.

The rules, fixed before any run was trained:
- score of a candidate: the mean over seeds of (the mean over the three methods of the
  validation error); its standard error: the standard deviation over seeds of that per-seed
  mean, divided by the square root of the number of seeds.
- main.py's stage lr and budget (one per network, every method alike): among all candidates,
  the one with the lowest score sets a bar, score + its standard error; the chosen candidate is
  the one with the fewest epochs whose score is under the bar (ties: the lower score). This
  prices time: a longer budget must beat a shorter one by more than the seeds' noise.
- Table 1's stage lr (its budget, 10 epochs, is what the CPU grid affords, not a choice): the
  lr with the lowest score among the 10-epoch candidates, at FCN 4 / CNN 3.
Nothing is chosen until every run of the candidates a rule reads has finished.
"""
import itertools
import json
import math
import statistics
import time
from pathlib import Path

import torch

from dnilab.cli import OneLineParser
from dnilab.config import Config
from dnilab.runs import write_text
from experiments.grid import COLUMNS, SEEDS, check_counts, grid_main, pending, train_all

SEARCHED = ("backprop", "dni", "cdni")  # columns of experiments.grid.COLUMNS
TABLE1_EPOCHS = 10
# (lr, epochs) candidates per network; a 10-epoch row serves both rules.
CANDIDATES = {
    "mlp": sorted({(lr, 10) for lr in (1e-4, 3e-4, 1e-3, 3e-3)}
                  | {(lr, e) for lr in (1e-4, 3e-4, 1e-3) for e in (20, 60)}, key=lambda c: (c[1], c[0])),
    "cnn": sorted({(lr, 10) for lr in (1e-3, 3e-3, 1e-2)}
                  | {(lr, e) for lr in (1e-3, 3e-3) for e in (20,)}, key=lambda c: (c[1], c[0])),
}
NETWORK = {"mlp": "FCN 4", "cnn": "CNN 3"}


def run_name(method, lr, epochs, seed):
    return f"{method}_lr{lr:g}_e{epochs}_s{seed}"


def run_config(args, method, lr, epochs, seed):
    settings = dict(model_type=args.model_type, lr=lr, num_epochs=epochs, seed=seed, plot=False, overwrite=True,
                    out=str(Path(args.results) / "stage_search" / args.model_type / run_name(method, lr, epochs, seed)),
                    **COLUMNS[method])
    for name in ("device", "data_dir"):
        if getattr(args, name):
            settings[name] = getattr(args, name)
    return Config(**settings)


def configs(args):
    """Every run, cheapest budget first and seed by seed, so a stopped search has whole seeds."""
    return [run_config(args, method, lr, epochs, seed)
            for epochs in sorted({e for _, e in args.candidates} & set(args.budgets)) for seed in args.seeds
            for lr, e in args.candidates if e == epochs for method in args.methods]


def _summary(args, method, lr, epochs, seed):
    path = Path(run_config(args, method, lr, epochs, seed).out) / "summary.json"
    return json.loads(path.read_text()) if path.exists() else None


def collect(args):
    """Per candidate: each method's validation errors, the per-seed mean over methods, score and SE.
    The epochs shown are those the run folders record."""
    rows = []
    for lr, epochs in args.candidates:
        per_method, seconds, recorded = {}, [], set()
        for method, seed in itertools.product(args.methods, args.seeds):
            summary = _summary(args, method, lr, epochs, seed)
            if summary is None:
                continue
            if summary.get("val_acc") is None:
                raise SystemExit(f"{run_config(args, method, lr, epochs, seed).out} has no validation accuracy")
            per_method.setdefault(method, {})[seed] = round(100 * (1 - summary["val_acc"]), 4)
            seconds.append(summary["seconds"])
            recorded.add(summary["epochs"])
        complete = all(len(per_method.get(m, {})) == len(args.seeds) for m in args.methods)
        score = se = None
        if complete:
            per_seed = [statistics.mean(per_method[m][s] for m in args.methods) for s in args.seeds]
            score = statistics.mean(per_seed)
            se = statistics.stdev(per_seed) / math.sqrt(len(per_seed)) if len(per_seed) > 1 else 0.0
        rows.append(dict(lr=lr, epochs=sorted(recorded) or [epochs], complete=complete,
                         val_error={m: [per_method.get(m, {}).get(s) for s in args.seeds] for m in args.methods},
                         score=score, se=se, seconds=sum(seconds)))
    return dict(model_type=args.model_type, seeds=list(args.seeds), methods=list(args.methods), rows=rows,
                headline=choose_headline(rows), table1=choose_table1(rows),
                runs_done=sum(v is not None for r in rows for errs in r["val_error"].values() for v in errs),
                runs_total=len(rows) * len(args.methods) * len(args.seeds),
                command=f"python -m experiments.stage_search --model_type {args.model_type} --jobs 2")


def choose_headline(rows):
    """The rule in the module docstring: the fewest epochs within one SE of the best score."""
    if not rows or not all(r["complete"] for r in rows):
        return None
    best = min(rows, key=lambda r: r["score"])
    bar = best["score"] + best["se"]
    fine = [r for r in rows if r["score"] <= bar]
    chosen = min(fine, key=lambda r: (r["epochs"][0], r["score"]))
    return dict(lr=chosen["lr"], epochs=chosen["epochs"][0], score=chosen["score"], bar=bar,
                best=dict(lr=best["lr"], epochs=best["epochs"][0], score=best["score"], se=best["se"]))


def choose_table1(rows):
    ten = [r for r in rows if r["epochs"] == [TABLE1_EPOCHS]]
    if not ten or not all(r["complete"] for r in ten):
        return None
    best = min(ten, key=lambda r: r["score"])
    return dict(lr=best["lr"], epochs=TABLE1_EPOCHS, score=best["score"])


def _errors(values):
    done = [v for v in values if v is not None]
    if not done:
        return "—"
    text = f"{statistics.mean(done):.2f}" + (f" ± {statistics.stdev(done):.2f}" if len(done) > 1 else "")
    return text + (f" ({len(done)} of {len(values)})" if len(done) < len(values) else "")


def markdown(table):
    model = table["model_type"]
    lines = [f"# Stage learning rate and budget of main.py's {NETWORK[model]}, chosen on validation", "",
             f"{table['runs_done']} of {table['runs_total']} runs finished"
             + (" (**partial: nothing is chosen yet**)" if table["runs_done"] < table["runs_total"] else "")
             + f"; seeds {table['seeds']}; validation error (%) on the last 10,000 training images, mean ± std "
             "over seeds (the test set is not read). Score: mean over seeds of the mean over methods; SE its "
             "standard error. Epochs as the run folders record them.", "",
             "| epochs | lr | " + " | ".join(table["methods"]) + " | score ± SE | train s (all runs) |",
             "|---|---|" + "---|" * len(table["methods"]) + "---|---|"]
    for r in table["rows"]:
        score = f"{r['score']:.3f} ± {r['se']:.3f}" if r["complete"] else "—"
        lines.append(f"| {'/'.join(map(str, r['epochs']))} | {r['lr']:g} | "
                     + " | ".join(_errors(r["val_error"][m]) for m in table["methods"])
                     + f" | {score} | {r['seconds']:.0f} |")
    h, t = table["headline"], table["table1"]
    lines += ["", "Rules (fixed before the runs): see experiments/stage_search.py's docstring.", "",
              ("main.py's stage lr and budget: **lr {lr:g}, {epochs} epochs** (score {score:.3f}; best {b[lr]:g} at "
               "{b[epochs]} epochs, {b[score]:.3f} ± {b[se]:.3f}; bar {bar:.3f}).").format(b=h["best"], **h)
              if h else "main.py's stage lr and budget: not chosen yet (runs missing).",
              f"Table 1's stage lr at {TABLE1_EPOCHS} epochs: **lr {t['lr']:g}** (score {t['score']:.3f})."
              if t else f"Table 1's stage lr at {TABLE1_EPOCHS} epochs: not chosen yet (runs missing).", "",
              f"Made by `{table['command']}` (run by run, cheapest budgets first: `--budgets 10`, then 20, then 60); "
              "`--table_only` redraws it from the run folders.", ""]
    return "\n".join(lines)


def write(args, table):
    base = Path(args.results) / f"stage_search_{args.model_type}"
    base.parent.mkdir(parents=True, exist_ok=True)
    write_text(base.with_suffix(".json"), json.dumps(table, indent=2) + "\n")
    write_text(base.with_suffix(".md"), markdown(table))


def search(args, log=print):
    start = time.perf_counter()
    if not args.table_only:
        todo = pending(configs(args), args.retrain_stale)
        log(f"stage_search {args.model_type}: {len(todo)} run(s) to train, --jobs {args.jobs}")
        train_all(todo, jobs=args.jobs, threads=args.threads, log=log, after_each=lambda f: write(args, collect(args)))
    table = collect(args)
    write(args, table)
    log(markdown(table))
    log(f"wrote {args.results}/stage_search_{args.model_type}.md in {time.perf_counter() - start:.0f} s")
    return table


def parse_args(argv=None):
    parser = OneLineParser(prog="python -m experiments.stage_search", description=__doc__.splitlines()[0])
    parser.add_argument("--model_type", choices=list(CANDIDATES), default="mlp", help="network (default: mlp)")
    parser.add_argument("--methods", nargs="+", choices=list(SEARCHED), default=list(SEARCHED))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--data_dir")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per run (default: 1)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, one process each (default: 1)")
    parser.add_argument("--budgets", type=int, nargs="+",
                        help="train only the candidates of these epochs (default: all); the table shows all")
    parser.add_argument("--results", default="results")
    parser.add_argument("--table_only", action="store_true", help="train nothing: rank the finished runs")
    parser.add_argument("--retrain_stale", action="store_true")
    args = parser.parse_args(argv)
    check_counts(parser, args, names=("threads", "jobs"))
    args.candidates = CANDIDATES[args.model_type]
    args.budgets = args.budgets or sorted({e for _, e in args.candidates})
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    return grid_main(search, args)


if __name__ == "__main__":
    main()
