"""The torch.distributed.pipelining baseline of experiments/bench_pipelining.py: real worker processes on
127.0.0.1, gloo, one thread each.

What is checked:
- the bench's workload (1F1B, 2 workers, main.py's mlp cut as the locked rows cut it) trains a
  few MNIST steps with finite losses and reports its speed, memory and time blocked;
- against the oracle, single-process backprop with gradient accumulation over the same micro-batches
  (BatchNorm then also normalises each micro-batch alone): after one step, 1F1B and GPipe leave the
  same parameters and BatchNorm statistics (float32 tolerance). The step is plain SGD, not the
  bench's Adam: a Linear bias before BatchNorm has a true gradient of zero, and Adam's first step
  (about lr times the gradient's sign) would turn its rounding noise into differences of lr;
- the markdown says where the DNI pipeline wins and loses, and the equal-memory 1F1B ratio.
"""
import argparse
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from experiments.bench_pipelining import pipelining_rows
from experiments.bench_table import goals, markdown
from experiments.bench_workloads import launch, make_net

ROOT = Path(__file__).resolve().parent.parent
BATCH, MICROBATCHES, LR = 64, 4, 0.1
PARTS = [(0, 1), (1, 4)]  # main.py's mlp: 4 stages, worker 1 holding three of them

# One step of TorchPipelineWorker per schedule, from the same initial net and batch; each
# worker saves the state of its own stages.
ONE_STEP = f"""
import sys
from types import SimpleNamespace
import torch
import torch.distributed as dist
from experiments.bench_pipelining import TorchPipelineWorker
from experiments.bench_workloads import make_net

torch.set_num_threads(1)
dist.init_process_group("gloo")
rank = dist.get_rank()
parts = [range(*p) for p in {PARTS}]
for schedule in ("1f1b", "gpipe"):
    net = make_net("mlp", "backprop", False)
    optimizers = SimpleNamespace(stages=[torch.optim.SGD(s.parameters(), lr={LR}) for s in net.stages])
    worker = TorchPipelineWorker(net=net, optimizers=optimizers, parts=parts, rank=rank, schedule=schedule,
                                 microbatches={MICROBATCHES})
    torch.manual_seed(1)
    x, y = torch.rand({BATCH}, 1, 28, 28), torch.randint(0, 10, ({BATCH},))
    worker.step(x, y)
    mine = {{k: v for k, v in net.state_dict().items() if int(k.split(".")[1]) in parts[rank]}}
    torch.save(mine, f"{{sys.argv[1]}}/{{schedule}}_{{rank}}.pt")
dist.destroy_process_group()
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def oracle_step():
    """Single-process backprop on the same batch, gradients accumulated over the micro-batches and
    averaged, as torch's schedules do (the sum first, then one division), then one SGD step."""
    net = make_net("mlp", "backprop", False)
    torch.manual_seed(1)
    x, y = torch.rand(BATCH, 1, 28, 28), torch.randint(0, 10, (BATCH,))
    for xm, ym in zip(x.chunk(MICROBATCHES), y.chunk(MICROBATCHES)):  # (16, 1, 28, 28), (16,)
        F.cross_entropy(net(xm), ym).backward()
    for p in net.parameters():
        p.grad.div_(MICROBATCHES)
    torch.optim.SGD(net.parameters(), lr=LR).step()
    return net.state_dict()


def test_one_step_of_1f1b_and_gpipe_is_backprop_with_gradient_accumulation(tmp_path):
    script = tmp_path / "one_step.py"
    script.write_text(ONE_STEP)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(script), str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    expected = oracle_step()
    for schedule in ("1f1b", "gpipe"):
        got = {**torch.load(tmp_path / f"{schedule}_0.pt"), **torch.load(tmp_path / f"{schedule}_1.pt")}
        assert got.keys() == expected.keys()
        for key in expected:  # weights, biases, BatchNorm running statistics and batch counts
            torch.testing.assert_close(got[key], expected[key], msg=lambda m: f"{schedule} {key}: {m}")
    assert not torch.equal(expected["stages.0.1.weight"], make_net("mlp", "backprop", False)
                           .state_dict()["stages.0.1.weight"])  # the step did move the weights


