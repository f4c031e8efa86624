"""Throughput of update unlocking: is the DNI pipeline faster than locked backprop on the same workers?

    python -m experiments.bench                        # writes results/bench.json and results/bench.md
    python -m experiments.bench --rounds 1 --steps 20 --accuracy_epochs 0   # a quick look

Measures, in one run on one machine (samples per second of training steps only, after
warm-up; every workload in its own process, so its peak RSS is its own):
1. single-process backprop using all cores;
2. model-parallel locked backprop on K workers (`dni.pipeline`, method backprop);
3. the DNI pipeline on K workers, plain and conditioned (cDNI);
4. sequential DNI and cDNI in one process (`dni_step`) vs backprop in one process;
5. the data path: batches cut from tensors (`dni.data.batches`) vs torchvision's per-sample
   DataLoader with ToTensor (the seed's way);
and, unless --accuracy_epochs 0, the test accuracy of `main.py` sequential DNI vs the same
run pipelined on K workers (same seed, same epochs).

Workers are started with torchrun (`python -m torch.distributed.run`) on 127.0.0.1, one
thread each (--threads). Workloads are interleaved over --rounds rounds, and every figure
is the median with its min-max, because the machine may be shared: the load average is
recorded beside the figures.
"""
import argparse
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

from dni.config import Config
from dni.data import batches, load_data
from dni.errors import DNIError
from dni.interface import DNINet, backprop_step, dni_step
from dni.synthesizers import make_synthesizer
from dni.runs import write_json, write_text
from dni.parts import Optimizers, build_net

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
MODELS = {"wide": (wide_net, "2 stages 784-1024-256 | 256-1024-640-10, linear synthesizer"),
          "mlp": (repo_mlp_net, f"main.py's default mlp: {_DEFAULT.depth + 1} stages of {_DEFAULT.hidden}, "
                                f"synthesizers with {_DEFAULT.synth_layers} hidden layers (cDNI: "
                                f"{_DEFAULT_C.synth_layers})")}


def make_net(model, method, conditioned):
    torch.manual_seed(0)
    return MODELS[model][0](method=method, conditioned=conditioned)


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
    return {"samples_per_s": args.steps * args.batch_size / seconds, "peak_rss_mb": [peak_rss_mb()]}


def pipeline_worker(args):
    """One of the workers torchrun started: PipelineWorker on its balanced share of the net."""
    import torch.distributed as dist

    from dni.pipeline import PipelineWorker, balanced_partition, init_workers, stage_costs
    torch.set_num_threads(args.threads)
    rank, world, _ = init_workers(torch.device("cpu"), timeout_s=120)
    data = load_data("mnist", args.data_dir)
    net = make_net(args.model, args.method, args.conditioned)
    parts = balanced_partition(stage_costs(net, data.in_shape), world)
    optimizers = Optimizers(net, Config(method=args.method, conditioned=args.conditioned, schedule="constant"), 1)
    worker = PipelineWorker(net=net, optimizers=optimizers, parts=parts, rank=rank, method=args.method,
                            in_shape=data.in_shape, batch_size=args.batch_size, max_in_flight=args.max_in_flight)
    x = data.train_x if rank == 0 else data.train_y  # only worker 0 reads images
    source = endless(x, data.train_y, args.batch_size, torch.Generator().manual_seed(0))
    worker.train_epoch(source, args.warmup)
    dist.barrier()
    start = time.perf_counter()
    log = worker.train_epoch(source, args.steps)
    dist.barrier()  # every worker done, every gradient back
    seconds = time.perf_counter() - start
    mine = (peak_rss_mb(), log["waited_s"] / log["seconds"])
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    dist.destroy_process_group()
    if rank != 0:
        return None
    return {"samples_per_s": args.steps * args.batch_size / seconds, "peak_rss_mb": [g[0] for g in gathered],
            "waiting": [g[1] for g in gathered], "partition": [[p.start, p.stop] for p in parts]}


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


WORKERS = {"single": single_worker, "pipeline": pipeline_worker, "data": data_path}


# ---------------------------------------------------------------- the driver

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, worker, model, method, conditioned, workers, threads, tmp):
    """Run one workload in fresh processes; returns its result dict."""
    result = Path(tempfile.mkstemp(suffix=".json", dir=tmp)[1])
    flags = ["--worker", worker, "--model", model, "--method", method, "--conditioned", str(conditioned),
             "--threads", str(threads), "--steps", str(args.steps), "--warmup", str(args.warmup),
             "--batch_size", str(args.batch_size), "--max_in_flight", str(args.max_in_flight),
             "--data_dir", args.data_dir, "--data_batches", str(args.data_batches), "--result", str(result)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT), GLOO_SOCKET_IFNAME="lo")
    if worker == "pipeline":
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
# which suits its 60 epochs (dni/models.py).
ACCURACY_LR = 1e-3


