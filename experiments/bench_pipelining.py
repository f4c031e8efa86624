"""The baseline of `python -m experiments.bench` from PyTorch's own pipeline parallelism,
`torch.distributed.pipelining` (GPipe and 1F1B), on the same stages and partition as the
locked backprop rows: the worker, its throughput workload and which rows a run measures."""
import contextlib
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from dnilab.config import Config
from dnilab.data import load_data
from dnilab.parts import Optimizers
from dnilab.partition import balanced_partition, stage_costs
from dnilab.pipeline import init_workers
from dnilab.worker import held_by, release_others_of, share_of_data
from experiments.bench_workloads import endless, make_net, peak_rss_mb

# torch's own pipeline schedules, by the --method that picks them: GPipe runs every micro-batch's
# forward, then every backward; 1F1B alternates one forward and one backward once the pipeline is
# full, so fewer micro-batches' activations are kept at once.
PIPELINING = {"gpipe": "GPipe", "1f1b": "1F1B"}


class TorchPipelineWorker:
    """The stages `parts[rank]` of `net` as one `torch.distributed.pipelining.PipelineStage`, trained
    by torch's GPipe or 1F1B schedule: the same modules and cut as `dnilab.worker.PipelineWorker`'s
    locked backprop, so the two differ only in how the batch flows.

    `step(x, y)` cuts the batch into `microbatches` equal micro-batches, runs the schedule on them
    (the mean cross-entropy of each micro-batch on the last stage; torch sums the micro-batches'
    gradients and divides by their number, so without BatchNorm the gradient is the whole batch's),
    then steps the Adam of every local stage. BatchNorm normalises each micro-batch by its own
    statistics and updates its running statistics once per micro-batch: the maths of gradient
    accumulation over micro-batches, not of one batch of B. `waited_s` counts the seconds spent
    blocked in the schedule's waits on other workers, None where this torch lacks the function
    that every schedule waits in."""

    def __init__(self, *, net, optimizers, parts, rank, schedule, microbatches):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
        self.net, self.optimizers, self.part = net, optimizers, parts[rank]
        self.first, self.last = rank == 0, rank == len(parts) - 1
        module = nn.Sequential(*(net.stages[i] for i in self.part))  # the net's own modules, not copies
        stage = PipelineStage(module, rank, len(parts), torch.device("cpu"))
        kind = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule]
        self.schedule = kind(stage, n_microbatches=microbatches, loss_fn=F.cross_entropy)
        self.waited_s = 0.0 if hasattr(_schedules(), "_wait_batch_p2p") else None

    def step(self, x, y):
        """One training step on the batch (x, y): x is read on the first worker, y on the last.
        Returns the mean of the micro-batches' losses on the last worker, else None."""
        for i in self.part:
            self.optimizers.stages[i].zero_grad(set_to_none=True)
        losses = []
        inputs = (x,) if self.first else ()
        targets = {"target": y, "losses": losses} if self.last else {}
        with self._clocked_waits():
            self.schedule.step(*inputs, **targets, return_outputs=False)
        for i in self.part:
            self.optimizers.stages[i].step()
        return torch.stack(losses).mean().item() if self.last else None

    @contextlib.contextmanager
    def _clocked_waits(self):
        """Time every wait of the schedule: each one goes through the private `_wait_batch_p2p`."""
        if self.waited_s is None:
            yield
            return
        module = _schedules()
        wait = module._wait_batch_p2p

        def clocked(work):
            start = time.perf_counter()
            try:
                return wait(work)
            finally:
                self.waited_s += time.perf_counter() - start

        module._wait_batch_p2p = clocked
        try:
            yield
        finally:
            module._wait_batch_p2p = wait


def _schedules():
    from torch.distributed.pipelining import schedules
    return schedules


def pipelining_worker(args):
    """One of the workers torchrun started: torch.distributed.pipelining on the locked rows' partition,
    schedule `--method` (gpipe | 1f1b) over `--n_microbatches` micro-batches, Adam per stage as they use."""
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    rank, world, _ = init_workers(torch.device("cpu"), timeout_s=120)
    data = load_data("mnist", args.data_dir, images=rank == 0)
    net = make_net(args.model, "backprop", False)
    parts = balanced_partition(stage_costs(net, data.in_shape), world)
    release_others_of(net, parts[rank])
    data = share_of_data(data, rank=rank, world=world, conditioned=False)
    optimizers = Optimizers(net, Config(method="backprop", schedule="constant"), 1, owned=parts[rank])
    worker = TorchPipelineWorker(net=net, optimizers=optimizers, parts=parts, rank=rank, schedule=args.method,
                                 microbatches=args.n_microbatches)
    x = data.train_x if rank == 0 else data.train_y  # only worker 0 reads images
    source = endless(x, data.train_y, args.batch_size, torch.Generator().manual_seed(0))
    for _, (x, y) in zip(range(args.warmup), source):  # the first step also infers the shapes sent
        worker.step(x, y)
    dist.barrier()
    waited = worker.waited_s
    start = time.perf_counter()
    losses = [worker.step(x, y) for _, (x, y) in zip(range(args.steps), source)]
    dist.barrier()  # every worker done, every gradient back
    seconds = time.perf_counter() - start
    blocked = None if waited is None else (worker.waited_s - waited) / seconds
    gathered = [None] * world
    mine = held_by(net, [optimizers.stages[i] for i in parts[rank]], data)
    dist.all_gather_object(gathered, (peak_rss_mb(), blocked, losses if worker.last else None, mine))
    dist.destroy_process_group()
    if rank != 0:
        return None
    out = {"samples_per_s": args.steps * args.batch_size / seconds, "peak_rss_mb": [g[0] for g in gathered],
           "partition": [[p.start, p.stop] for p in parts], "losses": gathered[-1][2],
           "held": [g[3] for g in gathered]}
    if all(g[1] is not None for g in gathered):
        out["waiting"] = [g[1] for g in gathered]
    return out


def pipelining_rows(args):
    """(key, schedule, micro-batches) of the torch.distributed.pipelining rows. 1F1B needs at least as
    many micro-batches as stages (workers), so smaller counts are left out of its rows."""
    return [(f"{schedule}_m{n}_K", schedule, n) for schedule in PIPELINING for n in args.microbatches
            if schedule != "1f1b" or n >= args.workers]

