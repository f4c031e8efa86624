"""experiments/time_to_accuracy.py: validation accuracy against training seconds.

What is checked:
- the seconds-to-accuracy reader takes the first epoch that reaches the accuracy, even where a
  later one falls back, and says never where none does;
- --table_only rebuilds the .md and .json byte for byte from a fabricated set of run folders,
  reads their validation accuracies only (not their test ones), marks what is skipped or not run;
- bad input is one line and exit code 2;
- the commands: main.py for the default FCN, the run module for the wide net and for 1F1B,
  torchrun with K workers for the pipelines, each made of flags main.py accepts; local losses
  are measured only where main.py has --method local;
- the 1F1B micro-batch count: the fastest 1F1B row of bench.json, else the flag, saying which;
- a finished run folder with the same settings is reused, one with other settings refused;
- a tiny real run (the wide net, backprop, one process, 2 epochs of tiny data) whose evaluation
  sleeps: the training seconds leave the sleep out, and the table reads that folder.
"""
import json
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import dnilab.config
import dnilab.train
from dnilab.cli import main_guard, parse_config
from dnilab.config import Config
from dnilab.data import Data
from dni.errors import DNIError
from experiments import time_to_accuracy as tta
from experiments import time_to_accuracy_run
from experiments.bench_accuracy import ACCURACY_LR

TEST_ACC = 0.123456  # in every fabricated row: the measurement must never print it


def fake_run(results, model, name, accs, seconds, *, microbatches=None, epochs=None):
    """A finished run folder of (model, method `name`) as dnilab.train.loop writes it."""
    method = tta.BY_NAME[name]
    run = tta.run_dir_of(results, model, method)
    run.mkdir(parents=True)
    flags = dict(zip(method.flags[::2], method.flags[1::2]))
    config = {"num_epochs": epochs or len(accs), "lr": ACCURACY_LR, "seed": 0, "val_size": 10000,
              "method": flags["--method"], "conditioned": flags.get("--conditioned") == "True",
              "pipeline": method.launch == "pipeline", "model_type": "mlp"}
    (run / "config.json").write_text(json.dumps(config))
    script = "main.py" if model == "mlp" and method.launch != "1f1b" else \
        f"-m experiments.time_to_accuracy_run --bench_model {model}"
    (run / "command.txt").write_text(f"python {script} --out {run}\n")
    (run / "env.json").write_text(json.dumps({"cpu": "x86_64", "torch": "2.0", "python": "3.11"}))
    rows = [{"kind": "step", "step": 1, "loss": 1.0}]
    rows += [{"kind": "epoch", "epoch": e, "step": e, "val_acc": a, "test_acc": TEST_ACC, "seconds": s}
             for e, (a, s) in enumerate(zip(accs, seconds), start=1)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"val_acc": accs[-1], "test_acc": TEST_ACC, "seconds": seconds[-1]}
    if microbatches:
        summary["pipelining"] = {"microbatches": microbatches, "microbatches_from": "the fastest row"}
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def args_of(*argv):
    return tta.parse_args(list(argv))


def test_seconds_to_reads_the_first_crossing_and_never():
    points = [(1.5, 0.93), (3.0, 0.971), (4.5, 0.965), (6.0, 0.98)]
    assert tta.seconds_to(points, 0.95) == (3.0, 2)
    assert tta.seconds_to(points, 0.97) == (3.0, 2)  # the first crossing, not the one after the dip
    assert tta.seconds_to(points, 0.98) == (6.0, 4)  # reached exactly counts
    assert tta.seconds_to(points, 0.99) is None
    assert tta.seconds_to([], 0.5) is None


@pytest.fixture
def no_local(monkeypatch):
    monkeypatch.setattr(dnilab.config, "METHODS", tuple(m for m in dnilab.config.METHODS if m != "local"))