def accuracy_runs(args, tmp):
    """main.py sequential DNI vs the same run pipelined on K workers: test accuracy per seed.
    One thread per process, so `seconds` compare 1 core with K cores."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    out = []
    for seed in args.seeds:
        common = ["--model_type", "mlp", "--lr", str(ACCURACY_LR), "--num_epochs", str(args.accuracy_epochs),
                  "--seed", str(seed), "--plot", "False", "--data_dir", args.data_dir]
        row = {"seed": seed}
        for name in ("sequential", "pipeline"):
            run_dir = Path(tmp) / f"{name}_{seed}"
            command = [sys.executable, "main.py", *common, "--out", str(run_dir)]
            if name == "pipeline":
                command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.workers),
                           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                           "main.py", *common, "--out", str(run_dir), "--pipeline", "True"]
            done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=3600)
            if done.returncode != 0:
                raise DNIError(f"accuracy run {name} failed: {done.stderr.strip().splitlines()[-1:]}")
            summary = json.loads((run_dir / "summary.json").read_text())
            settings = json.loads((run_dir / "config.json").read_text())
            row[name] = {"test_acc": summary["test_acc"], "seconds": summary["seconds"]}
            row.setdefault("settings", []).append({k: v for k, v in settings.items() if k not in ("out", "pipeline")})
        if row["settings"][0] != row["settings"][1]:  # the tree is shared: defaults may change between runs
            raise DNIError(f"accuracy runs of seed {seed} ran with different settings; run the benchmark again")
        row["settings"] = row["settings"][0]
        out.append(row)
        print(f"accuracy seed {seed}: sequential {row['sequential']['test_acc']:.4f} "
              f"pipeline {row['pipeline']['test_acc']:.4f}", flush=True)
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


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m experiments.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)  # internal: one workload
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="wide", choices=list(MODELS), help=argparse.SUPPRESS)
    parser.add_argument("--method", default="dni", help=argparse.SUPPRESS)
    parser.add_argument("--conditioned", default="False", help=argparse.SUPPRESS)
    parser.add_argument("--models", default="wide,mlp", help="models to time, of: " + ", ".join(MODELS))
    parser.add_argument("--workers", type=int, default=2, help="K, the workers of the pipeline")
    parser.add_argument("--threads", type=int, default=1, help="threads per pipeline worker")
    parser.add_argument("--steps", type=int, default=60, help="timed training steps per workload")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=3, help="repetitions, interleaved")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--max_in_flight", type=int, default=Config.__dataclass_fields__["max_in_flight"].default,
                        help="batches in flight per pipeline worker (default: as main.py)")
    parser.add_argument("--data_batches", type=int, default=100, help="batches timed on the data path")
    parser.add_argument("--accuracy_epochs", type=int, default=10, help="epochs of the accuracy runs (0: skip)")
    parser.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0])
    parser.add_argument("--data_dir", default="data")
    parser.add_argument("--out", default="results", help="where bench.json and bench.md go")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per workload before giving up")
    args = parser.parse_args(argv)
    args.conditioned = args.conditioned.lower() == "true"

    if args.worker:  # inside a workload process
        result = WORKERS[args.worker](args)
        if result is not None:
            Path(args.result).write_text(json.dumps(result))
        return

    cores = os.cpu_count()
    models = args.models.split(",")
    for model in models:
        if model not in MODELS:
            raise DNIError(f"unknown model {model!r}; choose from {', '.join(MODELS)}")
    K, k_threads = args.workers, args.threads
    # (key, worker, model, method, conditioned, processes, threads per process)
    workloads = []
    for model in models:
        workloads += [
            (f"{model}/backprop_1proc", "single", model, "backprop", False, 1, cores),
            (f"{model}/backprop_1thread", "single", model, "backprop", False, 1, 1),
            (f"{model}/locked_backprop_K", "pipeline", model, "backprop", False, K, k_threads),
            (f"{model}/dni_pipeline_K", "pipeline", model, "dni", False, K, k_threads),
            (f"{model}/cdni_pipeline_K", "pipeline", model, "dni", True, K, k_threads),
            (f"{model}/dni_1proc", "single", model, "dni", False, 1, cores),
            (f"{model}/dni_1thread", "single", model, "dni", False, 1, 1),
            (f"{model}/cdni_1proc", "single", model, "dni", True, 1, cores),
        ]
    load_before = os.getloadavg()
    started = time.time()
    raw = {key: [] for key, *_ in workloads}
    rss = {}
    extra, waiting = {}, {}  # partitions; per round, the fraction of time each worker was blocked
    data_runs = []
    with tempfile.TemporaryDirectory(prefix="dni_bench_") as tmp:
        for round_ in range(args.rounds):
            for key, worker, model, method, conditioned, procs, threads in workloads:
                out = launch(args, worker, model, method, conditioned, procs, threads, tmp)
                raw[key].append(out["samples_per_s"])
                rss[key] = max(rss.get(key, [0]), out["peak_rss_mb"], key=max)
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
        "peak_rss_mb": rss, "partitions": extra,
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
    """The targets of issue 4, each with the measured value and whether it is met."""
    out = []
    if "wide" in models:
        pipe = _median(result, "wide/dni_pipeline_K")
        out.append({"goal": f"DNI pipeline >= 1.8x locked model-parallel backprop (wide, K={args.workers})",
                    "value": pipe / _median(result, "wide/locked_backprop_K"), "target": 1.8})
        out.append({"goal": "DNI pipeline >= 1.1x single-process backprop on all cores (wide)",
                    "value": pipe / _median(result, "wide/backprop_1proc"), "target": 1.1})
    for row in result["accuracy"]:
        diff = 100 * abs(row["pipeline"]["test_acc"] - row["sequential"]["test_acc"])
        out.append({"goal": f"pipeline test accuracy within 0.5 point of sequential DNI (mlp, seed {row['seed']}, "
                            f"{args.accuracy_epochs} epochs)", "value": diff, "target": 0.5, "lower_is_better": True})
    data = result["data_path"]
    out.append({"goal": "data path: tensor batches >= 4x torchvision DataLoader + ToTensor",
                "value": data["tensors"]["median"] / data["dataloader"]["median"], "target": 4.0})
    for goal in out:
        lower = goal.get("lower_is_better")
        goal["met"] = goal["value"] <= goal["target"] if lower else goal["value"] >= goal["target"]
    return out


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
    for model in models:
        locked, single = _median(result, f"{model}/locked_backprop_K"), _median(result, f"{model}/backprop_1proc")
        part = result["partitions"].get(f"{model}/dni_pipeline_K")
        lines += [f"## {model}: {MODELS[model][1]}" + (f"; partition {part}" if part else ""), "",
                  f"| workload | samples/s | vs locked | vs 1-proc backprop ({hw['cores']} threads) | "
                  "peak RSS MB (per process) | time blocked (per worker) |",
                  "|---|---|---|---|---|---|"]
        for suffix, name in names.items():
            t = result["throughput"][f"{model}/{suffix}"]
            rss = ", ".join(f"{v:.0f}" for v in result["peak_rss_mb"][f"{model}/{suffix}"])
            blocked = ", ".join(f"{100 * v:.0f}%" for v in result["waiting"].get(f"{model}/{suffix}", []))
            lines.append(f"| {name} | {t['median']:.0f} [{t['min']:.0f}-{t['max']:.0f}] | "
                         f"{t['median'] / locked:.2f}x | {t['median'] / single:.2f}x | {rss} | {blocked or '-'} |")
        lines.append("")
    data = result["data_path"]
    lines += ["## data path (MNIST, batches of %d)" % args.batch_size, "",
              "| way | samples/s | ratio |", "|---|---|---|",
              f"| dni.data.batches (tensor indexing) | {data['tensors']['median']:.0f} | "
              f"{data['tensors']['median'] / data['dataloader']['median']:.1f}x |",
              f"| DataLoader(MNIST, ToTensor), per sample | {data['dataloader']['median']:.0f} | 1.0x |", ""]
    if result["accuracy"]:
        lines += [f"## accuracy: main.py --model_type mlp --lr {ACCURACY_LR}, {args.accuracy_epochs} epochs", "",
                  "| seed | sequential DNI | DNI pipeline K=%d | difference (points) |" % args.workers,
                  "|---|---|---|---|"]
        for row in result["accuracy"]:
            s, p = row["sequential"]["test_acc"], row["pipeline"]["test_acc"]
            lines.append(f"| {row['seed']} | {100 * s:.2f}% ({row['sequential']['seconds']:.0f}s) | "
                         f"{100 * p:.2f}% ({row['pipeline']['seconds']:.0f}s) | {100 * (p - s):+.2f} |")
        lines.append("")
    lines += ["## goals", "", "| goal | measured | met |", "|---|---|---|"]
    for goal in result["goals"]:
        unit = " points" if goal.get("lower_is_better") else "x"
        lines.append(f"| {goal['goal']} | {goal['value']:.2f}{unit} | {'yes' if goal['met'] else '**no**'} |")
    if "wide" in models:
        pipe, one = _median(result, "wide/dni_pipeline_K"), _median(result, "wide/backprop_1thread")
        ceiling = K * _median(result, "wide/dni_1thread")  # K workers, each as fast as DNI alone on one thread
        lines += ["", f"For reference (wide): DNI pipeline / single-process backprop on 1 thread = {pipe / one:.2f}x. "
                  f"The pipeline's ceiling, K x sequential DNI on 1 thread, is {ceiling / one:.2f}x one-thread "
                  f"and {ceiling / _median(result, 'wide/backprop_1proc'):.2f}x {hw['cores']}-thread backprop; "
                  f"the pipeline reached {100 * pipe / ceiling:.0f}% of it. "
                  "Multi-threaded runs slow down sharply when other jobs hold the cores (threads wait for "
                  "each other at every operation), so read the all-cores rows with the load average above."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    from dni.cli import main_guard
    main_guard(main)
