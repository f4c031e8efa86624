"""What every grid of training runs shares (experiments.table1, .search, .deviations): the
budget of a CPU grid, which settings make a finished run stale, training the runs that are
missing (one process each, stoppable with every running run checkpointed), the mean and spread
over seeds, the grid's command-line options, and the candidates and rule of a choice made on
seeds no table reports (experiments.recurrent_table, .timescales_table).
"""
import contextlib
import dataclasses
import json
import multiprocessing
import os
import re
import signal
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import torch

from dni.errors import DNIError
from dnilab.cli import main_guard
from dnilab.config import DEVICES, label_map_acts, saved_settings

# A grid's method, as its tables name it (a column) -> the Config settings that train it.
COLUMNS = {
    "nobprop": dict(method="nobprop"),
    "backprop": dict(method="backprop"),
    "dni": dict(method="dni", conditioned=False),
    "cdni": dict(method="dni", conditioned=True),
    "local": dict(method="local"),  # local auxiliary losses (Decoupled Greedy Learning) at DNI's cuts
}
SEEDS = (0, 1, 2)  # the seeds of every reported cell
# A recurrent table's method (truncated BPTT, DNI, DNI + Aux) -> its column's name.
RECURRENT_NAMES = {"bptt": "BPTT", "dni": "DNI", "dni_aux": "DNI + Aux"}
# The CPU grid's budget: 10 epochs for every run (2,340 iterations of batch 256, about 0.5% of
# the paper's), the same for every method, at each model's stage lr of that budget. main.py's
# defaults train longer (dnilab/presets.py), which the grid cannot afford: with --jobs 2 on 2 cores
# this one (72 runs, about three hours of training) takes about an hour and a half.
CPU_SETTINGS = {"mlp": dict(num_epochs=10, lr=1e-3), "cnn": dict(num_epochs=10, lr=1e-2)}
# Settings that say where a run lives or how it is drawn, not what it computes.
NOT_MATHS = {"device", "use_gpu", "out", "plot", "overwrite", "data_dir", "resume"}
PIPELINE_ONLY = {"partition", "max_in_flight", "worker_timeout"}  # act only when pipeline is True
SYNTH_ONLY = {"sg_lr", "synth_type", "synth_layers", "synth_width", "synth_channels",  # act only when method is dni
              "synth_label_map"}


def short(rate):
    """3e-05 -> 3e-5, 0.001 -> 1e-3: a rate as the pages write it."""
    mantissa, exponent = f"{rate:e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def stale_settings(run_dir, config):
    """The settings a finished run was trained with that differ from `config`'s: {name: (was, now)}."""
    saved = saved_settings(json.loads((run_dir / "config.json").read_text()))
    wanted = config.to_dict()
    ignored = NOT_MATHS | (PIPELINE_ONLY if not (saved.get("pipeline") or wanted.get("pipeline")) else set()) \
        | (SYNTH_ONLY if "dni" not in (saved.get("method"), wanted.get("method")) else set()) \
        | ({"synth_label_map"} if not (label_map_acts(saved) or label_map_acts(wanted)) else set())
    return {k: (saved[k], wanted[k]) for k in sorted(saved.keys() & wanted.keys() - ignored)
            if saved[k] != wanted[k]}


class Stopped(Exception):
    """SIGINT/SIGTERM stopped a run of the table after it saved its checkpoint: (message, exit code)."""


_stop_requested = None  # in pool workers: an Event set once the grid is asked to stop (StopRequest)


def _share_stop_request(event):
    global _stop_requested
    _stop_requested = event


def train_one(config, threads):
    """One run, in a worker process or in this one; returns (name, summary or None, error or None).
    A run to resume whose checkpoint cannot be continued is trained afresh. A run the pool had
    already handed to a worker when the grid was asked to stop does not start."""
    from dnilab.train import Interrupted, run  # imported here so that spawned workers load it themselves
    name = Path(config.out).name
    if _stop_requested is not None and _stop_requested.is_set():
        raise Stopped(f"{name}: not started, the grid was asked to stop", 128 + signal.SIGTERM)
    torch.set_num_threads(threads)
    try:
        if config.resume:
            try:
                return name, run(config), None
            except DNIError as e:
                print(f"{name}: not resumed ({e}); training it afresh", flush=True)
                config = dataclasses.replace(config, resume="")
        return name, run(config), None
    except DNIError as e:  # a diverged run is a result to report, not a reason to stop the grid
        return name, None, str(e)
    except Interrupted as stop:  # its own class does not survive the trip back from a worker
        raise Stopped(str(stop), stop.exit_code) from None


