"""The paper's unlocking experiments (section 3.3, Fig. 7) as run folders, and a JSON file, a markdown
table and a figure each.

    python -m experiments.unlock_experiments update_prob   # Fig. 7 left: results/update_prob.json, .md and .png
    python -m experiments.unlock_experiments unlock        # Fig. 7 right: results/unlock.json, .md and .png
    python -m experiments.unlock_experiments plot          # redraw the tables and figures from the JSON files alone

longer budgets, in folders and files of their own:

    python -m experiments.unlock_experiments update_prob --epochs 20 --probs 0.2 0.1 0.05 --seeds 0 --name update_prob_long
    python -m experiments.unlock_experiments unlock --epochs 12 --name unlock_long

update_prob: the 4-stage FCN (`--model_type mlp`: 3 hidden stages of 256 units + the classifier)
trained with backprop, DNI and cDNI at each update probability P and seed, every run for the same
number of steps (`--epochs` x 195 at batch 256 on the 50,000 images the validation split leaves), so
test error is compared at a fixed number of
iterations. unlock: the same FCN with `--unlock complete` (DNI and cDNI) beside the P = 1 runs of
backprop, DNI and cDNI of the sweep (same settings, so they are reused).

Run folders go under runs/ (git-ignored: checkpoints are large). A run whose folder already holds
a summary.json written with the same settings is reused, so an interrupted sweep goes on where it
stopped; one with other settings is trained again (and said so).
"""
import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import torch

from dnilab.config import Config, saved_settings
from dnilab.data import TRAIN_SIZES
from dnilab.runs import write_json, write_text
from experiments.grid import COLUMNS, mean_std

COMPARED = ("backprop", "dni", "cdni")  # columns of experiments.grid.COLUMNS
PROBS = (1.0, 0.5, 0.2, 0.1, 0.05)


def same_settings(saved, config):
    """Whether a finished run's config.json agrees with `config` on every setting this module chooses
    (SETTINGS and the per-run ones): other defaults of Config may change without retraining."""
    names = set(SETTINGS) | {"dataset", "method", "conditioned", "update_prob", "unlock", "seed", "num_epochs",
                             "batch_size"}
    current, saved = config.to_dict(), saved_settings(saved)
    return all(saved.get(name) == current[name] for name in names)


def train_or_reuse(config):
    """The summary of the run `config` describes, trained only if its folder holds no such finished run."""
    from dnilab.train import run
    out = Path(config.out)
    if (out / "summary.json").exists():
        saved = json.loads((out / "config.json").read_text()) if (out / "config.json").exists() else {}
        if same_settings(saved, config):
            print(f"reusing {out}")
            return json.loads((out / "summary.json").read_text())
        print(f"{out} holds a run with other settings; training it again")
    return run(dataclasses.replace(config, overwrite=True))


def curve(run_dir):
    """(steps, test accuracies) after every epoch, and the fraction of steps each stage updated."""
    lines = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]
    epochs = [m for m in lines if m["kind"] == "epoch"]
    updated = [m["updated"] for m in lines if m["kind"] == "step" and "updated" in m]
    steps = sum(1 for m in lines if m["kind"] == "step")
    rates = [sum(u[i] for u in updated) / len(updated) for i in range(len(updated[0]))] if updated else None
    return {"curve": {"step": [m["step"] for m in epochs], "test_acc": [m["test_acc"] for m in epochs]},
            "update_rate": rates, "steps": steps}


def environment():
    return {"torch": torch.__version__, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}


# Pinned here, not taken from Config's defaults, so a change of a default never changes these results.
# The last 10,000 training images are held out (the protocol's split); nothing here is chosen, the
# tables report test error after the last step.
SETTINGS = dict(model_type="mlp", depth=3, hidden=256, lr=1e-3, sg_lr=3e-3, schedule="cosine", synth_layers=0,
                synth_width=1024, input_model_layers=1, input_model_width=512, dataset="mnist", val_size=10_000,
                synth_label_map=False)


