"""The workloads of `python -m experiments.bench`, each timed in a process of its own: the nets
it times, one-process backprop and DNI, the DNI pipeline and locked backprop on K workers
(`dnilab.pipeline`), the data path; and `launch`, which starts one and reads its result."""
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

from dnilab.config import Config
from dnilab.data import batches, load_data
from dni.errors import DNIError
from dni.local import make_head
from dni.stages import DNINet, backprop_step, dni_step
from dni.synthesizers import make_synthesizer
from dnilab.parts import Optimizers, build_net
from dnilab.partition import balanced_partition, stage_costs
from dnilab.pipeline import init_workers
from dnilab.worker import PipelineWorker, held_by, share_of_data

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- models

def _block(n_in, n_out):
    return [nn.Linear(n_in, n_out), nn.BatchNorm1d(n_out), nn.ReLU()]


def wide_net(*, method, conditioned):
    """Two stages cut at a 256-wide activation, 1024-wide inner layers, a linear synthesizer
    (under local losses, main.py's head at the cut: a linear map to the classes):
    784-1024-256 | 256-1024-640-10. Balanced by measured time (the time-blocked column), not by
    multiply-adds: worker 0 also runs the synthesizer and cuts the image batches, so worker 1
    gets more units than equal multiply-adds would give it."""
    stages = nn.ModuleList([nn.Sequential(nn.Flatten(), *_block(784, 1024), *_block(1024, 256)),
                            nn.Sequential(*_block(256, 1024), *_block(1024, 640), nn.Linear(640, 10))])
    synthesizers = None
    if method == "dni":
        synthesizers = nn.ModuleList([make_synthesizer((256,), context_features=10 if conditioned else 0,
                                                       hidden_layers=0)])
    heads = nn.ModuleList([make_head((256,), 10)]) if method == "local" else None
    return DNINet(stages=stages, synthesizers=synthesizers, conditioned=conditioned, heads=heads)


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


# ---------------------------------------------------------------- launching one

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

