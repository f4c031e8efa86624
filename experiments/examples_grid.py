"""The examples' grid: DNI, cDNI and local losses against backprop in a ResNet and a Transformer.

ResNet-18 on Fashion-MNIST for 10 epochs (examples/resnet_fashion.py) and the character-level GPT
on Debian's fortunes for 3000 steps (examples/char_gpt.py). With one cut in the middle: backprop,
DNI, cDNI (Jaderberg et al. 2016, section 2) and local losses (Decoupled Greedy Learning,
Belilovsky et al. 2020), seeds 0, 1 and 2; with three cuts (one between every pair of residual
groups or blocks): cDNI and local losses, seed 0. Every other setting is the example's default.
Then results/examples.md (examples/table.py).

    python -m experiments.examples_grid --jobs 2          # trains what is missing, then the table
    python -m experiments.examples_grid --list            # the runs, finished or not; trains nothing

Resumable: a finished run folder (results/examples/<name>/summary.json) is skipped; one that was
started and not finished is trained again from its start (the examples keep no checkpoint).
"""
import argparse
import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dnilab.example_runs import run_name

ROOT = Path(__file__).resolve().parent.parent
BUDGETS = {"resnet_fashion": ("epochs", 10), "char_gpt": ("steps", 3000)}
ONE_CUT = [(method, 1, seed) for method in ("backprop", "dni", "cdni", "local") for seed in (0, 1, 2)]
THREE_CUTS = [(method, 3, 0) for method in ("cdni", "local")]
_print_lock = threading.Lock()


def grid(results):
    """[(run folder, argv of its command)], ResNet's runs first."""
    runs = []
    for example, (budget, length) in BUDGETS.items():
        for method, cuts, seed in ONE_CUT + THREE_CUTS:
            folder = Path(results) / run_name(example, method, cuts, seed)
            args = [f"examples/{example}.py", "--method", method, "--seed", str(seed), f"--{budget}", str(length),
                    "--out", str(folder)] + ([] if method == "backprop" else ["--cuts", str(cuts)])
            runs.append((folder, args))
    return runs


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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jobs", type=int, default=1, help="runs at once, one process each (default: 1)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per run (default: 1)")
    p.add_argument("--device", help="device of every run (default: the examples')")
    p.add_argument("--results", default="results/examples", help="where the run folders go")
    p.add_argument("--list", action="store_true", help="list the runs and which are finished; train nothing")
    p.add_argument("--retrain_stale", action="store_true",
                   help="retrain finished runs whose settings differ from those asked for now")
    args = p.parse_args(argv)
    if args.jobs < 1 or args.threads < 1:
        p.error("--jobs and --threads must be at least 1")
    results = Path(args.results) if Path(args.results).is_absolute() else ROOT / args.results
    runs = grid(results)
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
        return
    if refused:
        p.exit(2, f"error: {len(refused)} finished run(s) were trained with other settings, e.g. {refused[0]}; "
                  "pass --retrain_stale to retrain them\n")
    extra = ["--device", args.device] if args.device else []
    print(f"{len(runs) - len(todo)} of {len(runs)} runs finished; training {len(todo)}, {args.jobs} at a time",
          flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        codes = list(pool.map(lambda run: train(*run, extra=extra, threads=args.threads), todo))
    failed = [folder.name for (folder, _), code in zip(todo, codes) if code]
    subprocess.run([sys.executable, "examples/table.py", "--results", str(results),
                    "--out", str(results.parent / "examples.md")], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    print(f"wrote {results.parent / 'examples.md'}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
