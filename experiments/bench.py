"""Throughput of update unlocking: is the DNI pipeline faster than locked backprop on the same workers?

    python -m experiments.bench                        # writes results/bench.json and results/bench.md
    python -m experiments.bench --rounds 1 --steps 20 --accuracy_epochs 0   # a quick look

Measures, in one run on one machine (samples per second of training steps only, after
warm-up; every workload in its own process, so its peak RSS is its own):
1. single-process backprop using all cores;
2. model-parallel locked backprop on K workers (`dnilab.pipeline`, method backprop);
3. the DNI pipeline on K workers, plain and conditioned (cDNI);
4. PyTorch's own pipeline parallelism, `torch.distributed.pipelining` (PipelineStage with
   ScheduleGPipe and Schedule1F1B), on the same stages and partition as 2. and K workers, the
   batch cut into --microbatches micro-batches (BatchNorm then normalises each micro-batch alone);
5. sequential DNI and cDNI in one process (`dni_step`) vs backprop in one process;
6. the data path: batches cut from tensors (`dnilab.data.batches`) vs torchvision's per-sample
   DataLoader with ToTensor (the seed's way);
and, unless --accuracy_epochs 0, the test accuracy of `main.py` sequential DNI vs the same
run pipelined on K workers (same seed, same epochs), and vs backprop under the schedules of
--accuracy_pipelining after the same samples. The markdown ends with where the DNI pipeline
wins and where it loses, read off the measured numbers.

Workers are started with torchrun (`python -m torch.distributed.run`) on 127.0.0.1, one
thread each (--threads). Workloads are interleaved over --rounds rounds, and every figure
is the median with its min-max, because the machine may be shared: the load average is
recorded beside the figures.
"""
import argparse
import contextlib
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from dnilab.cli import OneLineParser
from dnilab.config import Config
from dnilab.data import batches, load_data, num_batches
from dni.errors import DNIError
from dni.stages import DNINet, backprop_step, dni_step
from dni.synthesizers import make_synthesizer
from dnilab.runs import write_json, write_text
from dnilab.parts import Optimizers, build_net, evaluate, load_run_data, set_seed
from dnilab.partition import balanced_partition, stage_costs
from dnilab.pipeline import init_workers
from dnilab.worker import PipelineWorker, held_by, release_others_of, share_of_data

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- models

def _block(n_in, n_out):
    return [nn.Linear(n_in, n_out), nn.BatchNorm1d(n_out), nn.ReLU()]


def wide_net(*, method, conditioned):
    """Two stages cut at a 256-wide activation, 1024-wide inner layers, a linear synthesizer:
    784-1024-256 | 256-1024-640-10. Balanced by measured time (the time-blocked column), not by
    multiply-adds: worker 0 also runs the synthesizer and cuts the image batches, so worker 1
    gets more units than equal multiply-adds would give it."""
    stages = nn.ModuleList([nn.Sequential(nn.Flatten(), *_block(784, 1024), *_block(1024, 256)),
                            nn.Sequential(*_block(256, 1024), *_block(1024, 640), nn.Linear(640, 10))])
    synthesizers = None
    if method == "dni":
        synthesizers = nn.ModuleList([make_synthesizer((256,), context_features=10 if conditioned else 0,
                                                       hidden_layers=0)])
    return DNINet(stages=stages, synthesizers=synthesizers, conditioned=conditioned)


def repo_mlp_net(*, method, conditioned):
    """main.py's default MLP, with main.py's default synthesizers."""
    return build_net(Config(method=method, conditioned=conditioned), (1, 28, 28), 10)


_DEFAULT, _DEFAULT_C = Config(), Config(conditioned=True)
BENCH_MODELS = {"wide": (wide_net, "2 stages 784-1024-256 | 256-1024-640-10, linear synthesizer"),
          "mlp": (repo_mlp_net, f"main.py's default mlp: {_DEFAULT.depth + 1} stages of {_DEFAULT.hidden}, "
                                f"synthesizers with {_DEFAULT.synth_layers} hidden layers (cDNI: "
                                f"{_DEFAULT_C.synth_layers})")}


def make_net(model, method, conditioned):
    torch.manual_seed(0)
    return BENCH_MODELS[model][0](method=method, conditioned=conditioned)


def endless(x, y, batch_size, generator):
    while True:
        yield from batches(x, y, batch_size, generator)


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ---------------------------------------------------------------- workloads (each in its own process)

def single_worker(args):
    """One process, `args.threads` threads: backprop_step or dni_step on every batch."""
    torch.set_num_threads(args.threads)
    data = load_data("mnist", args.data_dir)
    net = make_net(args.model, args.method, args.conditioned)
    optimizers = Optimizers(net, Config(method=args.method, conditioned=args.conditioned, schedule="constant"), 1)
    source = endless(data.train_x, data.train_y, args.batch_size, torch.Generator().manual_seed(0))

    def train(steps):
        for _, (x, y) in zip(range(steps), source):
            if args.method == "dni":
                dni_step(net, optimizers.stages, optimizers.synthesizers, x, y)
            else:
                backprop_step(net, optimizers.stages, x, y)

    train(args.warmup)
    start = time.perf_counter()
    train(args.steps)
    seconds = time.perf_counter() - start
    return {"samples_per_s": args.steps * args.batch_size / seconds, "peak_rss_mb": [peak_rss_mb()],
            "held": [held_by(net, optimizers.stages + optimizers.synthesizers, data)]}