def base_config(args, **kw):
    return Config(**SETTINGS, num_epochs=args.epochs, batch_size=args.batch_size, data_dir=args.data_dir,
                  plot=False, **kw)


def run_entry(name, config, summary, wall):
    return {"name": name, "method": "cdni" if config.conditioned else config.method,
            "update_prob": config.update_prob, "unlock": config.unlock, "seed": config.seed,
            "test_acc": summary["test_acc"], "test_error": 1 - summary["test_acc"],
            "train_seconds": summary["seconds"], "wall_seconds": round(wall, 1), "run_dir": config.out,
            **curve(config.out)}


# ---------------------------------------------------------------- Fig. 7 left

def update_prob_sweep(args):
    start, runs = time.perf_counter(), []
    for seed in args.seeds:
        for method in args.methods:
            for p in args.probs:
                config = base_config(args, **COLUMNS[method], update_prob=p, seed=seed,
                                     out=str(Path(args.runs) / args.name / f"{method}_p{p:g}_s{seed}"))
                t = time.perf_counter()
                summary = train_or_reuse(config)
                runs.append(run_entry(f"{method}_p{p:g}_s{seed}", config, summary, time.perf_counter() - t))
    table = {}
    for method in args.methods:
        for p in args.probs:
            errors = [r["test_error"] for r in runs if r["method"] == method and r["update_prob"] == p]
            mean, std = mean_std(errors, single=0.0)
            table.setdefault(method, {})[f"{p:g}"] = {"test_error_mean": mean, "test_error_std": std,
                                                      "seeds": len(errors)}
    steps = runs[0]["steps"]
    result = {"experiment": "update_prob (paper section 3.3, Fig. 7 left)",
              "budget": {"epochs": args.epochs, "batch_size": args.batch_size, "steps": steps,
                         "model": "mlp: 3 hidden stages of 256 (Linear-BatchNorm-ReLU) + linear classifier"},
              "settings": SETTINGS,
              "seeds": args.seeds, "probs": args.probs, "table": table, "runs": runs,
              "wall_seconds": round(time.perf_counter() - start, 1),
              "train_seconds_total": round(sum(r["train_seconds"] for r in runs), 1),
              "environment": environment(), "command": "python -m experiments.unlock_experiments update_prob " + args.argv}
    write_json(Path(args.results) / f"{args.name}.json", result)
    plot_update_prob(Path(args.results) / f"{args.name}.json")
    print(write_markdown(Path(args.results) / f"{args.name}.json"))


def update_prob_table(result):
    probs = result["probs"]
    rows = ["| method | " + " | ".join(f"P = {p:g}" for p in probs) + " |",
            "|---|" + "---|" * len(probs)]
    for method, cells in result["table"].items():
        rows.append(f"| {method} | " + " | ".join(
            f"{100 * cells[f'{p:g}']['test_error_mean']:.2f} ± {100 * cells[f'{p:g}']['test_error_std']:.2f}"
            for p in probs) + " |")
    b = result["budget"]
    rows.append(f"\nTest error (%), mean ± std over seeds {result['seeds']}, after {b['steps']} steps "
                f"({b['epochs']} epochs at batch {b['batch_size']}); training time of all runs "
                f"{result['train_seconds_total']:.0f} s, wall time of the last sweep command {result['wall_seconds']:.0f} s.")
    return "\n".join(rows)


# ---------------------------------------------------------------- Fig. 7 right

