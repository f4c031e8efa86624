"""Every results table, with the command that rebuilds it from the run folders without training.

    python -m experiments.rebuild            # rebuild each into a scratch copy of results/, compare
    python -m experiments.rebuild --list     # the tables and their commands

Each command is run as typed, from a scratch folder holding a copy of results/ (so `results/...`
paths in it are the copy's), with this checkout on PYTHONPATH; its table must come out byte for
byte as committed. Tables that measure (results/api_speed.md, results/bench.md: time;
results/sg_optimizers.md: a training probe without run folders) are measured again, not rebuilt,
and are not listed.
"""
import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

TABLE1 = "python -m experiments.table1"
SEARCH = "python -m experiments.search"
RNN = "python -m experiments.recurrent_table --table_only True"
REBUILDS = {
    "results/table1.md": f"{TABLE1} --table_only",
    "results/fashion_table1.md": f"{TABLE1} --dataset fashion_mnist --table_only",
    "results/table1_preset_paper.md": f"{TABLE1} --preset paper --models mlp --methods backprop dni cdni --table_only",
    "results/cnn20/table1.md": f"{TABLE1} --models cnn --methods backprop cdni --epochs 20 --results results/cnn20 "
                               "--table_only",
    "results/fcn60/table1.md": f"{TABLE1} --models mlp --layers 3 4 --methods backprop dni --epochs 60 "
                               "--results results/fcn60 --table_only",
    "results/fashion_presplit/fashion_table1.md": f"{TABLE1} --dataset fashion_mnist --models cnn "
                                                  "--results results/fashion_presplit --table_only",
    "results/fcn_label_map/table1.md": f"{TABLE1} --models mlp --methods cdni --results results/fcn_label_map "
                                       "--table_only",
    "results/search.md": f"{SEARCH} --methods dni cdni --synth_layers 0 1 --synth_widths 1024 2048 "
                         "--sg_lrs 1e-3 3e-3 5e-3 1e-2 --lrs 1e-3 --epochs 10 --table_only",
    "results/search_cnn.md": f"{SEARCH} --model_type cnn --methods cdni --synth_layers 0 1 --sg_lrs 3e-4 1e-3 3e-3 "
                             "--lrs 1e-2 --epochs 10 --table_only",
    "results/stage_search_mlp.md": "python -m experiments.stage_search --model_type mlp --table_only",
    "results/stage_search_cnn.md": "python -m experiments.stage_search --model_type cnn --table_only",
    "results/cost_model/cost_model.md": "python -m experiments.cost_model --results results/cost_model --table_only",
    "results/deviations.md": "python -m experiments.deviations --table_only",
    "results/published.md": "python -m experiments.published",
    "results/examples.md": "python examples/table.py",
    "results/examples_search.md": "python -m experiments.examples_search --table_only",
    "results/rnn_table.md": f"{RNN}",
    "results/rnn_table_N5.md": f"{RNN} --length 5 --steps 8000 --stagger 0 --sg_factor 0.1 --hidden 64",
    "results/rnn_table_f0.3.md": f"{RNN} --sg_factor 0.3",
    "results/rnn_table_f0.5.md": f"{RNN} --sg_factor 0.5",
    "results/rnn_table_f1.md": f"{RNN} --sg_factor 1",
    "results/rnn_table_s100.md": f"{RNN} --first_seed 100 --dni_only True --sg_factor 0.1",
    "results/rnn_table_f0.3_s100.md": f"{RNN} --first_seed 100 --dni_only True --sg_factor 0.3",
    "results/rnn_table_f0.5_s100.md": f"{RNN} --first_seed 100 --dni_only True --sg_factor 0.5",
    "results/rnn_table_f1_s100.md": f"{RNN} --first_seed 100 --dni_only True --sg_factor 1",
    "results/rnn_factor_choice.md": "python -m experiments.recurrent_table --first_seed 100 --choose 0.1,0.3,0.5,1",
    "results/unlock.md": "python -m experiments.unlock_experiments plot --name unlock",
    "results/unlock_long.md": "python -m experiments.unlock_experiments plot --name unlock_long",
    "results/update_prob.md": "python -m experiments.unlock_experiments plot --name update_prob",
    "results/update_prob_long.md": "python -m experiments.unlock_experiments plot --name update_prob_long",
}


def scratch_copy(dest):
    """A copy of results/ under `dest`, the folder the commands run in."""
    shutil.copytree(ROOT / "results", dest / "results")
    return dest


def rebuild(table, where, timeout=600):
    """Run `table`'s command in `where` (a scratch folder); returns (exit code, output tail)."""
    argv = shlex.split(REBUILDS[table])
    argv[0] = sys.executable
    if argv[1].endswith(".py"):
        argv[1] = str(ROOT / argv[1])
    env = dict(os.environ, PYTHONPATH=str(ROOT), MPLBACKEND="Agg")
    done = subprocess.run(argv, cwd=where, env=env, capture_output=True, text=True, timeout=timeout)
    return done.returncode, (done.stdout + done.stderr)[-1500:]


def differences(where):
    """{table: reason} of every table that does not rebuild byte for byte."""
    found = {}
    for table in REBUILDS:
        if not (ROOT / table).exists():
            continue
        code, tail = rebuild(table, where)
        if code:
            found[table] = f"exit {code}: {tail.strip().splitlines()[-1] if tail.strip() else ''}"
        elif (where / table).read_bytes() != (ROOT / table).read_bytes():
            found[table] = "rebuilt differently"
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m experiments.rebuild", description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print each table and its command")
    parser.add_argument("tables", nargs="*", help="only these (default: all)")
    args = parser.parse_args(argv)
    if args.list:
        for table, command in REBUILDS.items():
            print(f"{table}: {command}")
        return 0
    unknown = [t for t in args.tables if t not in REBUILDS]
    if unknown:
        parser.exit(2, f"python -m experiments.rebuild: no rebuild command for {unknown[0]}\n")
    with tempfile.TemporaryDirectory() as tmp:
        where = scratch_copy(Path(tmp))
        bad = 0
        for table in args.tables or REBUILDS:
            if not (ROOT / table).exists():
                continue
            code, tail = rebuild(table, where)
            same = not code and (where / table).read_bytes() == (ROOT / table).read_bytes()
            bad += not same
            print(f"{'same' if same else 'DIFFERS' if not code else f'FAILED (exit {code})'}: {table}", flush=True)
            if not same:
                subprocess.run(["diff", str(ROOT / table), str(where / table)]) if not code else print(tail)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