def pipeline_worker(args):
    """One of the workers torchrun started: PipelineWorker on its balanced share of the net."""
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    rank, world, _ = init_workers(torch.device("cpu"), timeout_s=120)
    data = load_data("mnist", args.data_dir, images=rank == 0)
    net = make_net(args.model, args.method, args.conditioned)
    parts = balanced_partition(stage_costs(net, data.in_shape), world)
    data = share_of_data(data, rank=rank, world=world, conditioned=args.conditioned)
    optimizers = Optimizers(net, Config(method=args.method, conditioned=args.conditioned, schedule="constant"), 1,
                            owned=parts[rank])
    worker = PipelineWorker(net=net, optimizers=optimizers, parts=parts, rank=rank, method=args.method,
                            in_shape=data.in_shape, batch_size=args.batch_size, max_in_flight=args.max_in_flight,
                            release_others=True)
    x = data.train_x if rank == 0 else data.train_y  # only worker 0 reads images
    source = endless(x, data.train_y, args.batch_size, torch.Generator().manual_seed(0))
    worker.train_epoch(source, args.warmup)
    dist.barrier()
    start = time.perf_counter()
    log = worker.train_epoch(source, args.steps)
    dist.barrier()  # every worker done, every gradient back
    seconds = time.perf_counter() - start
    mine = (peak_rss_mb(), log["waited_s"] / log["seconds"], worker.held_bytes(data))
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    dist.destroy_process_group()
    if rank != 0:
        return None
    return {"samples_per_s": args.steps * args.batch_size / seconds, "peak_rss_mb": [g[0] for g in gathered],
            "waiting": [g[1] for g in gathered], "partition": [[p.start, p.stop] for p in parts],
            "held": [g[2] for g in gathered]}


# ---------------------------------------------------------------- torch.distributed.pipelining

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


def pipelining_accuracy(args):
    """One of the workers torchrun started: train main.py's default mlp with `--method` (gpipe | 1f1b)
    over `--n_microbatches` micro-batches exactly as the accuracy runs' main.py does (its Config with
    method backprop, lr ACCURACY_LR, --accuracy_epochs, seed --seeds[0]: the same validation split,
    initial stages, batch order, Adam and cosine schedule), then the test accuracy of the assembled net."""
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    rank, world, _ = init_workers(torch.device("cpu"), timeout_s=120)
    config = accuracy_config(args, method="backprop", seed=args.seeds[0])
    set_seed(config.seed)  # the order of dnilab.train.run: seed, data, net, optimizers, batch order
    data = load_run_data(config, torch.device("cpu"))
    net = build_net(config, data.in_shape, data.num_classes)
    parts = balanced_partition(stage_costs(net, data.in_shape), world)
    steps_per_epoch = num_batches(len(data.train_x), config.batch_size)
    optimizers = Optimizers(net, config, config.num_epochs * steps_per_epoch)
    order = torch.Generator().manual_seed(config.seed)
    worker = TorchPipelineWorker(net=net, optimizers=optimizers, parts=parts, rank=rank, schedule=args.method,
                                 microbatches=args.n_microbatches)
    seconds, loss = 0.0, None
    for epoch in range(config.num_epochs):
        dist.barrier()
        start = time.perf_counter()
        for x, y in batches(data.train_x, data.train_y, config.batch_size, order):
            loss = worker.step(x, y)
            optimizers.step_schedules()
        dist.barrier()
        seconds += time.perf_counter() - start  # training time only, as main.py's summary
        if worker.last and not torch.isfinite(torch.tensor(loss)):
            raise DNIError(f"pipelining accuracy run: loss {loss} after epoch {epoch + 1}")
    states = [None] * world
    dist.all_gather_object(states, {k: v for k, v in net.state_dict().items()
                                    if k.split(".")[0] == "stages" and int(k.split(".")[1]) in worker.part})
    dist.destroy_process_group()
    if rank != 0:
        return None
    net.load_state_dict({k: v for state in states for k, v in state.items()})
    return {"test_acc": evaluate(net, data.test_x, data.test_y), "seconds": round(seconds, 2),
            "settings": config.to_dict(), "partition": [[p.start, p.stop] for p in parts]}


