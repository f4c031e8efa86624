"""The one training loop: backprop, DNI or local losses, MLP or CNN, CPU or CUDA, in one process or pipelined.

`loop` runs the epochs with either step function: `Sequential` (this process trains every
stage) or `dnilab.pipeline.Pipelined` (one torchrun worker of several); `run(config)` picks
one. It trains, evaluates after every epoch and writes a run folder (`dnilab.runs`):
config.json, command.txt, env.json, metrics.jsonl (a line per step and per epoch),
summary.json, checkpoint.pt and the PNG plots (see `dnilab.plots`).

Runs can be trusted: bad input stops before anything is written; a
non-finite loss stops the run at that step, keeping the metrics so far and the
last good checkpoint; SIGINT/SIGTERM save a checkpoint between two steps and end
the run with exit code 130/143; `--resume RUN_DIR` continues it from there and ends
with the same parameters and metrics, bit for bit on CPU, as a run never stopped.
"""
import argparse
import contextlib
import itertools
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch
from tqdm import tqdm

from dnilab.cli import build_parser, main_guard, parse_config
from dnilab.config import Config
from dnilab.data import batches, load_data, num_batches
from dni.errors import DNIError
from dnilab.parts import Optimizers, build_net, check_finite, evaluate_splits, load_run_data, pick_device, set_seed
from dnilab.runs import (MetricsFile, announce, check_batches, check_resumable, epoch_record, finish_run, kept_metrics,
                         load_checkpoint, mean_aux_loss, mean_sg_loss, prepare_run_dir, record_environment,
                         record_resume, restore, resume_config, rng_states, save_checkpoint, set_rng_states,
                         step_record, write_text)
from dnilab.steps import make_train_step


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped the run after it saved a checkpoint; the exit code is 128 + signal."""

    def __init__(self, signum, step, run_dir):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint saved; "
                         f"continue with --resume {run_dir}")
        self.exit_code = 128 + signum


class StopFlag:
    """While active, SIGINT and SIGTERM only set `signum`; the loop reads it between steps, so a
    step is never cut in half. A second signal stops at once (KeyboardInterrupt). Not `active`
    (a pipeline worker, whose signals dnilab.pipeline handles), it leaves the handlers alone."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, active=True):
        self.signum, self._previous, self.active = None, {}, active

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        if self.active and threading.current_thread() is threading.main_thread():  # handlers live there only
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)  # None: set outside Python