def test_table_only_rebuilds_byte_for_byte(tmp_path, monkeypatch, no_local, capsys):
    monkeypatch.chdir(tmp_path)  # relative paths, as experiments.rebuild runs the command
    fake_run("results", "wide", "backprop", [0.94, 0.975, 0.97], [1.0, 2.0, 3.0])
    fake_run("results", "wide", "1f1b", [0.96, 0.97, 0.981], [0.5, 1.0, 1.5], microbatches=4)
    fake_run("results", "wide", "dni", [0.90, 0.92, 0.93], [0.4, 0.8, 1.2])
    fake_run("results", "wide", "cdni", [0.95, 0.96, 0.97], [0.4, 0.8, 1.2])
    run = fake_run("results", "mlp", "backprop", [0.96, 0.97, 0.98], [1.0, 2.0, 3.0])
    (run / tta.MACHINE).write_text(json.dumps({"cpu": "Some CPU @ 2GHz", "load_average_before": [0.25, 1, 1],
                                               "load_average_after": [1.5, 1, 1], "wall_seconds": 9.0}))
    flags = ["--table_only", "--epochs", "3"]
    tta.main(flags)
    out = tmp_path / "results"
    first = {name: (out / name).read_bytes() for name in ("time_to_accuracy.md", "time_to_accuracy.json",
                                                         "time_to_accuracy.png")}
    md = first["time_to_accuracy.md"].decode()
    assert "| backprop, 1 process, 2 threads | 2.0 s (epoch 2) | 2.0 s (epoch 2) | never | 0.9700 | 3.0 | 3 |" in md
    assert "| DNI pipeline, K=2 | never | never | never | 0.9300 | 1.2 | 3 |" in md
    assert "1F1B: 4 micro-batches, from the fastest row." in md
    assert "not run yet" in md and "no --method local yet" in md
    assert "--epochs 3" in md and "lr 0.001" in md and "Load average (1 min) around the runs: 0.2 to 1.5." in md
    for text in (md, first["time_to_accuracy.json"].decode()):
        assert f"{TEST_ACC:.4f}" not in text and str(TEST_ACC) not in text  # validation only
    result = json.loads(first["time_to_accuracy.json"])
    assert result["runs"]["wide"]["1f1b"]["seconds_to"]["98"] == [1.5, 3]
    assert set(result["skipped"]["mlp"]) == {"1f1b", "dni", "cdni", "local"}

    for name in first:  # rebuild in another checkout's copy of results/
        (out / name).unlink()
    other = tmp_path / "copy"
    shutil.copytree(out, other / "results")
    monkeypatch.chdir(other)
    tta.main(flags)
    for name, content in first.items():
        assert (other / "results" / name).read_bytes() == content, name