def data_path(args):
    """Samples/s of the two ways to draw `--data_batches` training batches, one thread each
    (the DataLoader's per-sample work is single-threaded Python; num_workers=0 as in the seed)."""
    from torchvision import datasets, transforms
    torch.set_num_threads(args.threads)
    data = load_data("mnist", args.data_dir)
    n = args.data_batches

    def tensors():
        for _, (x, y) in zip(range(n), endless(data.train_x, data.train_y, args.batch_size,
                                                torch.Generator().manual_seed(0))):
            pass

    loader = torch.utils.data.DataLoader(
        datasets.MNIST(args.data_dir, train=True, transform=transforms.ToTensor()),
        batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))

    def dataloader():
        for _, (x, y) in zip(range(n), loader):
            pass

    out = {}
    for name, fn in (("tensors", tensors), ("dataloader", dataloader)):
        fn()  # warm-up
        start = time.perf_counter()
        fn()
        out[name] = n * args.batch_size / (time.perf_counter() - start)
    return out


WORKERS = {"single": single_worker, "pipeline": pipeline_worker, "pipelining": pipelining_worker,
           "pipelining_accuracy": pipelining_accuracy, "data": data_path}


# ---------------------------------------------------------------- the driver

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, worker, model, method, conditioned, workers, threads, tmp, microbatches=1, extra=()):
    """Run one workload in fresh processes; returns its result dict."""
    result = Path(tempfile.mkstemp(suffix=".json", dir=tmp)[1])
    flags = ["--worker", worker, "--model", model, "--method", method, "--conditioned", str(conditioned),
             "--threads", str(threads), "--steps", str(args.steps), "--warmup", str(args.warmup),
             "--batch_size", str(args.batch_size), "--max_in_flight", str(args.max_in_flight),
             "--n_microbatches", str(microbatches), "--data_dir", args.data_dir,
             "--data_batches", str(args.data_batches), "--result", str(result), *extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT), GLOO_SOCKET_IFNAME="lo")
    if worker in ("pipeline", "pipelining", "pipelining_accuracy"):
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(workers),
                   "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "experiments.bench", *flags]
    else:
        command = [sys.executable, "-m", "experiments.bench", *flags]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise DNIError(f"benchmark workload {worker}/{model}/{method} failed: {' | '.join(tail)}")
    return json.loads(result.read_text())


# The accuracy runs' stage lr: at 10 epochs the FCN learns better at 1e-3 than at main.py's 3e-4,
# which suits its 60 epochs (dnilab/presets.py).
ACCURACY_LR = 1e-3
# The torch.distributed.pipelining accuracy runs: backprop whatever the schedule; GPipe and 1F1B
# accumulate the same micro-batch gradients in the same order, and only the micro-batch count
# changes the maths (BatchNorm's statistics), so one schedule at every count covers them.
DEFAULT_ACCURACY_PIPELINING = [("1f1b", 2), ("1f1b", 4), ("1f1b", 8)]


# What the torch.distributed.pipelining accuracy runs share with main.py's DNI runs (config.json).
SAME_AS_MAIN = ("model_type", "preset", "dataset", "val_size", "num_epochs", "batch_size", "lr", "schedule",
                "depth", "hidden", "seed")


def accuracy_config(args, *, method, seed):
    """The Config main.py builds from the accuracy runs' flags (see `accuracy_runs`), under `method`."""
    return Config(model_type="mlp", method=method, lr=ACCURACY_LR, num_epochs=args.accuracy_epochs, seed=seed,
                  data_dir=args.data_dir, plot=False)


def accuracy_runs(args, tmp):
    """main.py sequential DNI vs the same run pipelined on K workers, and each schedule of
    --accuracy_pipelining (backprop under torch.distributed.pipelining, the same samples): test
    accuracy per seed. One thread per process, so `seconds` compare 1 core with K cores."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    out = []
    for seed in args.seeds:
        common = ["--model_type", "mlp", "--lr", str(ACCURACY_LR), "--num_epochs", str(args.accuracy_epochs),
                  "--seed", str(seed), "--plot", "False", "--data_dir", args.data_dir]
        row = {"seed": seed}
        for name in ("sequential", "pipeline"):
            # Kept beside bench.md (thin it before committing: python -m experiments.thin): every
            # accuracy the table prints has its run folder.
            run_dir = Path(args.out) / "bench" / f"{name}_s{seed}"
            common_here = common + ["--overwrite", "True"]
            command = [sys.executable, "main.py", *common_here, "--out", str(run_dir)]
            if name == "pipeline":
                command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.workers),
                           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                           "main.py", *common_here, "--out", str(run_dir), "--pipeline", "True"]
            done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=3600)
            if done.returncode != 0:
                raise DNIError(f"accuracy run {name} failed: {done.stderr.strip().splitlines()[-1:]}")
            summary = json.loads((run_dir / "summary.json").read_text())
            settings = json.loads((run_dir / "config.json").read_text())
            row[name] = {"test_acc": summary["test_acc"], "seconds": summary["seconds"], "run": str(run_dir)}
            row.setdefault("settings", []).append({k: v for k, v in settings.items() if k not in ("out", "pipeline")})
        if row["settings"][0] != row["settings"][1]:  # the tree is shared: defaults may change between runs
            raise DNIError(f"accuracy runs of seed {seed} ran with different settings; run the benchmark again")
        row["settings"] = row["settings"][0]
        row["pipelining"] = {}
        for schedule, n in args.accuracy_pipelining:
            got = launch(args, "pipelining_accuracy", "mlp", schedule, False, args.workers, 1, tmp, microbatches=n,
                         extra=["--seeds", str(seed), "--accuracy_epochs", str(args.accuracy_epochs)])
            differ = [k for k in SAME_AS_MAIN if got["settings"][k] != row["settings"][k]]
            if differ:
                raise DNIError(f"the {PIPELINING[schedule]} accuracy run of seed {seed} differs from main.py's "
                               f"in {', '.join(differ)}; run the benchmark again")
            kept = Path(args.out) / "bench" / f"{schedule}_m{n}_s{seed}.json"  # no run folder: its result
            kept.parent.mkdir(parents=True, exist_ok=True)
            kept.write_text(json.dumps(got, indent=2) + "\n")
            row["pipelining"][f"{schedule}_m{n}"] = {"test_acc": got["test_acc"], "seconds": got["seconds"],
                                                     "run": str(kept)}
        out.append(row)
        print(f"accuracy seed {seed}: sequential {row['sequential']['test_acc']:.4f} "
              f"pipeline {row['pipeline']['test_acc']:.4f} "
              + " ".join(f"{k} {v['test_acc']:.4f}" for k, v in row["pipelining"].items()), flush=True)
    return out


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def spread(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "all": values}


def _counts(text):
    """'2,4,8' -> [2, 4, 8]: micro-batch counts, each >= 1."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected micro-batch counts >= 1, got {text!r}")
    return values