def unlock_runs(args):
    start, runs = time.perf_counter(), []
    # The default experiment reuses the sweep's P = 1 runs (same settings); another --name keeps its own.
    reference = "update_prob" if args.name == "unlock" else args.name
    specs = [(f"{m}_p1_s{args.seeds[0]}", dict(**COLUMNS[m]), reference) for m in args.methods]
    specs += [(f"{m}_complete_s{args.seeds[0]}", dict(**COLUMNS[m], unlock="complete"), args.name)
              for m in args.methods if m != "backprop"]
    for name, kw, folder in specs:
        config = base_config(args, **kw, seed=args.seeds[0], out=str(Path(args.runs) / folder / name))
        t = time.perf_counter()
        summary = train_or_reuse(config)
        runs.append(run_entry(name, config, summary, time.perf_counter() - t))
    result = {"experiment": "complete unlock (paper section 3.3, Fig. 7 right)",
              "budget": {"epochs": args.epochs, "batch_size": args.batch_size, "steps": runs[0]["steps"]},
              "settings": SETTINGS,
              "runs": runs, "wall_seconds": round(time.perf_counter() - start, 1), "environment": environment(),
              "command": "python -m experiments.unlock_experiments unlock " + args.argv}
    write_json(Path(args.results) / f"{args.name}.json", result)
    plot_unlock(Path(args.results) / f"{args.name}.json")
    print(write_markdown(Path(args.results) / f"{args.name}.json"))


def unlock_table(result):
    rows = ["| run | unlock | test error | train time |", "|---|---|---|---|"]
    for r in result["runs"]:
        rows.append(f"| {r['method']} | {r['unlock']} | {100 * r['test_error']:.2f}% | {r['train_seconds']:.0f} s |")
    b = result["budget"]
    rows.append(f"\nAfter {b['steps']} steps ({b['epochs']} epochs at batch {b['batch_size']}), seed "
                f"{result['runs'][0]['seed']}.")
    return "\n".join(rows)


# ---------------------------------------------------------------- markdown, from the JSON files alone

def write_markdown(path):
    """Write the table of an update_prob or unlock JSON file beside it (same name, .md), with its budget,
    hardware, command and files, so docs/unlocking.md copies it (`python -m experiments.report`) and never types
    a figure by hand. Returns the table."""
    path = Path(path)
    result = json.loads(path.read_text())
    if "table" in result:
        title, table = "Stochastic updates: test error against update probability P", update_prob_table(result)
    else:
        title, table = "Complete unlock: test error with synthetic inputs", unlock_table(result)
    s = result["settings"]
    lines = [f"# {title}", "",
             f"{result['experiment']}; {s['dataset']}, the {s['depth'] + 1}-stage FCN ({s['depth']} hidden stages of "
             f"{s['hidden']} units + linear classifier), lr {s['lr']:g}, sg_lr {s['sg_lr']:g}, schedule "
             f"{s['schedule']}, synthesizers with {s['synth_layers']} hidden layers; " + _split(s), "", table, "",
             f"Hardware: {_caption(result)}.",
             f"Command: `{result['command'].strip()}`; data: {path.as_posix()}; "
             f"figure: {path.with_suffix('.png').as_posix()}."]
    write_text(path.with_suffix(".md"), "\n".join(lines) + "\n")
    return table


# ---------------------------------------------------------------- figures, from the JSON files alone

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    try:
        import seaborn
        seaborn.set_theme(style="whitegrid")
    except ImportError:
        pass
    return plt


def _log_error_axis(ax):
    """Log-scale y axis labelled 0.5, 1, 2, 5, 10, 20, 50 (%)."""
    import matplotlib.ticker as ticker
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(ticker.FixedLocator([0.5, 1, 2, 3, 5, 10, 20, 30, 50, 100]))
    ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())


def _split(settings):
    held, total = settings.get("val_size", 0), TRAIN_SIZES[settings["dataset"]]
    if not held:
        return f"trained on all {total:,} training images (made before the validation split)."
    return (f"trained on the first {total - held:,} training images (the last {held:,} are the validation split, "
            "not read here: nothing is chosen); test error after the last step.")


def _caption(result):
    env = result["environment"]
    return f"torch {env['torch']}, {env['cpu']}, {env['threads']} thread(s)"