def pending(configs, retrain_stale=False):
    """The configs still to train: those without a finished run folder, and (with
    `retrain_stale`) those whose finished run was trained with other settings; without it,
    such a run stops everything with a message saying which settings moved."""
    todo, stale = [], []
    for config in configs:
        run_dir = Path(config.out)
        if (run_dir / "summary.json").exists():
            diff = stale_settings(run_dir, config)
            if not diff:
                continue
            if not retrain_stale:
                stale.append(f"{run_dir} (" + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in diff.items()) + ")")
                continue
        elif (run_dir / "checkpoint.pt").exists() and (run_dir / "config.json").exists() \
                and not stale_settings(run_dir, config):  # interrupted: continue it from its checkpoint
            config = dataclasses.replace(config, resume=str(run_dir))
        todo.append(config)
    if stale:
        raise DNIError(f"{len(stale)} finished run(s) were trained with other settings, e.g. {stale[0]}; "
                       "pass --retrain_stale to retrain them, or --table_only to tabulate what is there")
    return todo


class StopRequest:
    """While runs live in worker processes, SIGINT and SIGTERM to this process only note the
    signal (raising from a handler could leave a lock of the pool held) and pass SIGTERM on to
    the workers (Ctrl-C reaches them by itself); their runs checkpoint between two steps and end.
    `event` tells the workers to start none of the runs already queued to them."""

    def __init__(self, pool, event):
        self.pool, self.event, self.signum, self._previous = pool, event, None, {}

    def _handle(self, signum, frame):
        self.signum = self.signum or signum
        self.event.set()
        if signum == signal.SIGTERM:
            for process in list(getattr(self.pool, "_processes", {}).values()):
                try:
                    os.kill(process.pid, signal.SIGTERM)
                except OSError:  # already gone
                    pass

    def check(self):
        if self.signum:
            raise Stopped(f"stopped by {signal.Signals(self.signum).name}", 128 + self.signum)

    def __enter__(self):
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def train_all(configs, *, jobs=1, threads=1, log=print, after_each=None):
    """Train `configs`, `jobs` at once (one process each); calls after_each(failures) after every
    run; returns {run name: error} of the runs that stopped with a DNIError (e.g. diverged).
    SIGINT/SIGTERM end it with Stopped once the running runs have saved their checkpoints."""
    failures = {}
    if jobs == 1:
        pool, stop = None, contextlib.nullcontext()
        results = (train_one(config, threads) for config in configs)
    else:
        context = multiprocessing.get_context("spawn")
        event = context.Event()
        pool = ProcessPoolExecutor(jobs, mp_context=context, initializer=_share_stop_request, initargs=(event,))
        stop = StopRequest(pool, event)
        results = (f.result() for f in as_completed([pool.submit(train_one, c, threads) for c in configs]))
    try:
        with stop:
            for n, (name, summary, error) in enumerate(results, 1):
                if error:
                    failures[name] = error
                    log(f"[{n}/{len(configs)}] {name} failed: {error}")
                else:
                    split, acc = ("validation", summary["val_acc"]) if summary.get("val_acc") is not None \
                        else ("test", summary["test_acc"])  # progress only; a grid of splits shows validation
                    log(f"[{n}/{len(configs)}] {name}: {split} error {100 * (1 - acc):.2f}% "
                        f"in {summary['seconds']:.0f} s of training")
                if after_each:
                    after_each(failures)
                if pool is not None:
                    stop.check()
    except BrokenProcessPool:  # a worker killed between two runs
        if pool is not None:
            stop.check()
        raise
    finally:  # stopped or failed: no queued run may start
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return failures


