"""Time to accuracy ("Does DNI pay?", item 3): validation accuracy against training seconds, for
the wide and the default FCN of the bench (experiments.bench_workloads.BENCH_MODELS).

    python -m experiments.time_to_accuracy --models wide,mlp --epochs 20 --accuracies 95,97,98
    python -m experiments.time_to_accuracy --table_only     # rebuild the tables and figure, training nothing

Writes results/time_to_accuracy.json, .md and .png: per model and method, the training seconds
at which the validation accuracy first reaches each of --accuracies ("never" within the budget),
the final validation accuracy and the total training seconds; the figure draws validation
accuracy against training seconds, a line per method, a panel per model.

Every method of METHODS trains once, for the same budget (--epochs) with the same stage lr
(ACCURACY_LR of experiments.bench_accuracy, the bench's accuracy runs' Adam lr, cosine over the
budget), on the 2 cores: backprop in one process with 2 threads, or K = 2 workers of one thread
each (torch's 1F1B at the micro-batch count with the best 1F1B throughput in results/bench.json,
else --microbatches; the DNI and cDNI pipelines of main.py --pipeline True; local losses,
pipelined, where main.py has --method local). Each run is one of `dnilab.train.loop`, so its
epoch rows hold the validation accuracy and the training seconds so far, evaluation left out.
Only the validation split is read: the test accuracy the runs also log is not this measurement's.

Every accuracy printed has its run folder, results/time_to_accuracy/<model>_<method>/; a
finished one made with these settings is reused, so an interrupted measurement resumes at the
run it stopped in (that run starts again: pipelined runs keep no resume state).
"""
import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import dnilab.config
from dnilab.config import Config
from dni.errors import DNIError
from dnilab.cli import OneLineParser, main_guard, parse_bool
from dnilab.runs import metrics_rows, write_json, write_text
from experiments.bench import cpu_name
from experiments.bench_accuracy import ACCURACY_LR
from experiments.bench_workloads import BENCH_MODELS, ROOT, free_port

K = 2  # workers of every pipelined method
THREADS = 2  # of the one-process baseline: the cores the K workers use
BATCH_SIZE = Config.__dataclass_fields__["batch_size"].default  # main.py's, which every run keeps
VAL_SIZE = Config.__dataclass_fields__["val_size"].default  # main.py's
MACHINE = "machine.json"  # beside a run this measurement trained: the CPU, the load, the wall-clock seconds


class Method(NamedTuple):
    name: str  # the run folder's suffix and what --methods accepts
    label: str  # its row in the table and its line in the figure
    launch: str  # single: one process of THREADS threads; pipeline: K workers of main.py --pipeline True; 1f1b
    flags: tuple  # main.py's flags that make it


METHODS = (
    Method("backprop", f"backprop, 1 process, {THREADS} threads", "single", ("--method", "backprop")),
    Method("1f1b", f"backprop, torch 1F1B, K={K}", "1f1b", ("--method", "backprop")),
    Method("dni", f"DNI pipeline, K={K}", "pipeline", ("--method", "dni")),
    Method("cdni", f"cDNI pipeline, K={K}", "pipeline", ("--method", "dni", "--conditioned", "True")),
    Method("local", f"local losses pipelined, K={K}", "pipeline", ("--method", "local")),
)
BY_NAME = {m.name: m for m in METHODS}


def skipped(model, method):
    """Why (model, method) is not measured, or None."""
    wanted = method.flags[method.flags.index("--method") + 1]
    if wanted not in dnilab.config.METHODS:
        return f"main.py has no --method {wanted} yet (dnilab.config.METHODS)"
    return None


def best_microbatches(bench_path, model, fallback):
    """(micro-batches, where the count came from): of the 1F1B throughput rows of `model` at K
    workers in the bench's results, the fastest (median samples/s); else `fallback`."""
    try:
        bench = json.loads(Path(bench_path).read_text())
        rows = {int(m.group(1)): row["median"] for key, row in bench["throughput"].items()
                if (m := re.fullmatch(rf"{re.escape(model)}/1f1b_m(\d+)_K", key))}
        workers = bench["settings"]["workers"]
    except (OSError, ValueError, KeyError, TypeError):
        return fallback, f"--microbatches (no 1F1B throughput rows in {bench_path})"
    rows = {n: v for n, v in rows.items() if n >= K and BATCH_SIZE % n == 0}
    if workers != K or not rows:
        return fallback, f"--microbatches (no 1F1B throughput rows of {model} at K={K} in {bench_path})"
    best = max(rows, key=rows.get)
    return best, f"the fastest 1F1B row of {model} in {bench_path} (of {', '.join(map(str, sorted(rows)))})"


def run_dir_of(results, model, method):
    return Path(results) / "time_to_accuracy" / f"{model}_{method.name}"


