"""The accuracy rows of `python -m experiments.bench`: main.py's sequential DNI against the same
run pipelined on K workers, and against backprop under torch.distributed.pipelining after the
same samples (`pipelining_accuracy`, a workload of its own)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from dnilab.config import Config
from dnilab.data import batches, num_batches
from dni.errors import DNIError
from dnilab.parts import Optimizers, build_net, evaluate, load_run_data, set_seed
from dnilab.partition import balanced_partition, stage_costs
from dnilab.pipeline import init_workers
from experiments.bench_pipelining import PIPELINING, TorchPipelineWorker
from experiments.bench_workloads import ROOT, free_port, launch

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