class Sequential:
    """The sequential step function: this process trains every stage, batch after batch, with the
    update `dnilab.steps` picks. Its pipelined twin, `dnilab.pipeline.Pipelined`, has the same
    methods; `loop` runs either."""

    lead = True  # this process writes the run folder
    resumable = True  # its checkpoints carry the state --resume continues from

    def __init__(self, config, device, build=build_net):
        set_seed(config.seed)
        self.data = load_run_data(config, device, load=load_data)  # looked up here, so a test can swap in tensors
        self.steps_per_epoch = num_batches(len(self.data.train_x), config.batch_size)
        check_batches(self.steps_per_epoch, config, len(self.data.train_x))
        self.net = build(config, self.data.in_shape, self.data.num_classes).to(device)
        self.optimizers = Optimizers(self.net, config, config.num_epochs * self.steps_per_epoch)
        self.train_step = make_train_step(config, self.net, self.optimizers)
        self.config, self.device = config, device

    def start_run_dir(self):
        run_dir = prepare_run_dir(self.config)
        record_environment(run_dir, self.config, self.device)
        return run_dir

    def announce(self, run_dir):
        announce(self.config, self.net, self.device, run_dir)

    def batches(self, order):
        return batches(self.data.train_x, self.data.train_y, self.config.batch_size, order)

    def train_epoch(self, epoch, source, step):
        """The records of the steps on the batches of `source`, each trained as it is asked for
        (a generator), so every step is on disk before the next one trains."""
        for x, y in source:
            out = self.train_step(x, y, step)
            self.optimizers.step_schedules()
            step += 1
            synthesized = bool(out.sg_loss)  # a step with synthesizers logs each one's loss and cosine
            stats = step_record(epoch, step, out.loss.item(), [v.item() for v in out.sg_loss] if synthesized else None,
                                [v.item() for v in out.sg_cos] if synthesized else None,
                                [v.item() for v in out.aux_loss])  # heads' losses (local losses), if any
            stats.update(getattr(out, "extra", {}))  # what only dni.unlock's steps measure
            yield stats

    def epoch_seconds(self, start):
        """The epoch's training time, its steps begun at perf_counter `start`."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def accuracies(self):
        return evaluate_splits(self.net, self.data)

    def together(self, what, fn):
        """Run fn() (the pipeline's runs it on rank 0, and every worker stops on its DNIError)."""
        return fn()

    def checkpointed(self):
        """What checkpoint.pt holds: the net and its optimizers."""
        return self.net, self.optimizers

    def summary_extra(self):
        return {}


def run(config, build=build_net):
    """Train one run as `config` says; returns its summary dict (None on a pipeline worker but rank 0).
    `build(config, in_shape, num_classes)` makes the net (`dnilab.parts.build_net`, the --model_type
    registry's, unless a caller such as a benchmark trains a net of its own in the same loop)."""
    if config.pipeline:  # this process is one worker of a torchrun launch: see dnilab.pipeline
        from dnilab.pipeline import Pipelined, worker_process
        with worker_process(config) as (rank, world, device):
            return loop(config, Pipelined(config, rank=rank, world=world, device=device, build=build), device)
    device = pick_device(config.device)
    checkpoint = None
    if config.resume:  # every check first (bad input writes nothing), the cheap ones before the data
        checkpoint = load_checkpoint(config.resume)
        check_resumable(config, checkpoint, Path(config.resume))
    return loop(config, Sequential(config, device, build), device, checkpoint)


def loop(config, steps, device, checkpoint=None):
    """The epochs of a run, whichever step function `steps` is (`Sequential`, or the pipeline's
    `Pipelined`): each step's record, the epoch line after evaluation, a checkpoint after every
    epoch, the summary last. `checkpoint`: the one a --resume run continues from."""
    net, optimizers, steps_per_epoch = steps.net, steps.optimizers, steps.steps_per_epoch
    order = torch.Generator().manual_seed(config.seed)

    # Where the run stands: next is batch `batch` (0-based) of epoch `epoch`, whose permutation is
    # drawn from `order_state`. A new run starts at the top; a resumed one where its checkpoint left.
    step, state = 0, {"epoch": 1, "batch": 0, "order_state": order.get_state(), "totals": {"loss": 0.0, "sg_loss": 0.0},
                      "seconds": 0.0, "accs": {}, "metrics_lines": 0}
    if config.resume:
        run_dir = Path(config.resume)
        restore(net, optimizers, checkpoint, run_dir)
        if (run_dir / "summary.json").exists():
            print(f"{run_dir} holds a finished run ({checkpoint['step']} steps); nothing to resume")
            return json.loads((run_dir / "summary.json").read_text())
        step, state = checkpoint["step"], checkpoint["resume"]
        metrics_so_far = kept_metrics(run_dir / "metrics.jsonl", state["metrics_lines"])
        set_rng_states(state["rng"], device)
        order.set_state(state["order_state"])
        write_text(run_dir / "metrics.jsonl", metrics_so_far)
        record_resume(run_dir, device, step)
        print(f"resuming {run_dir} at epoch {state['epoch']} step {step}")
    else:
        run_dir = steps.start_run_dir()
    if steps.lead:
        steps.announce(run_dir)

    # accs: the last epoch's {"val_acc", "test_acc"} (checkpoints written before the split held test_acc only)
    seconds, totals = state["seconds"], state["totals"]
    accs = state.get("accs", {"test_acc": state.get("test_acc")})
    saved_step = step if config.resume else None  # the last checkpoint written, for the divergence message

    def save(epoch, batch, order_state, seconds):
        """Checkpoint the run as it stands before batch `batch` of `epoch` (and after `step`)."""
        nonlocal saved_step
        resume = {"resume": {
            "epoch": epoch, "batch": batch, "order_state": order_state, "totals": dict(totals), "seconds": seconds,
            "accs": accs, "metrics_lines": metrics.lines, "rng": rng_states(device)}} if steps.resumable else {}
        save_checkpoint(run_dir / "checkpoint.pt", *steps.checkpointed(), config, epoch - 1, step, **resume)
        saved_step = step

    # A pipeline worker keeps the launcher's signal handling (dnilab.pipeline); only rank 0 writes.
    with StopFlag(active=steps.resumable) as stop, \
            (MetricsFile(run_dir, lines=state["metrics_lines"]) if steps.lead else contextlib.nullcontext()) as metrics:
        for epoch in range(state["epoch"], config.num_epochs + 1):
            net.train()
            done = state["batch"] if epoch == state["epoch"] else 0  # batches of this epoch already trained
            epoch_order, start = order.get_state(), time.perf_counter()  # the permutation is drawn from here
            source = itertools.islice(steps.batches(order), done, None)
            bar = tqdm(source, total=steps_per_epoch, initial=done, desc=f"epoch {epoch}", leave=False,
                       disable=None if steps.lead else True, mininterval=1.0)
            records = steps.train_epoch(epoch, bar, step)  # the pipeline's has trained the epoch by now

            def write_epoch():
                nonlocal step, seconds, totals, accs
                for batch, stats in enumerate(records, start=done + 1):
                    step = stats["step"]
                    try:
                        check_finite(stats, step)
                    except DNIError as e:  # stop here; the files on disk are those of the last good step
                        kept = f"checkpoint of step {saved_step}" if saved_step is not None else "no checkpoint yet"
                        raise DNIError(f"{e}; {run_dir} keeps the metrics to step {step - 1} and {kept}") from None
                    metrics.write(stats)  # flushed: a run killed outright still leaves every finished step on disk
                    totals["loss"] += stats["loss"]
                    totals["sg_loss"] += mean_sg_loss(stats)
                    if "aux_loss" in stats:  # local losses: the epoch line reports the heads' mean too
                        totals["aux_loss"] = totals.get("aux_loss", 0.0) + mean_aux_loss(stats)
                    bar.set_postfix(loss=f"{stats['loss']:.4f}", refresh=False)
                    if stop.signum:  # SIGINT/SIGTERM came during this step: save, then end the run
                        bar.close()
                        save(epoch, batch, epoch_order, seconds + time.perf_counter() - start)
                        raise Interrupted(stop.signum, step, run_dir)
                seconds += steps.epoch_seconds(start)  # training time only: evaluation is not timed
                accs = steps.accuracies()
                line = epoch_record(epoch, step, totals, steps_per_epoch, accs, seconds)
                metrics.write(line)
                totals = {"loss": 0.0, "sg_loss": 0.0}
                save(epoch + 1, 0, order.get_state(), seconds)
                if stop.signum:  # it came during evaluation: the checkpoint just written is where to resume
                    raise Interrupted(stop.signum, step, run_dir)

            steps.together(f"finishing epoch {epoch}", write_epoch)

    if not steps.lead:
        return None
    summary = finish_run(run_dir, config, device, accs=accs, step=step, seconds=seconds, **steps.summary_extra())
    if config.plot:
        from dnilab.plots import plot_run  # matplotlib only for a run that draws
        plot_run(run_dir)
    return summary


def given_flags(argv, **parser_kwargs):
    """The flags typed in `argv`, without the defaults of those not typed."""
    parser = build_parser(Config, **parser_kwargs)
    for action in parser._actions:  # a flag not typed then leaves no attribute at all
        action.default = argparse.SUPPRESS
    return vars(parser.parse_args(argv))


def main(argv=None, *, prog, description, **defaults):
    """The command line of main.py, mlp.py and cnn.py: parse flags, train; exit 2 on bad input,
    130/143 after SIGINT/SIGTERM (checkpoint saved)."""
    config = parse_config(Config, argv, prog=prog, description=description, defaults=defaults)
    if config.resume:  # the run's own settings, then this script's defaults and the flags typed now
        given = given_flags(argv, prog=prog, description=description, defaults=defaults)
        config = main_guard(resume_config, config.resume, {**defaults, **given})
    try:
        summary = main_guard(run, config)
    except Interrupted as stop:
        print(stop, file=sys.stderr, flush=True)
        sys.exit(stop.exit_code)
    if config.pipeline:  # a finished worker: gloo's threads can abort the interpreter's teardown
        sys.stdout.flush()  # ("terminate called without an active exception"), so leave without it
        sys.stderr.flush()
        os._exit(0)
    return summary