def plot_update_prob(path):
    result = json.loads(Path(path).read_text())
    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 5.2))
    for method, cells in result["table"].items():
        probs = [float(p) for p in cells]
        left.errorbar(probs, [100 * c["test_error_mean"] for c in cells.values()],
                      yerr=[100 * c["test_error_std"] for c in cells.values()], marker="o", capsize=3, label=method)
    left.set_xscale("log")
    _log_error_axis(left)
    left.set_xticks(result["probs"], [f"{p:g}" for p in result["probs"]])
    left.set_xticks([], minor=True)
    left.invert_xaxis()
    b = result["budget"]
    left.set(xlabel="update probability P", ylabel="test error (%)",
             title=f"after {b['steps']} steps, " + (f"mean ± std of {len(result['seeds'])} seeds"
                                                    if len(result["seeds"]) > 1 else f"seed {result['seeds'][0]}"))
    left.legend()
    colors = dict(zip(result["table"], plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    styles = {1.0: "-", 0.2: "--", 0.05: ":"}
    for method in result["table"]:
        for p, style in styles.items():
            runs = [r for r in result["runs"] if r["method"] == method and r["update_prob"] == p]
            if runs:
                errors = torch.tensor([[1 - a for a in r["curve"]["test_acc"]] for r in runs]).mean(0)
                right.plot(runs[0]["curve"]["step"], 100 * errors, style, color=colors[method], marker=".",
                           label=f"{method} P={p:g}")
    _log_error_axis(right)
    right.set(xlabel="step", ylabel="test error (%)", title="test error during training (mean of seeds)")
    right.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.16))
    fig.suptitle(f"Stochastic updates, 4-stage FCN on MNIST ({_caption(result)})", fontsize=10)
    fig.tight_layout()
    fig.savefig(Path(path).with_suffix(".png"), dpi=120)
    plt.close(fig)


def plot_unlock(path):
    result = json.loads(Path(path).read_text())
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 5.2))
    for r in result["runs"]:
        label = f"{r['method']}" + (" + synthetic inputs (complete unlock)" if r["unlock"] == "complete" else "")
        ax.plot(r["curve"]["step"], [100 * (1 - a) for a in r["curve"]["test_acc"]], marker="o",
                linestyle="-" if r["unlock"] == "complete" else "--", label=f"{label}: {100 * r['test_error']:.2f}%")
    _log_error_axis(ax)
    ax.set(xlabel="step", ylabel="test error (%)",
           title=f"Complete unlock, 4-stage FCN on MNIST\n({_caption(result)})")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    fig.tight_layout()
    fig.savefig(Path(path).with_suffix(".png"), dpi=120)
    plt.close(fig)


def main(argv=None):
    import sys
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m experiments.unlock_experiments", description=__doc__.splitlines()[0])
    parser.add_argument("experiment", choices=("update_prob", "unlock", "plot"))
    parser.add_argument("--epochs", type=int, default=4, help="epochs of every run (default: 4 = 780 steps)")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--probs", type=float, nargs="+", default=list(PROBS))
    parser.add_argument("--methods", nargs="+", choices=list(COMPARED), default=list(COMPARED))
    parser.add_argument("--runs", default="runs", help="where run folders go (default: runs, git-ignored)")
    parser.add_argument("--results", default="results", help="where the JSON and PNG go")
    parser.add_argument("--data_dir", default="data")
    parser.add_argument("--name", help="name of the experiment's run folder (under --runs) and of its JSON and PNG "
                                       "(under --results); default: the experiment's name")
    args = parser.parse_args(argv)
    args.argv = " ".join(argv[1:])
    args.name = args.name or args.experiment
    if args.experiment == "update_prob":
        update_prob_sweep(args)
    elif args.experiment == "unlock":
        unlock_runs(args)
    else:
        for path in sorted(Path(args.results).glob("update_prob*.json")):
            plot_update_prob(path)
            write_markdown(path)
            print(path.with_suffix(".png"), path.with_suffix(".md"))
        for path in sorted(Path(args.results).glob("unlock*.json")):
            plot_unlock(path)
            write_markdown(path)
            print(path.with_suffix(".png"), path.with_suffix(".md"))


if __name__ == "__main__":
    from dnilab.cli import main_guard
    main_guard(main)
