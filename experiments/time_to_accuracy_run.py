"""One run of `python -m experiments.time_to_accuracy` that main.py cannot make alone: on a
bench net main.py's registry lacks (the wide FCN of experiments.bench_workloads), or trained
by torch's 1F1B (`torch.distributed.pipelining`) instead of main.py's step functions.

    python -m experiments.time_to_accuracy_run --bench_model wide --method backprop --lr 0.001 --out DIR
    torchrun --nproc_per_node 2 -m experiments.time_to_accuracy_run --bench_model wide --method dni --pipeline True ...
    torchrun --nproc_per_node 2 -m experiments.time_to_accuracy_run --n_microbatches 2 --method backprop ...

Every other flag is main.py's. Either way the one training loop, `dnilab.train.loop`, trains,
evaluates after each epoch outside the timed training and writes the run folder, so every
method's folder has main.py's schema: an epoch row per epoch with val_acc and the training
seconds so far (evaluation left out).
"""
import os
import sys
import time

import torch
import torch.distributed as dist

import dnilab.train
from dni.errors import DNIError
from dnilab.cli import OneLineParser, main_guard, parse_config
from dnilab.config import Config
from dnilab.data import batches, load_data, num_batches
from dnilab.parts import Optimizers, build_net, evaluate_splits, load_run_data, set_seed
from dnilab.partition import balanced_partition, describe_partition, stage_costs
from dnilab.pipeline import agree, check_same_settings, start_workers_run_dir, worker_process
from dnilab.runs import announce, check_batches, step_record
from dnilab.transport import collective
from dnilab.worker import assemble
from experiments.bench_pipelining import TorchPipelineWorker
from experiments.bench_workloads import BENCH_MODELS

PROG = "python -m experiments.time_to_accuracy_run"


def net_builder(model):
    """The `build(config, in_shape, num_classes)` that dnilab's loop takes (`dnilab.train.run`):
    main.py's own for 'mlp', else BENCH_MODELS[model]. main.py's registry (dnilab.models) holds
    no wide net, and an experiment adds none to the application."""
    if model == "mlp":
        return build_net
    build = BENCH_MODELS[model][0]

    def build_bench_net(config, in_shape, num_classes):
        if config.method not in ("backprop", "dni", "local"):
            raise DNIError(f"the {model} bench net is built for --method backprop, dni or local, not {config.method}")
        return build(method=config.method, conditioned=config.conditioned)

    return build_bench_net