def typed_command(line):
    """A run's command.txt line as typed: 'python -m experiments.table1 ...' for a grid's run (pool
    workers see the module's file path; runs trained when the grids lived in the package dni keep
    'python -m dni.table1 ...'), 'python main.py ...' for a run made by hand (command.txt holds
    the interpreter's full path). A grid run from a second checkout into this one's results/
    (`--results /elsewhere/results`) reads as run here."""
    line = re.sub(r"^\S*/python[\d.]*(?= )", "python", line)
    line = re.sub(r" --results /\S*/results(?= |$)", "", line)  # another checkout's results/: the default's place
    return re.sub(r"(?<= )\S*?\b(experiments|dni)/(\w+)\.py(?= |$)", r"-m \1.\2", line)


MAX_CANDIDATES = 4  # a few candidates: the more there are, the more the winner fits the seeds it was scored on


def choice_candidates(flag, text, noun, *, first_seed, example):
    """The sorted values of a choice flag (`--choose 0.1,0.5`): at most MAX_CANDIDATES numbers,
    each > 0, read from tables of seeds `first_seed`.. , which must not be the reported seeds (0..);
    anything else is refused in one line naming `flag`."""
    if not first_seed:
        raise DNIError(f"{flag} reads tables of seeds the reported table does not use: give --first_seed (e.g. 100)")
    try:
        values = sorted({float(v) for v in text.split(",")})
    except ValueError:
        raise DNIError(f"{flag} takes comma-separated {noun}s, e.g. {example}; got {text!r}") from None
    if not all(0 < v < float("inf") for v in values) or len(values) > MAX_CANDIDATES:
        raise DNIError(f"{flag} takes at most {MAX_CANDIDATES} {noun}s, each > 0; got {text!r}")
    return values


def best_candidate(scores):
    """The candidate of the highest score in {candidate: score}; a tie goes to the smaller candidate."""
    return max(scores, key=lambda v: (scores[v], -v))


def mean_std(values, *, single=None):
    """(mean, sample std) of a list of numbers; the std of fewer than two values is `single`."""
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else single)


def grid_main(fn, *args, **kwargs):
    """main_guard for a grid command: besides a DNIError's one line (exit 2), SIGINT/SIGTERM end it in
    one line with exit code 130/143. Runs in train_all's workers save their checkpoints first; runs
    that keep none (recurrent, char-LM and timescales runs, in `run_pool` workers or in this process)
    end where they are and are trained again by the next call, which reuses every finished one."""
    def stop(signum, frame):
        for child in multiprocessing.active_children():  # run_pool's workers leave the signals to us
            child.terminate()
        raise Stopped(f"stopped by {signal.Signals(signum).name}", 128 + signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return main_guard(fn, *args, **kwargs)
    except Stopped as stopped:
        message, code = stopped.args
        print(f"{message}; rerun the same command to continue", file=sys.stderr, flush=True)
        sys.exit(code)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _leave_signals_to_grid_main():
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C reaches the whole process group: grid_main decides
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # how grid_main ends a worker (a forked one inherits its handler)


def run_pool(jobs, mp_context=None):
    """A process pool for runs that keep no checkpoint, under grid_main: its workers ignore SIGINT,
    and grid_main terminates them on SIGINT/SIGTERM, so a stopped grid prints one line, not a
    traceback from every worker."""
    return ProcessPoolExecutor(jobs, mp_context=mp_context, initializer=_leave_signals_to_grid_main)


def add_grid_options(parser, stem):
    """The options every grid of runs shares (this table, experiments.search): where and how runs train."""
    parser.add_argument("--device", choices=DEVICES, help="device of every run (default: dnilab.config's)")
    parser.add_argument("--data_dir", help="where data sets live (default: dnilab.config's)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per run (default: 1)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, one process each (default: 1)")
    parser.add_argument("--results", default="results",
                        help=f"writes <results>/{stem}.* and <results>/{stem}/ (default: results)")
    parser.add_argument("--table_only", action="store_true", help="train nothing: tabulate the finished runs")
    parser.add_argument("--retrain_stale", action="store_true",
                        help="retrain finished runs whose settings differ from those asked for now")


def check_counts(parser, args, names=("epochs", "threads", "jobs")):
    """One-line error (exit 2) for a count below 1; an unset count (None) means the default."""
    for name in names:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"argument --{name}: must be > 0, got {getattr(args, name)}")