def test_the_bench_workload_trains_with_finite_losses(tmp_path):
    args = argparse.Namespace(steps=4, warmup=1, batch_size=BATCH, max_in_flight=1, data_dir=str(ROOT / "data"),
                              data_batches=1, timeout=120)
    out = launch(args, "pipelining", "mlp", "1f1b", False, 2, 1, str(tmp_path), microbatches=MICROBATCHES)
    assert len(out["losses"]) == 4 and all(math.isfinite(v) for v in out["losses"])
    assert out["losses"][0] < 3.0  # about ln 10 = 2.3 at the start
    assert out["partition"] == [list(p) for p in PARTS]  # the locked rows' cut
    assert out["samples_per_s"] > 0 and len(out["peak_rss_mb"]) == 2
    assert len(out["waiting"]) == 2 and all(0 <= v <= 1 for v in out["waiting"])


def fake_result(args, models):
    """A bench result with made-up numbers: the DNI pipeline 2x locked, the 1F1B rows between."""
    speed = {"backprop_1proc": 9000, "backprop_1thread": 6000, "locked_backprop_K": 5000, "dni_pipeline_K": 10000,
             "cdni_pipeline_K": 9500, "dni_1proc": 8000, "dni_1thread": 5000, "cdni_1proc": 8000}
    rss = {key: [900, 900] if key.endswith("_K") else [900] for key in speed}
    rss["dni_pipeline_K"] = [975, 975]
    for key, schedule, n in pipelining_rows(args):  # 1F1B with 8 micro-batches: the fastest, and
        speed[key] = (4000 if schedule == "1f1b" else 3000) + 1000 * n  # the closest to DNI's memory
        rss[key] = [900 + 10 * n, 900 + 10 * n]
    result = {"hardware": {"cpu": "cpu", "cores": 2, "torch": torch.__version__, "python": "3",
                           "load_average_before": [0.0], "load_average_after": [0.0]},
              "command": "python -m experiments.bench", "partitions": {}, "waiting": {},
              "data_path": {"tensors": {"median": 10.0}, "dataloader": {"median": 1.0}},
              "throughput": {}, "peak_rss_mb": {},
              "accuracy": [{"seed": 0, "sequential": {"test_acc": 0.96, "seconds": 1},
                            "pipeline": {"test_acc": 0.961, "seconds": 1},
                            "pipelining": {"1f1b_m4": {"test_acc": 0.97, "seconds": 1}}}]}
    for model in models:
        for key, value in speed.items():
            result["throughput"][f"{model}/{key}"] = {"median": value, "min": value * 0.99, "max": value * 1.01}
            result["peak_rss_mb"][f"{model}/{key}"] = rss[key]
    return result


def test_the_markdown_says_where_dni_wins_and_loses():
    args = argparse.Namespace(workers=2, threads=1, batch_size=256, warmup=1, steps=1, rounds=1,
                              microbatches=[2, 4, 8], accuracy_epochs=10)
    models = ["wide"]
    assert [key for key, _, _ in pipelining_rows(args)] == [
        "gpipe_m2_K", "gpipe_m4_K", "gpipe_m8_K", "1f1b_m2_K", "1f1b_m4_K", "1f1b_m8_K"]
    result = fake_result(args, models)
    result["goals"] = goals(result, models, args)
    text = markdown(result, models, args)
    assert "| torch.distributed.pipelining 1F1B, K=2, 8 micro-batches of 32 | 12000 [11880-12120] | 2.40x |" in text
    assert "DNI pipeline vs 1F1B at equal memory: 0.83x (wide; 1F1B with 8 micro-batches" in text
    assert "| wide | locked model-parallel backprop, K=2 | 2.00x the samples/s | **wins** |" in text
    assert ("| wide | torch.distributed.pipelining 1F1B, K=2, 8 micro-batches of 32 (the fastest "
            "torch.distributed.pipelining row, 1F1B at equal memory) | 0.83x the samples/s | **loses** |") in text
    assert ("| mlp | backprop under 1F1B, 4 micro-batches: test accuracy after the same 10 epochs (mean of 1 seed) "
            "| -0.90 points | **loses** |") in text
    assert ("The DNI pipeline wins against locked model-parallel backprop, K=2 (wide); backprop, 1 process x 2 "
            "threads (wide). It loses against torch.distributed.pipelining 1F1B, K=2, 8 micro-batches of 32 (wide); "
            "backprop under 1F1B, 4 micro-batches: test accuracy after the same 10 epochs (mlp).") in text
    assert "BatchNorm there normalises each micro-batch by its own statistics" in text
