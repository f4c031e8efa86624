"""What the grids of the examples' runs share (experiments.examples_grid, .examples_search): their
command-line options, which finished runs are stale, and training the missing runs, each as its own
`python examples/<example>.py ...` process (the examples are scripts with their own loops, not
main.py's Config, so experiments.grid's train_all does not serve them).

A run is (folder, argv): argv is the example's script followed by `--flag value` pairs, `--out
folder` among them. A run is finished when its folder holds summary.json; one started and not
finished is trained again from its start (the examples keep no checkpoint).
"""
import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_print_lock = threading.Lock()


def add_options(parser, results):
    """The options both grids take; `results`: the default folder of their run folders."""
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, one process each (default: 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per run (default: 1)")
    parser.add_argument("--device", help="device of every run, e.g. cuda (default: the examples')")
    parser.add_argument("--results", default=results, help=f"where the run folders go (default: {results})")
    parser.add_argument("--list", action="store_true", help="list the runs and which are finished; train nothing")
    parser.add_argument("--retrain_stale", action="store_true",
                        help="retrain finished runs whose settings differ from those asked for now")


def results_dir(parser, args):
    """--results as an absolute path, after refusing counts below 1 in one line."""
    if args.jobs < 1 or args.threads < 1:
        parser.error("--jobs and --threads must be at least 1")
    return Path(args.results) if Path(args.results).is_absolute() else ROOT / args.results


def stale(folder, args):
    """The settings a finished run was trained with that differ from those `args` ask for: {name: (was, now)}."""
    saved = json.loads((folder / "config.json").read_text())
    asked = dict(zip(args[1::2], args[2::2]))  # --flag value pairs
    return {k[2:]: (saved.get(k[2:]), v) for k, v in asked.items()
            if k != "--out" and str(saved.get(k[2:])) != v}


def train(folder, args, *, extra, threads):
    """Run one example as its own process, its lines prefixed by the run's name; returns its exit code."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    with subprocess.Popen([sys.executable, *args, *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as process:
        for line in process.stdout:
            with _print_lock:
                print(f"[{folder.name}] {line}", end="", flush=True)
    return process.returncode


def train_missing(parser, args, runs):
    """With --list, print each run as finished, stale or to train, with its command, and return None.
    Otherwise train the runs without a finished folder (and, with --retrain_stale, the stale ones;
    without it a stale run ends everything in one line naming what moved), --jobs at a time, each
    with --device; returns the names of the runs that failed."""
    todo, refused = [], []
    for folder, cmd in runs:
        finished = (folder / "summary.json").exists()
        moved = stale(folder, cmd) if finished else {}
        if args.list:
            print(f"{'finished' if finished and not moved else 'stale' if moved else 'to train':9} "
                  f"python {' '.join(cmd)}")
        elif finished and moved and not args.retrain_stale:
            refused.append(f"{folder} ({', '.join(f'{k} {a} -> {b}' for k, (a, b) in moved.items())})")
        elif not finished or moved:
            todo.append((folder, cmd + (["--overwrite", "True"] if finished else [])))
    if args.list:
        return None
    if refused:
        parser.exit(2, f"error: {len(refused)} finished run(s) were trained with other settings, e.g. {refused[0]}; "
                       "pass --retrain_stale to retrain them\n")
    extra = ["--device", args.device] if args.device else []
    print(f"{len(runs) - len(todo)} of {len(runs)} runs finished; training {len(todo)}, {args.jobs} at a time",
          flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        codes = list(pool.map(lambda run: train(*run, extra=extra, threads=args.threads), todo))
    return [folder.name for (folder, _), code in zip(todo, codes) if code]
