"""The pipelined DNI (dnilab/pipeline.py): real worker processes on 127.0.0.1, gloo, real MNIST.

What is checked:
- 2 workers under torchrun train a small cDNI MLP for 300 steps on MNIST, reach the
  accuracy floor below and write the run folder of a sequential run;
- against the oracle, sequential DNI (`dni_step`) with the same seed: with
  --max_in_flight 1 the pipeline's final parameters and optimizer states equal it; with the
  default 2 batches in flight its test accuracy is within 2 points of it (0.6 measured);
- the locked baseline (model-parallel backprop) ends with exactly mlp.py's parameters;
- a worker killed mid-run makes the other stop, non-zero, within seconds, with one line;
- a non-finite value stops the worker where it appears at that step, and the other with it;
- workers started with different settings refuse to start, naming the setting.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dnilab.config import Config
from dni.errors import DNIError
from dnilab.partition import balanced_partition, parse_partition
from dnilab.train import run

ROOT = Path(__file__).resolve().parent.parent
DATA = str(ROOT / "data")  # dnilab.data.load_data builds MNIST here offline when it is missing
ACCURACY_FLOOR = 0.85  # sequential cDNI reaches 0.90 with these settings after 300 steps
# A small cDNI MLP: 3 stages (784-64 | 64-64 | 64-10), synthesizers with one hidden layer, so
# the auto partition puts a cross-worker boundary and an internal boundary on the two workers.
SMALL = ["--model_type", "mlp", "--depth", "2", "--hidden", "64", "--conditioned", "True",
         "--synth_layers", "1", "--synth_width", "64", "--sg_lr", "1e-3", "--batch_size", "200",
         "--num_epochs", "1", "--val_size", "0", "--data_dir", DATA]  # 300 steps: all 60,000 images


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(**extra):
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", **extra)


def torchrun(args, **popen):
    """main.py under torchrun, 2 workers on this host."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "main.py", *args]
    return subprocess.Popen(command, cwd=ROOT, env=worker_env(), **popen)


def start_workers(args_per_rank, tmp_path):
    """Start main.py once per rank as torchrun would (env://), without the launcher in between,
    so a test can kill one worker and watch what the other does. Returns [(Popen, stdout, stderr)]."""
    port, world, procs = free_port(), len(args_per_rank), []
    for rank, args in enumerate(args_per_rank):
        env = worker_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                         MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        out, err = tmp_path / f"rank{rank}.out", tmp_path / f"rank{rank}.err"
        procs.append((subprocess.Popen([sys.executable, "main.py", *args], cwd=ROOT, env=env,
                                       stdout=open(out, "w"), stderr=open(err, "w")), out, err))
    return procs


