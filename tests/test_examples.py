"""The README's "DNI in your own model" runs as written outside the repository, and each example
under examples/ learns on a tiny budget, by DNI and by local losses, and writes its run folder."""
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MARK = "<!-- tests/test_examples.py runs the next block -->"
RECURRENT_MARK = "<!-- tests/test_examples.py runs the next block: recurrent -->"
FORTUNES = "/usr/share/games/fortunes"


def readme_snippet(mark=MARK):
    text = (ROOT / "README.md").read_text()
    assert mark in text, "README.md lost the marked snippet"
    match = re.match(r"\s*```python\n(.*?)\n```", text.split(mark, 1)[1], re.S)
    assert match, "the marker must be followed by a ```python block"
    return match.group(1)


def run(args, cwd, timeout=120):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_readme_snippet_runs_outside_the_repository_in_five_lines(tmp_path):
    code = readme_snippet()
    assert len([line for line in code.splitlines() if "# DNI" in line]) <= 5
    # After it, measure how far the layer below the cut moved from its seeded start: it gets no
    # true gradient, so it moves only if the synthetic gradients it receives are not zero.
    check = "\ntorch.manual_seed(0)\nstart = Net().below[1].weight\n" \
            "print(f'below moved {(model.below[1].weight - start).abs().max().item():.3e}')\n"
    (tmp_path / "snippet.py").write_text(code + check)
    done = run(["snippet.py"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    first, last = map(float, re.search(r"loss (\S+) -> (\S+),", done.stdout).groups())
    assert last < 0.75 * first, done.stdout  # it learns
    assert float(re.search(r"below moved (\S+)", done.stdout).group(1)) > 1e-3, done.stdout


def test_readme_recurrent_snippet_runs_outside_the_repository_in_five_lines(tmp_path):
    """dni.RecurrentDNI in an nn.LSTM's truncated-BPTT loop, as README shows it: it runs, learns and
    trains its synthesizer."""
    code = readme_snippet(RECURRENT_MARK)
    assert len([line for line in code.splitlines() if "# DNI" in line]) <= 5
    (tmp_path / "snippet.py").write_text(code)
    done = run(["snippet.py"], cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    first, last, sg_loss = map(float, re.search(r"loss (\S+) -> (\S+), synthesizer loss (\S+)", done.stdout).groups())
    assert last < 0.25 * first and 0 < sg_loss < float("inf"), done.stdout


def fashion_available():
    return (ROOT / "data" / "FashionMNIST" / "raw").is_dir() or os.path.isdir("/usr/share/datasets/fashion-mnist")


def example(name):
    """An example script as a module (examples/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_run(run_dir):
    """(config, env, metrics lines, summary) of an example's run folder."""
    load = lambda name: json.loads((run_dir / name).read_text())  # noqa: E731
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert (run_dir / "command.txt").read_text().strip()
    return load("config.json"), load("env.json"), metrics, load("summary.json")


@pytest.mark.skipif(not fashion_available(), reason="no Fashion-MNIST offline (bash install.sh)")
def test_resnet_example_learns_with_cdni(tmp_path):
    done = run(["examples/resnet_fashion.py", "--method", "cdni", "--epochs", "1", "--subset", "1280",
                "--batch_size", "64", "--data", str(ROOT / "data"), "--out", str(tmp_path / "run")], cwd=ROOT,
               timeout=300)  # a minute alone; several when other jobs share the cores
    assert done.returncode == 0, done.stderr
    config, env, (epoch,), summary = read_run(tmp_path / "run")
    assert epoch["train_loss"] < epoch["first_loss"] and epoch["seconds"] > 0
    assert summary["val_acc"] > 0.4 and summary["test_acc"] > 0.4  # chance is 0.1
    assert config["method"] == summary["method"] == "cdni" and summary["cuts"] == 3 and summary["epochs"] == 1
    assert len(env["git_commit"]) == 40 and isinstance(env["git_dirty"], bool) and env["torch"]


@pytest.mark.skipif(not os.path.isdir(FORTUNES), reason="no corpus: apt-get install fortunes (bash install.sh)")
def test_char_gpt_example_learns_with_dni(tmp_path):
    done = run(["examples/char_gpt.py", "--method", "dni", "--steps", "200", "--eval_every", "100", "--n_layer", "2",
                "--d_model", "32", "--n_head", "2", "--block_size", "32", "--batch_size", "16", "--synth_width", "64",
                "--lr", "1e-2", "--out", str(tmp_path / "run")], cwd=ROOT)
    assert done.returncode == 0, done.stderr
    config, env, (first, last), summary = read_run(tmp_path / "run")
    assert summary["corpus"]["train_chars"] > 2_000_000 and summary["corpus"]["vocab"] > 90
    assert last["val_bpc"] < first["val_bpc"] < math.log2(summary["corpus"]["vocab"])
    # Uniform over the vocabulary is 6.8 bits; the train split's character frequencies give 4.8 on the
    # test split, so below 4.4 the model reads its context (it reached 4.0 when this test was written).
    assert summary["test_bpc"] < 4.4 and summary["cuts"] == 1 and summary["steps"] == 200
    assert len(env["git_commit"]) == 40 and isinstance(env["git_dirty"], bool)


def tiny_corpus(folder):
    """A corpus of two short files that a tiny model learns in a few dozen steps (load_fortunes reads any folder)."""
    folder.mkdir()
    (folder / "one").write_text("the cat sat on the mat.\n%\n" * 200)
    (folder / "two").write_text("a dog ate a log.\n%\n" * 200)
    return folder


TINY_GPT = ["--n_layer", "2", "--d_model", "32", "--n_head", "2", "--block_size", "16", "--batch_size", "16",
            "--synth_width", "32", "--lr", "1e-2"]


def test_char_gpt_learns_with_local_losses_and_writes_a_run_folder(tmp_path):
    out = tmp_path / "run"
    args = ["examples/char_gpt.py", "--method", "local", "--cuts", "1", "--steps", "60", "--eval_every", "20",
            "--seed", "3", "--corpus", str(tiny_corpus(tmp_path / "corpus")), "--out", str(out), *TINY_GPT]
    done = run(args, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    config, env, metrics, summary = read_run(out)
    assert config["method"] == "local" and config["seed"] == 3 and config["cuts"] == 1
    assert len(env["git_commit"]) == 40 and isinstance(env["git_dirty"], bool)
    assert [m["step"] for m in metrics] == [20, 40, 60] and all(m["seconds"] > 0 for m in metrics)
    assert metrics[-1]["val_bpc"] < 0.7 * metrics[0]["val_bpc"]  # it learns above the cut...
    assert metrics[-1]["aux_bpc"][0] < 0.7 * metrics[0]["aux_bpc"][0]  # ...and the local head below it
    assert summary["test_bpc"] < 0.7 * metrics[0]["val_bpc"] and summary["cuts"] == 1 and summary["steps"] == 60
    # A finished run is not overwritten: refused in one line, unless --overwrite True.
    before = (out / "summary.json").read_text()
    again = run(args, cwd=ROOT)
    assert again.returncode != 0 and "already holds a finished run" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1 and (out / "summary.json").read_text() == before
    again = run(args[:5] + ["--steps", "20"] + args[7:] + ["--overwrite", "True"], cwd=ROOT)
    assert again.returncode == 0, again.stderr
    assert [m["step"] for m in read_run(out)[2]] == [20]  # the old curve went with the old run


def test_local_losses_sit_where_dni_does_and_nothing_crosses_them_backwards():
    """Under --method local the layers below a cut learn from its auxiliary head alone: scaling the
    loss above changes none of their gradients, and scales those above."""
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F
    gpt, resnet = example("char_gpt"), example("resnet_fashion")
    assert gpt.GPT(vocab=5, n_layer=4, method="local", cuts=1).cut_after == (2,)
    assert gpt.GPT(vocab=5, n_layer=4, method="dni").cut_after == (1, 2, 3)
    assert resnet.ResNet18(method="local", cuts=1).cut_after == (2,)
    assert resnet.ResNet18(method="cdni").cut_after == (1, 2, 3)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 11, (4, 9), generator=g)
    images, labels = torch.randn(4, 1, 28, 28, generator=g), torch.randint(0, 10, (4,), generator=g)
    cases = [  # (model, its loss, names of the parameters below the cut, above it)
        (gpt.GPT(vocab=11, block_size=8, n_layer=2, d_model=16, n_head=2, method="local", cuts=1),
         lambda m: F.cross_entropy(m(idx[:, :-1], idx[:, 1:]).flatten(0, 1), idx[:, 1:].flatten()),
         ("tok.", "pos.", "blocks.0."), ("blocks.1.", "ln.", "head.")),
        (resnet.ResNet18(method="local", cuts=1), lambda m: F.cross_entropy(m(images, labels), labels),
         ("net.conv1.", "net.bn1.", "net.layer1.", "net.layer2."), ("net.layer3.", "net.layer4.", "net.fc."))]
    for model, loss_of, below, above in cases:
        grads = []
        for scale in (1.0, 1000.0):
            model.zero_grad()
            (scale * loss_of(model)).backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        plain, scaled = grads
        names_below = [n for n in plain if n.startswith(below)]
        names_above = [n for n in plain if n.startswith(above)]
        assert names_below and names_above and len(names_below) + len(names_above) + \
            len([n for n in plain if n.startswith("cuts.")]) == len(plain)
        for n in names_below + [n for n in plain if n.startswith("cuts.")]:  # below and the head: the aux loss
            torch.testing.assert_close(plain[n], scaled[n], rtol=0, atol=0, msg=n)
        assert any(plain[n].abs().sum() > 0 for n in names_below)
        for n in names_above:  # above: the user's loss
            assert (1000 * plain[n] - scaled[n]).norm() <= 1e-4 * scaled[n].norm(), n  # float32 rounding aside


def test_examples_refuse_bad_input_in_one_line(tmp_path):
    done = run(["examples/char_gpt.py", "--corpus", str(tmp_path / "none")], cwd=ROOT, timeout=60)
    assert done.returncode == 1 and "apt-get install fortunes" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    for script, flag in [("char_gpt.py", "--steps"), ("resnet_fashion.py", "--epochs")]:
        done = run([f"examples/{script}", flag, "0"], cwd=ROOT, timeout=60)
        assert done.returncode == 2 and "error: " in done.stderr.strip().splitlines()[-1]


def test_examples_refuse_cuts_their_model_cannot_hold(capsys):
    for name in ("char_gpt", "resnet_fashion"):
        with pytest.raises(SystemExit) as stop:
            example(name).main(["--method", "local", "--cuts", "4"])
        assert stop.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "error: --cuts 4 does not fit 4 layers" in err


def test_the_table_reads_run_folders_with_their_budgets_and_spread_over_seeds(tmp_path):
    table = example("table")
    for seed, (val, test) in enumerate([(0.90, 0.89), (0.92, 0.91), (0.94, 0.93)]):
        for method, shift in (("backprop", 0.0), ("local", -0.1)):
            folder = tmp_path / f"resnet_fashion_{method}_seed{seed}"
            folder.mkdir()
            (folder / "config.json").write_text(json.dumps({"method": method, "subset": 0, "epochs": 7}))
            (folder / "env.json").write_text(json.dumps({"git_commit": "a" * 40, "git_dirty": False, "cpu": "x86_64",
                                                         "threads": 1, "torch": "2.0", "gpu": None}))
            (folder / "summary.json").write_text(json.dumps({
                "example": "resnet_fashion", "method": method, "cuts": 0 if method == "backprop" else 1, "seed": seed,
                "epochs": 7, "steps": 100, "val_acc": val + shift, "test_acc": test + shift, "seconds": 10.0}))
    text = table.table(tmp_path)
    assert "| backprop | 0 | 7 | 3 | 92.00 ± 2.00% | 91.00 ± 2.00% |  | 10 s |" in text
    assert "| local | 1 | 7 | 3 | 82.00 ± 2.00% | 81.00 ± 2.00% | -10.00 pt | 10 s |" in text
    assert "seeds 0, 1, 2" in text and "Provenance" not in text


def test_the_examples_grid_skips_finished_runs_and_names_stale_ones(tmp_path):
    done = run(["-m", "experiments.examples_grid", "--list", "--results", str(tmp_path)], cwd=ROOT, timeout=60)
    lines = done.stdout.splitlines()
    assert done.returncode == 0 and len(lines) == 2 * (4 * 3 + 2) and all(x.startswith("to train") for x in lines)
    finished, moved = tmp_path / "char_gpt_local_cuts1_seed2", tmp_path / "resnet_fashion_backprop_seed0"
    for folder, settings in ((finished, {"method": "local", "seed": 2, "steps": 3000, "cuts": 1}),
                             (moved, {"method": "backprop", "seed": 0, "epochs": 3})):
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(settings))
        (folder / "summary.json").write_text("{}")
    lines = run(["-m", "experiments.examples_grid", "--list", "--results", str(tmp_path)], cwd=ROOT).stdout.splitlines()
    assert sum(x.startswith("finished") for x in lines) == 1 and f"--out {finished} " in next(
        x for x in lines if x.startswith("finished"))
    assert [x for x in lines if x.startswith("stale")][0].endswith(f"--out {moved}")
    done = run(["-m", "experiments.examples_grid", "--results", str(tmp_path)], cwd=ROOT, timeout=60)
    assert done.returncode == 2 and "epochs 3 -> 10" in done.stderr  # trains nothing until told to retrain it