class TorchPipelined:
    """torch's 1F1B as a step function of `dnilab.train.loop` (the methods of `dnilab.train.Sequential`):
    this worker trains its stages with `TorchPipelineWorker` over a whole epoch, timed between two
    barriers; then rank 0 gathers every worker's stages, losses and optimizer states and evaluates
    the assembled net, untimed. Every worker loads all the data: rank 0 evaluates alone."""

    resumable = False  # as a --pipeline run: its checkpoint holds no resume state

    def __init__(self, config, *, rank, world, microbatches, microbatches_from, build=build_net):
        self.config, self.rank, self.world, self.device = config, rank, world, torch.device("cpu")
        self.lead = rank == 0
        self.microbatches, self.microbatches_from = microbatches, microbatches_from
        check_same_settings(config, rank, world, config.worker_timeout)
        set_seed(config.seed)  # the order of dnilab.train.Sequential: seed, data, net, optimizers
        self.data = load_run_data(config, self.device, load=load_data)
        self.net = build(config, self.data.in_shape, self.data.num_classes)
        self.costs = stage_costs(self.net, self.data.in_shape)
        self.parts = balanced_partition(self.costs, world)
        self.steps_per_epoch = num_batches(len(self.data.train_x), config.batch_size)
        check_batches(self.steps_per_epoch, config, len(self.data.train_x))
        self.optimizers = Optimizers(self.net, config, config.num_epochs * self.steps_per_epoch)
        self.worker = TorchPipelineWorker(net=self.net, optimizers=self.optimizers, parts=self.parts, rank=rank,
                                          schedule="1f1b", microbatches=microbatches)
        self.unbounded = self.logs = self.states = None

    def start_run_dir(self):
        run_dir, self.unbounded = start_workers_run_dir(self.config, self.rank, self.device)
        return run_dir

    def announce(self, run_dir):
        announce(self.config, self.net, self.device, run_dir,
                 workers=f" on {self.world} workers ({describe_partition(self.parts, self.costs)})",
                 backend=f" (torch 1F1B, {self.microbatches} micro-batches)")

    def batches(self, order):
        return batches(self.data.train_x, self.data.train_y, self.config.batch_size, order)

    def _local_state(self):
        """This worker's stages and their optimizers, in `dnilab.worker.PipelineWorker.local_state`'s shape."""
        part = self.worker.part
        return {"net": {k: v for k, v in self.net.state_dict().items()
                        if k.split(".")[0] == "stages" and int(k.split(".")[1]) in part},
                "stages": {i: self.optimizers.stages[i].state_dict() for i in part}, "synthesizers": {},
                "schedules": {("stages", i): self.optimizers.schedules[i].state_dict() for i in part}}

    def train_epoch(self, epoch, source, step):
        """Train on every batch of `source`, then gather on rank 0; returns rank 0's step records."""
        dist.barrier()
        start = time.perf_counter()
        losses = []
        for x, y in source:
            losses.append(self.worker.step(x, y))
            self.optimizers.step_schedules()
        dist.barrier()  # every worker done, every gradient back
        mine = {"seconds": time.perf_counter() - start, "losses": losses if self.worker.last else None,
                "state": self._local_state()}
        self.logs = [None] * self.world if self.lead else None
        with collective(self.rank, f"gathering epoch {epoch}", self.config.worker_timeout):
            dist.gather_object(mine, self.logs, dst=0, group=self.unbounded)
        if not self.lead:
            return ()
        self.states = [log["state"] for log in self.logs]
        self.net.load_state_dict({k: v for state in self.states for k, v in state["net"].items()})
        return (step_record(epoch, step + t + 1, loss) for t, loss in enumerate(self.logs[-1]["losses"]))

    def epoch_seconds(self, start):
        return max(log["seconds"] for log in self.logs)  # the slowest worker's training; no evaluation

    def accuracies(self):
        return evaluate_splits(self.net, self.data)

    def together(self, what, fn):
        return agree(self.rank, self.config.worker_timeout, what, fn, group=self.unbounded)

    def checkpointed(self):
        return assemble(self.net, self.states)

    def summary_extra(self):
        return {"pipelining": {"schedule": "1f1b", "workers": self.world, "microbatches": self.microbatches,
                               "microbatches_from": self.microbatches_from,
                               "partition": [[p.start, p.stop] for p in self.parts]}}


def run_1f1b(config, microbatches, microbatches_from, build=build_net):
    """Train `config` (method backprop, CPU) with torch's 1F1B on the workers torchrun started."""
    if config.method != "backprop" or config.conditioned or config.pipeline or config.resume:
        raise DNIError("--n_microbatches trains --method backprop with torch's 1F1B; drop --pipeline, "
                       "--conditioned and --resume")
    if config.batch_size % microbatches:  # unequal micro-batches would weigh their examples unequally
        raise DNIError(f"{microbatches} micro-batches do not cut a batch of {config.batch_size} into equal parts")
    config.device = "cpu"  # TorchPipelineWorker's stages live on the CPU
    with worker_process(config) as (rank, world, device):
        if microbatches < world:
            raise DNIError(f"1F1B needs at least as many micro-batches as the {world} workers, got {microbatches}")
        return dnilab.train.loop(config, TorchPipelined(config, rank=rank, world=world, microbatches=microbatches,
                                                        microbatches_from=microbatches_from, build=build), device)


def main(argv=None):
    parser = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--bench_model", default="mlp", choices=list(BENCH_MODELS), help="the net to train")
    parser.add_argument("--n_microbatches", type=int, default=0,
                        help="train with torch's 1F1B over this many micro-batches (0: main.py's step functions)")
    parser.add_argument("--n_microbatches_from", default="", help="where the count came from, for summary.json")
    ours, rest = parser.parse_known_args(argv)
    if ours.n_microbatches < 0:
        parser.error(f"--n_microbatches must be >= 0, got {ours.n_microbatches}")
    config = parse_config(Config, rest, prog=PROG, description=__doc__.splitlines()[0])
    build = net_builder(ours.bench_model)
    if ours.n_microbatches:
        summary = main_guard(run_1f1b, config, ours.n_microbatches, ours.n_microbatches_from, build)
    else:
        summary = main_guard(dnilab.train.run, config, build)
    if config.pipeline or ours.n_microbatches:  # see dnilab.train.main: gloo's threads can abort the teardown
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return summary


if __name__ == "__main__":
    main()