def stderr_lines(path):
    return [line for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same settings three ways, at the same time (the machine has few cores): pipelined
    under torchrun (default 2 batches in flight), pipelined with 1 in flight, and sequential
    (one thread, like each worker, so the floating-point sums are the same)."""
    tmp = tmp_path_factory.mktemp("runs")
    pipelined = torchrun([*SMALL, "--pipeline", "True", "--out", str(tmp / "pipeline")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lockstep_args = [*SMALL, "--pipeline", "True", "--max_in_flight", "1", "--plot", "False",
                     "--out", str(tmp / "lockstep")]
    lockstep = start_workers([lockstep_args] * 2, tmp)
    sequential = subprocess.Popen([sys.executable, "main.py", *SMALL, "--plot", "False",
                                   "--out", str(tmp / "sequential")], cwd=ROOT, env=worker_env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = pipelined.communicate(timeout=120)
    assert pipelined.returncode == 0, err[-2000:]
    for p, _, err_path in lockstep:
        assert p.wait(timeout=120) == 0, err_path.read_text()[-2000:]
    _, seq_err = sequential.communicate(timeout=120)
    assert sequential.returncode == 0, seq_err[-2000:]
    return tmp, out


def test_pipeline_learns_mnist_and_writes_the_run_folder(runs):
    tmp, stdout = runs
    run_dir = tmp / "pipeline"
    for name in ("config.json", "command.txt", "env.json", "metrics.jsonl", "summary.json", "checkpoint.pt",
                 "loss.png", "sg_loss.png", "test_acc.png"):
        assert (run_dir / name).exists(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 300 and summary["pipeline"]["workers"] == 2
    assert summary["test_acc"] >= ACCURACY_FLOOR, summary
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if m["kind"] == "step"]
    assert [m["step"] for m in steps] == list(range(1, 301))
    assert all(len(m["sg_loss"]) == 2 and len(m["sg_cos"]) == 2 for m in steps)
    assert lines[-1]["kind"] == "epoch" and lines[-1]["test_acc"] == summary["test_acc"]
    assert "stages on 2 workers" in stdout and "epoch 1 step 300" in stdout


def test_one_batch_in_flight_is_exactly_sequential_dni(runs):
    tmp, _ = runs
    pipe = torch.load(tmp / "lockstep" / "checkpoint.pt", weights_only=False)
    seq = torch.load(tmp / "sequential" / "checkpoint.pt", weights_only=False)
    torch.testing.assert_close(pipe["net"], seq["net"])  # assembled from both workers on rank 0
    torch.testing.assert_close(pipe["optimizers"], seq["optimizers"])
    assert pipe["step"] == seq["step"] == 300


def tensor_bytes(obj):
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def test_each_worker_holds_only_its_share(runs):
    """Parameters and optimizer states split between the workers (their sums are the sequential
    run's); worker 0 holds the images, worker 1 only the labels (cDNI: worker 0 too)."""
    tmp, _ = runs
    held = json.loads((tmp / "lockstep" / "summary.json").read_text())["pipeline"]["held_bytes"]
    seq = torch.load(tmp / "sequential" / "checkpoint.pt", weights_only=False)
    whole = {"parameters": tensor_bytes(seq["net"]),
             "optimizer": tensor_bytes([seq["optimizers"]["stages"], seq["optimizers"]["synthesizers"]])}
    for kind in ("parameters", "optimizer"):
        assert sum(worker[kind] for worker in held) == whole[kind], (kind, held, whole)
        assert all(0 < worker[kind] < whole[kind] for worker in held)
    labels = 8 * (60_000 + 10_000)  # int64, training and test labels (--val_size 0)
    images = 4 * 784 * (60_000 + 10_000)  # float32
    assert 0 <= held[1]["data"] - labels < 64, held  # the images' placeholders hold a number each
    assert held[0]["data"] == labels + images  # and labels for cDNI


def test_pipeline_learns_like_sequential_dni(runs):
    tmp, _ = runs
    pipe = json.loads((tmp / "pipeline" / "summary.json").read_text())
    seq = json.loads((tmp / "sequential" / "summary.json").read_text())
    assert abs(pipe["test_acc"] - seq["test_acc"]) <= 0.02, (pipe["test_acc"], seq["test_acc"])


def test_killed_worker_stops_the_other_with_one_line(tmp_path):
    run_dir = tmp_path / "run"
    args = [*SMALL, "--batch_size", "1000", "--num_epochs", "100", "--pipeline", "True", "--plot", "False",
            "--worker_timeout", "20", "--out", str(run_dir)]
    (p0, out0, err0), (p1, _, _) = start_workers([args, args], tmp_path)
    try:
        deadline = time.monotonic() + 45
        while "epoch 1 step" not in out0.read_text():
            assert time.monotonic() < deadline and p0.poll() is None, err0.read_text()[-2000:]
            time.sleep(0.2)
        p1.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        code = p0.wait(timeout=20)  # far less in practice: the closed connection is seen at once
        assert time.monotonic() - killed < 20
    finally:
        for p in (p0, p1):
            if p.poll() is None:
                p.kill()
    assert code != 0
    lines = stderr_lines(err0)
    # The kill lands in a step (lost worker 1) or in the epoch's closing collective (lost a worker).
    assert len(lines) == 1 and re.match(r"error: worker 0: lost (worker 1|a worker) \(", lines[0]), lines
    # What was written stays: the epochs before the kill are whole, every line parses.
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(m["kind"] == "epoch" for m in metrics)
    assert json.loads((run_dir / "config.json").read_text())["pipeline"] is True


def test_a_non_finite_value_stops_every_worker_at_its_step(tmp_path):
    """An absurd learning rate: the worker where a value first overflows stops at that step (not at
    the end of the epoch), naming its stage; the other stops within seconds; one line each."""
    args = [*SMALL, "--lr", "1e30", "--pipeline", "True", "--plot", "False", "--worker_timeout", "60",
            "--out", str(tmp_path / "run")]
    procs = start_workers([args, args], tmp_path)
    codes = [p.wait(timeout=60) for p, _, _ in procs]
    lines = [stderr_lines(err) for _, _, err in procs]
    assert codes == [2, 2] and all(len(worker_lines) == 1 for worker_lines in lines), lines
    causes = [re.match(r"error: worker (\d): .* of stage (\d) .*is not finite at step (\d+); lower --", worker[0])
              for worker in lines]
    cause = next(c for c in causes if c)
    assert int(cause.group(3)) < 300  # stopped at the step, before the epoch's end (step 300)
    other = lines[1 - int(cause.group(1))][0]
    assert other.startswith(f"error: worker {1 - int(cause.group(1))}: lost worker {cause.group(1)} ("), other
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert metrics == ""  # no epoch ended: nothing half-written


def test_workers_with_different_settings_refuse_to_start(tmp_path):
    args = [*SMALL, "--pipeline", "True", "--out", str(tmp_path / "run")]
    procs = start_workers([args, [*args, "--lr", "0.002"]], tmp_path)
    for p, _, err in procs:
        assert p.wait(timeout=30) == 2
        lines = stderr_lines(err)
        assert len(lines) == 1 and "different settings" in lines[0] and "--lr" in lines[0], lines
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_workers_on_other_commits_refuse_to_start(monkeypatch):
    """Hosts that checked out other commits would train one mixed run: each worker refuses."""
    import dnilab.pipeline
    config = Config()
    theirs = (dnilab.pipeline.config_digest(config.to_dict()), config.to_dict(), "0123456789abcdef")

    def all_gather_object(gathered, mine):  # worker 1 answers from another commit
        gathered[:] = [mine, theirs]
    monkeypatch.setattr(dnilab.pipeline.dist, "all_gather_object", all_gather_object)
    monkeypatch.setattr(dnilab.pipeline, "git_commit", lambda: "fedcba9876543210")
    with pytest.raises(DNIError, match=r"^worker 0: workers run different code \(worker 1 at commit 0123456789ab, "
                                       r"worker 0 at fedcba987654\); check out the same commit"):
        dnilab.pipeline.check_same_settings(config, 0, 2, 5.0)
    monkeypatch.setattr(dnilab.pipeline, "git_commit", lambda: "0123456789abcdef")  # the same commit: no complaint
    dnilab.pipeline.check_same_settings(config, 0, 2, 5.0)


def test_pipeline_without_launcher_says_how_to_launch(monkeypatch):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(DNIError, match="torchrun --nproc_per_node"):
        run(Config(pipeline=True, device="cpu"))


def test_partition_balances_work_and_checks_the_flag():
    assert balanced_partition([4, 1, 1, 1, 1], 2) == [range(0, 1), range(1, 5)]
    assert balanced_partition([1, 1, 1, 1], 2) == [range(0, 2), range(2, 4)]
    assert balanced_partition([1, 1, 1], 3) == [range(0, 1), range(1, 2), range(2, 3)]
    assert parse_partition("1,3", 4, 2) == [range(0, 1), range(1, 4)]
    with pytest.raises(DNIError, match="3 workers but the network has only 2 stages"):
        balanced_partition([1, 1], 3)
    for bad in ("2,1", "a,b", "0,4", "4"):
        with pytest.raises(DNIError, match="--partition"):
            parse_partition(bad, 4, 2)


# The same small MLP under plain backprop: the baseline every "vs locked" ratio of the benchmark rests on.
BACKPROP = ["--model_type", "mlp", "--depth", "2", "--hidden", "64", "--method", "backprop", "--batch_size", "200",
            "--num_epochs", "1", "--val_size", "0", "--plot", "False", "--data_dir", DATA]


def test_locked_pipeline_is_exactly_backprop(tmp_path):
    """Model-parallel backprop on 2 workers (`--pipeline True --method backprop`) ends with the
    parameters and Adam states of the same run in one process (mlp.py's), one thread each."""
    locked = start_workers([[*BACKPROP, "--pipeline", "True", "--out", str(tmp_path / "locked")]] * 2, tmp_path)
    single = subprocess.Popen([sys.executable, "mlp.py", *BACKPROP, "--out", str(tmp_path / "single")], cwd=ROOT,
                              env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for p, _, err_path in locked:
        assert p.wait(timeout=120) == 0, err_path.read_text()[-2000:]
    _, err = single.communicate(timeout=120)
    assert single.returncode == 0, err[-2000:]
    pipe = torch.load(tmp_path / "locked" / "checkpoint.pt", weights_only=False)
    seq = torch.load(tmp_path / "single" / "checkpoint.pt", weights_only=False)
    torch.testing.assert_close(pipe["net"], seq["net"], rtol=0, atol=0)
    torch.testing.assert_close(pipe["optimizers"]["stages"], seq["optimizers"]["stages"], rtol=0, atol=0)
    assert pipe["step"] == seq["step"] == 300
    losses = {name: [m["loss"] for m in map(json.loads, (tmp_path / name / "metrics.jsonl").read_text().splitlines())
                     if m["kind"] == "step"] for name in ("locked", "single")}
    assert losses["locked"] == losses["single"] and len(losses["single"]) == 300
    held = json.loads((tmp_path / "locked" / "summary.json").read_text())["pipeline"]["held_bytes"]
    images, labels = 4 * 784 * 70_000, 8 * 70_000  # float32 images, int64 labels: training and test
    assert 0 <= held[0]["data"] - images < 64 and 0 <= held[1]["data"] - labels < 64, held  # placeholders: one number


def test_a_slow_evaluation_does_not_stop_a_healthy_run(tmp_path):
    """--worker_timeout bounds waiting for a peer's training step, not rank 0's evaluation: here one
    epoch trains 10 steps and then evaluates 60,000 images on a CNN, far longer than the 5 s allowed."""
    args = ["--model_type", "cnn", "--depth", "2", "--channels", "32", "--method", "backprop", "--batch_size", "1000",
            "--num_epochs", "1", "--val_size", "50000", "--worker_timeout", "5", "--plot", "False",
            "--pipeline", "True", "--data_dir", DATA, "--out", str(tmp_path / "run")]
    procs = start_workers([args, args], tmp_path)
    for p, _, err_path in procs:
        assert p.wait(timeout=300) == 0, err_path.read_text()[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 10 and summary["val_acc"] is not None


def test_asking_again_under_frozen_statistics_is_exact():
    """A boundary synthesizer that stepped since it made g_hat(t) is asked again on trigger(t): in
    train mode (batch statistics, as the first time) without moving its running statistics."""
    import copy
    from dni.unlock import frozen_statistics
    from dni.synthesizers import DenseSynthesizer
    torch.manual_seed(0)
    synthesizer = DenseSynthesizer(features=8, context_features=3, hidden_layers=1, width=16)
    torch.nn.init.normal_(synthesizer.net[-1].weight)  # a non-zero output, as after some training
    trigger, context = torch.randn(5, 8), torch.eye(3)[[0, 1, 2, 0, 1]]
    synthesizer(trigger, context)  # the first ask: the running statistics move once
    norm = synthesizer.net[1]
    before = (norm.running_mean.clone(), norm.running_var.clone(), norm.num_batches_tracked.clone())
    reference = copy.deepcopy(synthesizer)
    with frozen_statistics(synthesizer):
        again = synthesizer(trigger, context)
    assert torch.equal(again, reference(trigger, context))  # the same batch-statistics output, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(before, (norm.running_mean, norm.running_var,
                                                           norm.num_batches_tracked)))
    assert norm.momentum == 0.1  # restored