def command(model, method, run_dir, args, microbatches=None, microbatches_from="", extra=()):
    """(argv, threads per process) of the run of (model, method), from this directory (paths as typed)."""
    flags = ["--model_type", "mlp", *method.flags, "--num_epochs", str(args.epochs), "--lr", str(ACCURACY_LR),
             "--seed", str(args.seed), "--val_size", str(args.val_size), "--device", "cpu", "--data_dir",
             args.data_dir, "--plot", "False", "--overwrite", "True", "--out", str(run_dir), *extra]
    if method.launch == "pipeline":
        flags += ["--pipeline", "True"]
    if model == "mlp" and method.launch != "1f1b":
        script = [os.path.relpath(ROOT / "main.py")]  # main.py's own net and loops; "main.py" from the root
    else:
        script = ["-m", "experiments.time_to_accuracy_run", "--bench_model", model]
    if method.launch == "1f1b":
        script += ["--n_microbatches", str(microbatches), "--n_microbatches_from", microbatches_from]
    if method.launch == "single":
        return [sys.executable, *script, *flags], THREADS
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(K), "--master_addr",
            "127.0.0.1", "--master_port", str(free_port()), *script, *flags], 1


def settings_differ(run_dir, model, method, args, microbatches=None):
    """The settings in which the finished run of `run_dir` differs from the one asked for."""
    config = json.loads((run_dir / "config.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    argv = shlex.split((run_dir / "command.txt").read_text().splitlines()[0])
    made = argv[argv.index("--bench_model") + 1] if "--bench_model" in argv else "mlp"
    flags = dict(zip(method.flags[::2], method.flags[1::2]))
    wanted = {"num_epochs": args.epochs, "lr": ACCURACY_LR, "seed": args.seed, "val_size": args.val_size,
              "method": flags["--method"],
              "conditioned": parse_bool(flags.get("--conditioned", "False")),
              "pipeline": method.launch == "pipeline"}
    differ = [f"{k} {config.get(k)} (not {v})" for k, v in wanted.items() if config.get(k) != v]
    if made != model:
        differ.append(f"bench model {made} (not {model})")
    got = summary.get("pipelining", {}).get("microbatches")
    if method.launch == "1f1b" and microbatches is not None and got != microbatches:
        differ.append(f"{got} micro-batches (not {microbatches})")
    return differ


def ensure_run(model, method, args):
    """The finished run folder of (model, method): reused if there, else trained now."""
    run_dir = run_dir_of(args.results, model, method)
    microbatches, source = (best_microbatches(args.bench, model, args.microbatches) if method.launch == "1f1b"
                            else (None, ""))
    if (run_dir / "summary.json").exists():
        differ = settings_differ(run_dir, model, method, args, microbatches)
        if differ:
            raise DNIError(f"{run_dir} holds a finished run with {', '.join(differ)}; "
                           "delete it or pass another --results")
        print(f"{model}/{method.name}: reusing {run_dir}", flush=True)
        return run_dir
    argv, threads = command(model, method, run_dir, args, microbatches, source)
    print(f"{model}/{method.name}: training -> {run_dir}" + (f" ({microbatches} micro-batches: {source})"
                                                             if microbatches else ""), flush=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS=str(threads))
    load, start = os.getloadavg(), time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0 or not (run_dir / "summary.json").exists():
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise DNIError(f"the {model}/{method.name} run failed ({' | '.join(tail)}); its command: {shlex.join(argv)}")
    # What env.json does not say: the CPU by name, and whether the machine was shared meanwhile.
    write_json(run_dir / MACHINE, {"cpu": cpu_name(), "cores": os.cpu_count(), "load_average_before": load,
                                   "load_average_after": os.getloadavg(),
                                   "wall_seconds": round(time.perf_counter() - start, 1)})
    return run_dir


# ---------------------------------------------------------------- reading run folders

def curve(run_dir):
    """[(training seconds so far, validation accuracy)] after each epoch of a run folder."""
    rows = [row for row in metrics_rows(run_dir) if row["kind"] == "epoch"]
    if any("val_acc" not in row for row in rows):
        raise DNIError(f"{run_dir} has epoch rows without val_acc: it trained on the validation split (--val_size 0)")
    return [(row["seconds"], row["val_acc"]) for row in rows]


def seconds_to(points, accuracy):
    """(training seconds, epoch) at which `points` (see `curve`) first reach `accuracy`, or None: never."""
    return next(((s, epoch) for epoch, (s, acc) in enumerate(points, start=1) if acc >= accuracy), None)


def measured(run_dir, method, accuracies):
    """What the table and the figure show of one finished run."""
    points = curve(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    env = json.loads((run_dir / "env.json").read_text())
    machine = json.loads((run_dir / MACHINE).read_text()) if (run_dir / MACHINE).exists() else {}
    return {"label": method.label, "run": str(run_dir), "curve": [list(p) for p in points],
            "seconds_to": {f"{a:g}": seconds_to(points, a / 100) for a in accuracies},
            "final_val_acc": summary["val_acc"], "train_seconds": summary["seconds"], "epochs": len(points),
            "val_size": config["val_size"], "microbatches": summary.get("pipelining", {}).get("microbatches"),
            "microbatches_from": summary.get("pipelining", {}).get("microbatches_from"),
            "threads_per_process": env.get("threads"), "machine": machine,
            "hardware": {"cpu": machine.get("cpu", env.get("cpu")), **{k: env.get(k) for k in ("torch", "python")}}}


def canonical_command(args):
    parts = ["python -m experiments.time_to_accuracy", "--models", ",".join(args.models), "--methods",
             ",".join(m.name for m in args.methods), "--epochs", str(args.epochs), "--accuracies",
             ",".join(f"{a:g}" for a in args.accuracies)]
    if args.seed:
        parts += ["--seed", str(args.seed)]
    if args.val_size != VAL_SIZE:
        parts += ["--val_size", str(args.val_size)]
    if args.results != "results":
        parts += ["--results", args.results]
    return " ".join(parts)


def collect(args):
    """The result dict, from the finished run folders (training the missing ones unless --table_only)."""
    runs, notes = {}, {}
    for model in args.models:
        for method in args.methods:
            reason = skipped(model, method)
            run_dir = run_dir_of(args.results, model, method)
            if reason is None and args.table_only and not (run_dir / "summary.json").exists():
                reason = f"not run yet ({run_dir} holds no finished run)"
            if reason:
                notes.setdefault(model, {})[method.name] = reason
                continue
            if args.table_only:
                differ = settings_differ(run_dir, model, method, args)
                if differ:
                    raise DNIError(f"{run_dir} holds a finished run with {', '.join(differ)}; "
                                   "pass the flags it was made with")
            else:
                run_dir = ensure_run(model, method, args)
            runs.setdefault(model, {})[method.name] = measured(run_dir, method, args.accuracies)
    if not runs:
        raise DNIError(f"no finished run folders under {Path(args.results) / 'time_to_accuracy'}; "
                       "run without --table_only first")
    hardware = next(iter(next(iter(runs.values())).values()))["hardware"]
    return {"command": canonical_command(args),
            "settings": {"epochs": args.epochs, "lr": ACCURACY_LR, "lr_from": "experiments.bench_accuracy.ACCURACY_LR",
                         "seed": args.seed, "batch_size": BATCH_SIZE, "accuracies": [f"{a:g}" for a in args.accuracies],
                         "workers": K, "threads_one_process": THREADS},
            "hardware": hardware, "runs": runs, "skipped": notes}


# ---------------------------------------------------------------- the table and the figure

def _when(hit):
    return "never" if hit is None else f"{hit[0]:.1f} s (epoch {hit[1]})"


def _load(runs):
    """The machine's 1-minute load average around the runs, where the runs recorded it."""
    loads = [v for row in runs for k in ("load_average_before", "load_average_after")
             for v in row["machine"].get(k, [])[:1]]
    return f" Load average (1 min) around the runs: {min(loads):.1f} to {max(loads):.1f}." if loads else ""


def markdown(result):
    s, acc = result["settings"], result["settings"]["accuracies"]
    runs = [row for rows in result["runs"].values() for row in rows.values()]
    lines = ["# Time to accuracy: validation accuracy against training seconds", "",
             f"`{result['command']}` (rebuild without training: add `--table_only`)", "",
             f"Every method trains the stages with Adam at lr {s['lr']:g} (`ACCURACY_LR` of "
             "experiments/bench_accuracy.py, the rate of the bench's accuracy runs), cosine over the budget of "
             f"{s['epochs']} epoch{'s' * (s['epochs'] != 1)}, batch {s['batch_size']}, seed {s['seed']}, on MNIST's training images less the "
             f"{', '.join(sorted({str(r['val_size']) for r in runs}))} validation ones. Accuracy: on the validation "
             "split after each epoch (the test split is not read). Seconds: training only, summed over the epochs "
             "so far, evaluation left out (`dnilab.train.loop`), the first steps' warm-up in: what a user waits "
             "for. Two cores: one process with "
             f"{s['threads_one_process']} threads, or K = {s['workers']} workers of one thread each. "
             f"CPU {result['hardware']['cpu']}, torch {result['hardware']['torch']}, "
             f"Python {result['hardware']['python']}." + _load(runs), ""]
    for model, rows in result["runs"].items():
        lines += [f"## {model}: {BENCH_MODELS[model][1]}", "",
                  "| method | " + " | ".join(f"{a}% val" for a in acc) + " | final val acc | train s | epochs | run |",
                  "|---|" + "---:|" * (len(acc) + 3) + "---|"]
        for row in rows.values():
            lines.append(f"| {row['label']} | " + " | ".join(_when(row["seconds_to"][a]) for a in acc)
                         + f" | {row['final_val_acc']:.4f} | {row['train_seconds']:.1f} | {row['epochs']} | "
                         f"`{row['run']}` |")
        lines.append("")
        if "1f1b" in rows:
            lines += [f"1F1B: {rows['1f1b']['microbatches']} micro-batches, from {rows['1f1b']['microbatches_from']}.",
                      ""]
    for model, notes in result["skipped"].items():
        lines += [f"Not measured on {model}: " + "; ".join(f"{m}: {why}" for m, why in notes.items()) + ".", ""]
    lines += ["![validation accuracy against training seconds](time_to_accuracy.png)", ""]
    return "\n".join(lines)


def figure(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = list(result["runs"])
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for row in result["runs"][model].values():
            seconds, accs = zip(*row["curve"])
            ax.plot(seconds, accs, marker="o", markersize=3, label=row["label"])
        for a in result["settings"]["accuracies"]:
            ax.axhline(float(a) / 100, color="grey", linestyle=":", linewidth=0.8)
        ax.set(title=model, xlabel="training seconds (evaluation left out)", ylabel="validation accuracy")
        # From the lowest accuracy drawn, but at most 0.15 below the first goal: the goals stay readable.
        lowest = min(acc for row in result["runs"][model].values() for _, acc in row["curve"])
        ax.set_ylim(max(0.0, max(lowest, float(result["settings"]["accuracies"][0]) / 100 - 0.15) - 0.01), 1.0)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata={"Software": None})
    plt.close(fig)


# ---------------------------------------------------------------- command line

def _names(registry, what):
    def parse(text):
        names = [n for n in text.split(",") if n]
        unknown = [n for n in names if n not in registry]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(unknown) or repr(text)}; "
                                             f"choose from {', '.join(registry)}")
        return names
    return parse


def _accuracies(text):
    """'95,97,98' -> [95.0, 97.0, 98.0]: percentages in (0, 100], rising."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected percentages separated by commas, got {text!r}") from None
    if not all(0 < v <= 100 for v in values) or values != sorted(set(values)):
        raise argparse.ArgumentTypeError(f"expected rising percentages in (0, 100], got {text!r}")
    return values


def _positive(text):
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def parse_args(argv=None):
    parser = OneLineParser(prog="python -m experiments.time_to_accuracy", description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=_names(BENCH_MODELS, "model"), default=list(BENCH_MODELS),
                        help="bench nets, of: " + ", ".join(BENCH_MODELS))
    parser.add_argument("--methods", type=_names(BY_NAME, "method"), default=list(BY_NAME),
                        help="methods, of: " + ", ".join(BY_NAME))
    parser.add_argument("--epochs", type=_positive, default=20, help="every method's budget (default: 20)")
    parser.add_argument("--accuracies", type=_accuracies, default=[95.0, 97.0, 98.0],
                        help="validation accuracies to time, in %% (default: 95,97,98)")
    parser.add_argument("--microbatches", type=_positive, default=2,
                        help=f"1F1B's micro-batches where --bench has no 1F1B throughput rows at K={K} (default: 2)")
    parser.add_argument("--bench", default="results/bench.json", help="the throughput results of experiments.bench")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val_size", type=int, default=VAL_SIZE,
                        help=f"validation images held out (main.py's --val_size, default: {VAL_SIZE}); a larger "
                             "one leaves fewer training images, for a quick look")
    parser.add_argument("--data_dir", default="data")
    parser.add_argument("--results", default="results", help="where the outputs and time_to_accuracy/ go")
    parser.add_argument("--timeout", type=float, default=6 * 3600, help="seconds per run before giving up")
    parser.add_argument("--table_only", type=parse_bool, nargs="?", const=True, default=False,
                        help="rebuild the outputs from the finished run folders, training nothing")
    args = parser.parse_args(argv)
    if args.val_size < 1:
        parser.error(f"--val_size must be >= 1 (the measurement reads the validation split), got {args.val_size}")
    if args.microbatches < K or BATCH_SIZE % args.microbatches:
        parser.error(f"--microbatches must be >= {K} (1F1B) and cut a batch of {BATCH_SIZE} equally, "
                     f"got {args.microbatches}")
    args.methods = [BY_NAME[name] for name in args.methods]
    return args


def main(argv=None):
    args = parse_args(argv)
    result = collect(args)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "time_to_accuracy.json", result)
    table = markdown(result)
    write_text(out / "time_to_accuracy.md", table)
    figure(result, out / "time_to_accuracy.png")
    print(table)


if __name__ == "__main__":
    main_guard(main)