@pytest.mark.parametrize("argv, says", [
    (["--models", "wide,resnet"], "unknown model resnet"),
    (["--methods", "dni,sgd"], "unknown method sgd"),
    (["--accuracies", "95,,98"], "expected percentages"),
    (["--accuracies", "98,95"], "rising percentages"),
    (["--accuracies", "95,101"], "rising percentages"),
    (["--epochs", "0"], "integer >= 1"),
    (["--microbatches", "3"], "cut a batch"),
    (["--val_size", "0"], "--val_size must be >= 1"),
    (["--table_only", "--results", "nowhere"], "no finished run folders"),
])
def test_bad_input_is_one_line(argv, says, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main_guard(tta.main, argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1


def main_py_flags(argv):
    """The flags after the script: those main.py (dnilab.config.Config) must accept."""
    return argv[argv.index("--model_type"):]


def runs_main_py(argv):
    return any(Path(a).name == "main.py" for a in argv)


def test_commands(no_local):
    args = args_of("--epochs", "20")
    run = tta.run_dir_of("results", "mlp", tta.BY_NAME["dni"])
    argv, threads = tta.command("mlp", tta.BY_NAME["backprop"], run, args)
    assert Path(argv[1]).name == "main.py" and "torch.distributed.run" not in argv and threads == tta.THREADS
    assert "--pipeline" not in argv
    argv, threads = tta.command("mlp", tta.BY_NAME["dni"], run, args)
    assert argv[1:4] == ["-m", "torch.distributed.run", "--nproc_per_node"] and argv[4] == str(tta.K)
    assert runs_main_py(argv) and threads == 1
    config = parse_config(Config, main_py_flags(argv))
    assert (config.method, config.pipeline, config.conditioned) == ("dni", True, False)
    assert (config.lr, config.num_epochs, str(config.out)) == (ACCURACY_LR, 20, str(run))
    argv, _ = tta.command("mlp", tta.BY_NAME["cdni"], run, args)
    assert parse_config(Config, main_py_flags(argv)).conditioned
    argv, _ = tta.command("wide", tta.BY_NAME["dni"], run, args)
    assert not runs_main_py(argv) and argv[argv.index("--bench_model") - 1] == "experiments.time_to_accuracy_run"
    assert argv[argv.index("--bench_model") + 1] == "wide"
    argv, threads = tta.command("mlp", tta.BY_NAME["1f1b"], run, args, 4, "bench")
    assert "torch.distributed.run" in argv and not runs_main_py(argv) and threads == 1
    assert argv[argv.index("--n_microbatches") + 1] == "4"
    config = parse_config(Config, main_py_flags(argv))
    assert (config.method, config.pipeline) == ("backprop", False)
    argv, _ = tta.command("mlp", tta.BY_NAME["local"], run, args)
    assert argv[argv.index("--method") + 1] == "local" and argv[argv.index("--pipeline") + 1] == "True"


def test_local_is_measured_only_where_main_py_has_it(monkeypatch):
    local = tta.BY_NAME["local"]
    monkeypatch.setattr(dnilab.config, "METHODS", ("dni", "backprop", "nobprop"))
    assert "no --method local" in tta.skipped("mlp", local)
    monkeypatch.setattr(dnilab.config, "METHODS", ("dni", "backprop", "nobprop", "local"))
    assert tta.skipped("mlp", local) is None
    assert tta.skipped("wide", local) is None
    assert tta.skipped("wide", tta.BY_NAME["cdni"]) is None


def test_microbatches_from_bench_json_or_the_flag(tmp_path):
    bench = tmp_path / "bench.json"
    rows = {"wide/1f1b_m2_K": 100, "wide/1f1b_m4_K": 300, "wide/1f1b_m8_K": 200, "wide/gpipe_m8_K": 900,
            "mlp/1f1b_m2_K": 500, "mlp/1f1b_m4_K": 400}
    bench.write_text(json.dumps({"settings": {"workers": 2},
                                 "throughput": {k: {"median": v} for k, v in rows.items()}}))
    n, source = tta.best_microbatches(bench, "wide", 2)
    assert n == 4 and str(bench) in source and "fastest" in source
    assert tta.best_microbatches(bench, "mlp", 8)[0] == 2
    n, source = tta.best_microbatches(tmp_path / "missing.json", "wide", 8)
    assert n == 8 and source.startswith("--microbatches")
    bench.write_text(json.dumps({"settings": {"workers": 4},
                                 "throughput": {k: {"median": v} for k, v in rows.items()}}))
    assert tta.best_microbatches(bench, "wide", 8) == (8, f"--microbatches (no 1F1B throughput rows of wide at "
                                                          f"K=2 in {bench})")


def test_a_finished_run_is_reused_and_one_with_other_settings_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(tta.subprocess, "run", lambda *a, **k: pytest.fail("trained a finished run again"))
    run = fake_run(tmp_path, "wide", "dni", [0.9, 0.95], [1.0, 2.0])
    args = args_of("--epochs", "2", "--results", str(tmp_path))
    assert tta.ensure_run("wide", tta.BY_NAME["dni"], args) == run
    with pytest.raises(DNIError, match="num_epochs 2 \\(not 3\\)"):
        tta.ensure_run("wide", tta.BY_NAME["dni"], args_of("--epochs", "3", "--results", str(tmp_path)))
    (run / "command.txt").write_text("python main.py --out x\n")
    with pytest.raises(DNIError, match="bench model mlp \\(not wide\\)"):
        tta.ensure_run("wide", tta.BY_NAME["dni"], args)


def test_a_missing_run_is_trained_by_its_command_and_a_failed_one_named(tmp_path, monkeypatch):
    args = args_of("--epochs", "2", "--results", str(tmp_path))
    launched = []

    def train(argv, **kw):
        launched.append((argv, kw["env"]["OMP_NUM_THREADS"]))
        fake_run(tmp_path, "mlp", "cdni", [0.9, 0.95], [1.0, 2.0])
        return SimpleNamespace(returncode=0, stdout="", stderr="")
    monkeypatch.setattr(tta.subprocess, "run", train)
    run = tta.ensure_run("mlp", tta.BY_NAME["cdni"], args)
    (argv, threads), = launched
    assert runs_main_py(argv) and argv[argv.index("--out") + 1] == str(run) and threads == "1"
    machine = json.loads((run / tta.MACHINE).read_text())
    assert machine["wall_seconds"] >= 0 and len(machine["load_average_before"]) == 3 and machine["cpu"]
    monkeypatch.setattr(tta.subprocess, "run",
                        lambda argv, **kw: SimpleNamespace(returncode=2, stdout="", stderr="error: worker 1: boom"))
    with pytest.raises(DNIError, match="the mlp/dni run failed \\(error: worker 1: boom\\); its command: .*main.py"):
        tta.ensure_run("mlp", tta.BY_NAME["dni"], args)


SLEEP = 1.5  # seconds each evaluation sleeps in the end-to-end run


def test_a_real_run_leaves_evaluation_out_of_its_seconds(tmp_path, monkeypatch, no_local):
    generator = torch.Generator().manual_seed(0)
    tiny = Data(train_x=torch.rand(812, 1, 28, 28, generator=generator),
                train_y=torch.randint(10, (812,), generator=generator),
                test_x=torch.rand(50, 1, 28, 28, generator=generator),
                test_y=torch.randint(10, (50,), generator=generator), num_classes=10)
    monkeypatch.setattr(dnilab.train, "load_data", lambda name, root, device: tiny)
    evaluated = []
    real = dnilab.train.evaluate_splits

    def slow(net, data):
        start = time.perf_counter()
        time.sleep(SLEEP)
        out = real(net, data)
        evaluated.append(time.perf_counter() - start)
        return out
    monkeypatch.setattr(dnilab.train, "evaluate_splits", slow)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    args = args_of("--models", "wide", "--methods", "backprop", "--epochs", "2", "--val_size", "300",
                   "--results", str(tmp_path))
    run = tta.run_dir_of(args.results, "wide", tta.BY_NAME["backprop"])
    argv, _ = tta.command("wide", tta.BY_NAME["backprop"], run, args)
    monkeypatch.setattr(sys, "argv", ["experiments/time_to_accuracy_run.py", *argv[3:]])  # its command.txt
    start = time.perf_counter()
    try:
        summary = time_to_accuracy_run.main(argv[argv.index("--bench_model"):])  # in process: the sleep is ours
    finally:
        torch.set_num_threads(threads)
    wall = time.perf_counter() - start
    points = tta.curve(run)
    assert len(points) == 2 == len(evaluated) and summary["steps"] == 4  # 512 training images, batch 256
    increments = [points[0][0], points[1][0] - points[0][0]]
    assert all(0 < s < SLEEP for s in increments), increments  # an epoch's seconds hold no evaluation
    assert summary["seconds"] + sum(evaluated) <= wall
    assert sum(p.numel() for p in torch.load(run / "checkpoint.pt", weights_only=True)["net"].values()) > 1.9e6  # wide

    tta.main(["--table_only", "--models", "wide", "--methods", "backprop", "--epochs", "2", "--val_size", "300",
              "--results", str(tmp_path)])
    md = (tmp_path / "time_to_accuracy.md").read_text()
    assert f"| {summary['val_acc']:.4f} | {summary['seconds']:.1f} | 2 |" in md


@pytest.mark.parametrize("argv, says", [
    (["--bench_model", "resnet"], "invalid choice"),
    (["--n_microbatches", "3", "--method", "backprop"], "do not cut a batch of 256"),
    (["--n_microbatches", "2", "--method", "dni"], "trains --method backprop"),
    (["--n_microbatches", "-1"], "must be >= 0"),
])
def test_the_run_module_refuses_bad_input_in_one_line(argv, says, capsys):
    with pytest.raises(SystemExit) as stop:
        time_to_accuracy_run.main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1
