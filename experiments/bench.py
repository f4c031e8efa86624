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
Time to a validation accuracy, rather than samples per second, is measured apart:
`python -m experiments.time_to_accuracy` (it reads the 1F1B rows of bench.json).

Workers are started with torchrun (`python -m torch.distributed.run`) on 127.0.0.1, one
thread each (--threads). Workloads are interleaved over --rounds rounds, and every figure
is the median with its min-max, because the machine may be shared: the load average is
recorded beside the figures.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from dnilab.cli import OneLineParser
from dnilab.config import Config
from dni.errors import DNIError
from dnilab.runs import write_json, write_text
from experiments.bench_accuracy import DEFAULT_ACCURACY_PIPELINING, accuracy_runs, pipelining_accuracy
from experiments.bench_pipelining import PIPELINING, pipelining_rows, pipelining_worker
from experiments.bench_table import goals, markdown
from experiments.bench_workloads import BENCH_MODELS, data_path, launch, pipeline_worker, single_worker

# The workloads `launch` starts, by --worker: `python -m experiments.bench --worker NAME` runs one.
WORKERS = {"single": single_worker, "pipeline": pipeline_worker, "pipelining": pipelining_worker,
           "pipelining_accuracy": pipelining_accuracy, "data": data_path}


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


if __name__ == "__main__":
    from dnilab.cli import main_guard
    main_guard(main)