def _schedules_flag(text):
    """'1f1b:4,gpipe:2' -> [("1f1b", 4), ("gpipe", 2)]; '' -> []."""
    out = []
    for item in filter(None, text.split(",")):
        schedule, _, n = item.partition(":")
        if schedule not in PIPELINING or not n.isdigit() or int(n) < 1:
            raise argparse.ArgumentTypeError(f"expected schedule:micro-batches with a schedule of "
                                             f"{', '.join(PIPELINING)}, got {item!r}")
        out.append((schedule, int(n)))
    return out


def pipelining_rows(args):
    """(key, schedule, micro-batches) of the torch.distributed.pipelining rows. 1F1B needs at least as
    many micro-batches as stages (workers), so smaller counts are left out of its rows."""
    return [(f"{schedule}_m{n}_K", schedule, n) for schedule in PIPELINING for n in args.microbatches
            if schedule != "1f1b" or n >= args.workers]


def main(argv=None):
    parser = OneLineParser(prog="python -m experiments.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)  # internal: one workload
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="wide", choices=list(BENCH_MODELS), help=argparse.SUPPRESS)
    parser.add_argument("--method", default="dni", help=argparse.SUPPRESS)
    parser.add_argument("--conditioned", default="False", help=argparse.SUPPRESS)
    parser.add_argument("--n_microbatches", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--models", default="wide,mlp", help="models to time, of: " + ", ".join(BENCH_MODELS))
    parser.add_argument("--workers", type=int, default=2, help="K, the workers of the pipeline")
    parser.add_argument("--threads", type=int, default=1, help="threads per pipeline worker")
    parser.add_argument("--steps", type=int, default=60, help="timed training steps per workload")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=3, help="repetitions, interleaved")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--max_in_flight", type=int, default=Config.__dataclass_fields__["max_in_flight"].default,
                        help="batches in flight per pipeline worker (default: as main.py)")
    parser.add_argument("--microbatches", type=_counts, default=[2, 4, 8],
                        help="micro-batch counts of the torch.distributed.pipelining rows, GPipe and 1F1B "
                             "(default: 2,4,8)")
    parser.add_argument("--data_batches", type=int, default=100, help="batches timed on the data path")
    parser.add_argument("--accuracy_epochs", type=int, default=10, help="epochs of the accuracy runs (0: skip)")
    parser.add_argument("--accuracy_pipelining", type=_schedules_flag, default=DEFAULT_ACCURACY_PIPELINING,
                        help="torch.distributed.pipelining schedules of the accuracy runs, as schedule:micro-batches "
                             "(schedule of: " + ", ".join(PIPELINING) + "; default: "
                             + ",".join(f"{s}:{n}" for s, n in DEFAULT_ACCURACY_PIPELINING) + "); empty: none")
    parser.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0])
    parser.add_argument("--data_dir", default="data")
    parser.add_argument("--out", default="results", help="where bench.json and bench.md go")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per workload before giving up")
    args = parser.parse_args(argv)
    args.conditioned = args.conditioned.lower() == "true"
    for n in args.microbatches + [n for _, n in args.accuracy_pipelining]:
        if args.batch_size % n:  # unequal micro-batches would weigh their examples unequally
            parser.error(f"{n} micro-batches do not cut a batch of {args.batch_size} into equal parts")
    for schedule, n in args.accuracy_pipelining:
        if schedule == "1f1b" and n < args.workers:
            parser.error(f"--accuracy_pipelining 1f1b:{n}: 1F1B needs at least as many micro-batches as the "
                         f"{args.workers} workers")

    if args.worker:  # inside a workload process
        result = WORKERS[args.worker](args)
        if result is not None:
            Path(args.result).write_text(json.dumps(result))
        if args.worker in ("pipeline", "pipelining", "pipelining_accuracy"):  # see dnilab.train.main: gloo's threads
            sys.stdout.flush()  # can abort the interpreter's teardown after the work is done
            os._exit(0)
        return

    cores = os.cpu_count()
    models = args.models.split(",")
    for model in models:
        if model not in BENCH_MODELS:
            raise DNIError(f"unknown model {model!r}; choose from {', '.join(BENCH_MODELS)}")
    K, k_threads = args.workers, args.threads
    # (key, worker, model, method, conditioned, processes, threads per process, micro-batches)
    workloads = []
    for model in models:
        workloads += [
            (f"{model}/backprop_1proc", "single", model, "backprop", False, 1, cores, 1),
            (f"{model}/backprop_1thread", "single", model, "backprop", False, 1, 1, 1),
            (f"{model}/locked_backprop_K", "pipeline", model, "backprop", False, K, k_threads, 1),
            (f"{model}/dni_pipeline_K", "pipeline", model, "dni", False, K, k_threads, 1),
            (f"{model}/cdni_pipeline_K", "pipeline", model, "dni", True, K, k_threads, 1),
            (f"{model}/dni_1proc", "single", model, "dni", False, 1, cores, 1),
            (f"{model}/dni_1thread", "single", model, "dni", False, 1, 1, 1),
            (f"{model}/cdni_1proc", "single", model, "dni", True, 1, cores, 1),
        ]
        workloads += [(f"{model}/{key}", "pipelining", model, schedule, False, K, k_threads, n)
                      for key, schedule, n in pipelining_rows(args)]
    load_before = os.getloadavg()
    started = time.time()
    raw = {key: [] for key, *_ in workloads}
    rss, holds = {}, {}
    extra, waiting = {}, {}  # partitions; per round, the fraction of time each worker was blocked
    data_runs = []
    with tempfile.TemporaryDirectory(prefix="dni_bench_") as tmp:
        for round_ in range(args.rounds):
            for key, worker, model, method, conditioned, procs, threads, n in workloads:
                out = launch(args, worker, model, method, conditioned, procs, threads, tmp, microbatches=n)
                raw[key].append(out["samples_per_s"])
                rss[key] = max(rss.get(key, [0]), out["peak_rss_mb"], key=max)
                holds[key] = out.get("held")  # the same every round: what the workload keeps
                if "partition" in out:
                    extra[key] = out["partition"]
                    waiting.setdefault(key, []).append(out["waiting"])
                print(f"round {round_ + 1} {key:28s} {out['samples_per_s']:9.0f} samples/s", flush=True)
            data_runs.append(launch(args, "data", "wide", "dni", False, 1, 1, tmp))
        accuracy = accuracy_runs(args, tmp) if args.accuracy_epochs > 0 else []
    load_after = os.getloadavg()

    result = {
        "hardware": {"cpu": cpu_name(), "cores": cores, "machine": platform.machine(),
                     "torch": torch.__version__, "python": platform.python_version(),
                     "load_average_before": load_before, "load_average_after": load_after},
        "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "result", "model", "method",
                                                                        "conditioned")},
        "command": "python -m experiments.bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "wall_seconds": round(time.time() - started, 1),
        "throughput": {key: spread(v) for key, v in raw.items()},
        "peak_rss_mb": rss, "held_bytes": holds, "partitions": extra,
        "waiting": {key: [statistics.median(r[w] for r in rounds) for w in range(len(rounds[0]))]
                    for key, rounds in waiting.items()},
        "data_path": {name: spread([r[name] for r in data_runs]) for name in ("tensors", "dataloader")},
        "accuracy": accuracy,
    }
    result["goals"] = goals(result, models, args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    write_json(Path(args.out) / "bench.json", result)
    table = markdown(result, models, args)
    write_text(Path(args.out) / "bench.md", table)
    print(table)


def _median(result, key):
    return result["throughput"][key]["median"]


def goals(result, models, args):
    """The pipeline's targets, each with the measured value and whether it is met."""
    out = []
    K = args.workers
    if "wide" in models:
        pipe = _median(result, "wide/dni_pipeline_K")
        out.append({"goal": f"DNI pipeline >= 1.9x locked model-parallel backprop (wide, K={K})",
                    "value": pipe / _median(result, "wide/locked_backprop_K"), "target": 1.9})
        out.append({"goal": f"DNI pipeline >= 0.95 of its ceiling, {K} one-thread sequential DNI processes (wide)",
                    "value": pipe / (K * _median(result, "wide/dni_1thread")), "target": 0.95})
        out.append({"goal": "DNI pipeline >= 1.1x single-process backprop on all cores (wide)",
                    "value": pipe / _median(result, "wide/backprop_1proc"), "target": 1.1})
    for model in models:
        workers, single = (result.get("held_bytes", {}).get(f"{model}/{key}") for key in ("dni_pipeline_K", "dni_1thread"))
        if workers and single:
            total = sum(sum(h.values()) for h in workers) / sum(single[0].values())
            out.append({"goal": f"DNI pipeline workers hold one process's parameters, optimizer state and data between "
                                f"them, nothing twice ({model}: their sum over the single process's)",
                        "value": total, "target": 1.001, "lower_is_better": True, "unit": "x",
                        "digits": 4})
    for row in result["accuracy"]:
        diff = 100 * abs(row["pipeline"]["test_acc"] - row["sequential"]["test_acc"])
        out.append({"goal": f"pipeline test accuracy within 0.3 point of sequential DNI (mlp, seed {row['seed']}, "
                            f"{args.accuracy_epochs} epochs)", "value": diff, "target": 0.3, "lower_is_better": True})
    data = result["data_path"]
    out.append({"goal": "data path: tensor batches >= 4x torchvision DataLoader + ToTensor",
                "value": data["tensors"]["median"] / data["dataloader"]["median"], "target": 4.0})
    for model in models:
        match = equal_memory_1f1b(result, model, args)
        if match:
            key, n = match
            out.append({"goal": f"DNI pipeline vs 1F1B at equal memory ({model}, K={args.workers}; 1F1B with {n} "
                                f"micro-batches, the count whose peak RSS, {_total_rss(result, key):.0f} MB over its "
                                f"{args.workers} processes, is closest to the DNI pipeline's "
                                f"{_total_rss(result, f'{model}/dni_pipeline_K'):.0f} MB)",
                        "value": _median(result, f"{model}/dni_pipeline_K") / _median(result, key), "target": 1.0})
    for goal in out:
        lower = goal.get("lower_is_better")
        if goal["target"] is None:
            goal["met"] = None
        else:
            goal["met"] = goal["value"] <= goal["target"] if lower else goal["value"] >= goal["target"]
    return out


def _total_rss(result, key):
    return sum(result["peak_rss_mb"][key])


def equal_memory_1f1b(result, model, args):
    """(key, micro-batches) of the 1F1B row whose peak RSS summed over its processes is closest to
    the DNI pipeline's; None without 1F1B rows."""
    rows = [(f"{model}/{key}", n) for key, schedule, n in pipelining_rows(args) if schedule == "1f1b"]
    if not rows:
        return None
    dni = _total_rss(result, f"{model}/dni_pipeline_K")
    return min(rows, key=lambda row: abs(_total_rss(result, row[0]) - dni))


def _verdict(dni, other):
    """How the DNI pipeline's samples/s (a `spread`) compare with another row's: a win or a loss
    only when the min-max ranges of the rounds do not overlap."""
    if dni["min"] > other["max"]:
        return "wins"
    if dni["max"] < other["min"]:
        return "loses"
    return "level (ranges overlap)"


def wins_and_losses(result, models, args, names):
    """Markdown lines: every comparison of the DNI pipeline with a baseline, with its verdict read off
    the measured numbers, then one sentence listing the wins and the losses."""
    lines = ["## where the DNI pipeline wins and where it loses", "",
             "| model | DNI pipeline against | measured | DNI |", "|---|---|---|---|"]
    verdicts = {}  # "wins" | "loses" | "level": {against: [models]}

    def add(model, against, measured, verdict, why=""):
        shown = f"**{verdict}**" if verdict in ("wins", "loses") else verdict
        lines.append(f"| {model} | {against}{f' ({why})' if why else ''} | {measured} | {shown} |")
        verdicts.setdefault(verdict.split(" ")[0], {}).setdefault(against, []).append(model)

    for model in models:
        dni = result["throughput"][f"{model}/dni_pipeline_K"]
        against = {"locked_backprop_K": "", "backprop_1proc": ""}  # row -> why it is compared
        torch_rows = [key for key, _, _ in pipelining_rows(args)]
        if torch_rows:
            fastest = max(torch_rows, key=lambda key: _median(result, f"{model}/{key}"))
            against[fastest] = "the fastest torch.distributed.pipelining row"
        match = equal_memory_1f1b(result, model, args)
        if match:
            key = match[0].split("/", 1)[1]
            against[key] = ", ".join(filter(None, [against.get(key), "1F1B at equal memory"]))
        for key, why in against.items():
            other = result["throughput"][f"{model}/{key}"]
            add(model, names[key], f"{dni['median'] / other['median']:.2f}x the samples/s", _verdict(dni, other), why)
    by_key = {}
    for row in result["accuracy"]:
        for key, run in row.get("pipelining", {}).items():
            by_key.setdefault(key, []).append(100 * (row["pipeline"]["test_acc"] - run["test_acc"]))
    for key, diffs in by_key.items():
        schedule, n = key.split("_m")
        diff = statistics.mean(diffs)
        add("mlp", f"backprop under {PIPELINING[schedule]}, {n} micro-batches: test accuracy after the same "
                   f"{args.accuracy_epochs} epochs", f"{diff:+.2f} points", "wins" if diff > 0 else "loses"
            if diff < 0 else "level", f"mean of {len(diffs)} seed{'s' if len(diffs) > 1 else ''}")
    lines.append("")
    said = {"wins": "The DNI pipeline wins against", "loses": "It loses against",
            "level": "It is level, within the spread of the rounds, with"}
    sentences = []
    for verdict, opening in said.items():
        items = verdicts.get(verdict, {})
        if items:
            sentences.append(f"{opening} " + "; ".join(f"{against} ({', '.join(models)})"
                                                       for against, models in items.items()) + ".")
    lines += [" ".join(sentences), ""]
    return lines


def markdown(result, models, args):
    hw = result["hardware"]
    lines = [f"# experiments.bench: update unlocking on {hw['cores']} CPU cores",
             "",
             f"`{result['command']}`: {hw['cpu']}, {hw['cores']} cores, torch {hw['torch']}, Python {hw['python']}; "
             f"load average {hw['load_average_before'][0]:.1f} before, {hw['load_average_after'][0]:.1f} after "
             f"(the machine is shared). Batch {args.batch_size}, {args.warmup} warm-up + {args.steps} timed steps, "
             f"median [min-max] of {args.rounds} interleaved rounds, each workload in fresh processes. "
             f"K = {args.workers} workers x {args.threads} thread each; data path on 1 thread.",
             ""]
    K = args.workers
    names = {"backprop_1proc": f"backprop, 1 process x {hw['cores']} threads",
             "backprop_1thread": "backprop, 1 process x 1 thread",
             "locked_backprop_K": f"locked model-parallel backprop, K={K}",
             "dni_pipeline_K": f"DNI pipeline, K={K}", "cdni_pipeline_K": f"cDNI pipeline, K={K}",
             "dni_1proc": f"DNI sequential, 1 process x {hw['cores']} threads",
             "dni_1thread": "DNI sequential, 1 process x 1 thread",
             "cdni_1proc": f"cDNI sequential, 1 process x {hw['cores']} threads"}
    names.update({key: f"torch.distributed.pipelining {PIPELINING[schedule]}, K={K}, {n} micro-batches of "
                       f"{args.batch_size // n}" for key, schedule, n in pipelining_rows(args)})
    for model in models:
        locked, single = _median(result, f"{model}/locked_backprop_K"), _median(result, f"{model}/backprop_1proc")
        part = result["partitions"].get(f"{model}/dni_pipeline_K")
        lines += [f"## {model}: {BENCH_MODELS[model][1]}" + (f"; partition {part}" if part else ""), "",
                  f"| workload | samples/s | vs locked | vs 1-proc backprop ({hw['cores']} threads) | "
                  "peak RSS MB (per process) | held MB: parameters + optimizer + data (per process) | "
                  "time blocked (per worker) |",
                  "|---|---|---|---|---|---|---|"]
        for suffix, name in names.items():
            t = result["throughput"][f"{model}/{suffix}"]
            rss = ", ".join(f"{v:.0f}" for v in result["peak_rss_mb"][f"{model}/{suffix}"])
            blocked = ", ".join(f"{100 * v:.0f}%" for v in result["waiting"].get(f"{model}/{suffix}", []))
            holds = ", ".join(" + ".join(f"{h[kind] / 2**20:.1f}" for kind in ("parameters", "optimizer", "data"))
                              for h in result.get("held_bytes", {}).get(f"{model}/{suffix}") or [])
            lines.append(f"| {name} | {t['median']:.0f} [{t['min']:.0f}-{t['max']:.0f}] | "
                         f"{t['median'] / locked:.2f}x | {t['median'] / single:.2f}x | {rss} | {holds or '-'} | "
                         f"{blocked or '-'} |")
        lines.append("")
    if pipelining_rows(args):
        skipped = [n for n in args.microbatches if n < K]
        lines += ["The torch.distributed.pipelining rows run PyTorch's own pipeline schedules (PipelineStage, "
                  "ScheduleGPipe, Schedule1F1B) on the locked rows' stages and partition, with their Adam per "
                  f"stage and the mean cross-entropy on the last stage: each batch of {args.batch_size} is cut "
                  "into n micro-batches, whose gradients are accumulated and averaged before one step. Unlike "
                  "every other row, BatchNorm there normalises each micro-batch by its own statistics (and "
                  f"updates its running statistics once per micro-batch), not the whole batch of {args.batch_size}. "
                  "Their time blocked is the time spent in the schedule's waits for sends and receives."
                  + (f" 1F1B needs at least K = {K} micro-batches, so it has no row for "
                     f"{', '.join(map(str, skipped))}." if skipped else ""), ""]
    data = result["data_path"]
    lines += ["## data path (MNIST, batches of %d)" % args.batch_size, "",
              "| way | samples/s | ratio |", "|---|---|---|",
              f"| dnilab.data.batches (tensor indexing) | {data['tensors']['median']:.0f} | "
              f"{data['tensors']['median'] / data['dataloader']['median']:.1f}x |",
              f"| DataLoader(MNIST, ToTensor), per sample | {data['dataloader']['median']:.0f} | 1.0x |", ""]
    if result["accuracy"]:
        torch_runs = list(result["accuracy"][0].get("pipelining", {}))
        torch_names = [f"backprop, {PIPELINING[key.split('_m')[0]]} K={K}, {key.split('_m')[1]} micro-batches"
                       for key in torch_runs]
        lines += [f"## accuracy after the same number of samples: main.py --model_type mlp --lr {ACCURACY_LR}, "
                  f"{args.accuracy_epochs} epochs", "",
                  "| seed | sequential DNI | DNI pipeline K=%d | difference (points) |" % K
                  + "".join(f" {name} |" for name in torch_names),
                  "|---|---|---|---|" + "---|" * len(torch_runs)]
        for row in result["accuracy"]:
            s, p = row["sequential"]["test_acc"], row["pipeline"]["test_acc"]
            lines.append(f"| {row['seed']} | {100 * s:.2f}% ({row['sequential']['seconds']:.0f}s) | "
                         f"{100 * p:.2f}% ({row['pipeline']['seconds']:.0f}s) | {100 * (p - s):+.2f} |"
                         + "".join(f" {100 * row['pipelining'][key]['test_acc']:.2f}% "
                                   f"({row['pipelining'][key]['seconds']:.0f}s) |" for key in torch_runs))
        kept = [r["run"] for row in result["accuracy"] for r in (row["sequential"], row["pipeline"],
                                                                   *row["pipelining"].values()) if "run" in r]
        lines += ["", ("Run folders behind these accuracies: " + ", ".join(kept) + ".") if kept else
                  "The run folders behind these accuracies were not kept (made before the benchmark kept them)."]
        lines.append("")
        if torch_runs:
            counts = {}  # schedule -> micro-batch counts run
            for key in torch_runs:
                schedule, n = key.split("_m")
                counts.setdefault(schedule, []).append(n)
            runs = "; ".join(f"{PIPELINING[schedule]} at {', '.join(ns)} micro-batches"
                             for schedule, ns in counts.items())
            lines += ["Every column: the test accuracy after the same samples (the same validation split, seed, "
                      "batch order and epochs, the same stages' learning rate and schedule) and the seconds of "
                      "training, 1 thread per process. The torch.distributed.pipelining columns are backprop "
                      f"under {runs}."
                      + ("" if "gpipe" in counts or "1f1b" not in counts else
                         " GPipe is not run for accuracy: it accumulates the same micro-batch gradients as 1F1B, "
                         "in the same order, so it trains the same net (tests/test_bench_pipelining.py checks both "
                         "against one oracle).")
                      + " The micro-batch count changes the maths only through BatchNorm, which normalises each "
                      "micro-batch by its own statistics.", ""]
    lines += wins_and_losses(result, models, args, names)
    lines += ["## goals", "", "| goal | measured | met |", "|---|---|---|"]
    for goal in result["goals"]:
        unit = goal.get("unit", " points" if goal.get("lower_is_better") else "x")
        met = "-" if goal["met"] is None else "yes" if goal["met"] else "**no**"
        lines.append(f"| {goal['goal']} | {goal['value']:.{goal.get('digits', 2)}f}{unit} | {met} |")
    if "wide" in models:
        pipe, one = _median(result, "wide/dni_pipeline_K"), _median(result, "wide/backprop_1thread")
        ceiling = K * _median(result, "wide/dni_1thread")  # K workers, each as fast as DNI alone on one thread
        lines += ["", f"For reference (wide): DNI pipeline / single-process backprop on 1 thread = {pipe / one:.2f}x. "
                  f"The pipeline's ceiling, K x sequential DNI on 1 thread, is {ceiling / one:.2f}x one-thread "
                  f"and {ceiling / _median(result, 'wide/backprop_1proc'):.2f}x {hw['cores']}-thread backprop; "
                  f"the pipeline reached {100 * pipe / ceiling:.0f}% of it. "
                  "Multi-threaded runs slow down sharply when other jobs hold the cores (threads wait for "
                  "each other at every operation), so read the all-cores rows with the load average above."]
    for model in models:
        match = equal_memory_1f1b(result, model, args)
        if match:
            ratio = _median(result, f"{model}/dni_pipeline_K") / _median(result, match[0])
            totals = [_total_rss(result, f"{model}/{key}") for key, schedule, _ in pipelining_rows(args)
                      if schedule == "1f1b"]
            lines += ["", f"DNI pipeline vs 1F1B at equal memory: {ratio:.2f}x ({model}; 1F1B with {match[1]} "
                          "micro-batches, the count whose peak RSS summed over its processes is closest to the "
                          f"DNI pipeline's {_total_rss(result, f'{model}/dni_pipeline_K'):.0f} MB; the 1F1B rows "
                          f"span {min(totals):.0f}-{max(totals):.0f} MB)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    from dnilab.cli import main_guard
    main_guard(main)
