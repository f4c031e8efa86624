"""python -m experiments.table1 (the paper's Table 1): --quick writes a well-formed table and figures,
a second call reuses its runs, runs made with other settings are refused, bad flags end in
one line; and the No Bprop step trains the classifier alone."""
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from dnilab.config import Config
from dnilab.data import load_data
from dni.stages import nobprop_step
from dnilab.presets import paper_epochs
from dnilab.presets import PAPER_ITERATIONS
from experiments.grid import stale_settings, typed_command
from experiments.table1 import parse_args, run_config
from dnilab.parts import Optimizers, build_net

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"


def table1(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "experiments.table1", *args, "--data_dir", str(DATA)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900, env=env)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    load_data("mnist", str(DATA))  # builds the files offline once
    results = tmp_path_factory.mktemp("results")
    done = table1("--quick", "--results", str(results))
    assert done.returncode == 0, done.stderr[-2000:]
    return results, done


def test_quick_json_is_well_formed(quick):
    results, _ = quick
    table = json.loads((results / "table1_quick.json").read_text())
    meta = table["meta"]
    assert meta["dataset"] == "mnist" and meta["seeds"] == [0] and not meta["partial"]
    assert meta["runs_done"] == meta["runs_total"] == 3
    assert meta["methods"] == ["backprop", "dni", "cdni"]
    assert meta["torch"] == torch.__version__ and meta["hardware"][0]["threads"] == 1
    assert meta["train_seconds_total"] > 0 and "experiments.table1 --quick" in meta["command"]
    [row] = table["rows"]
    assert (row["model"], row["layers"], row["depth"]) == ("mlp", 3, 2)
    assert all(v is None for v in row["paper"].values())  # nothing quoted that was not confirmed
    for method, cell in row["cells"].items():
        assert cell["seeds"] == [0] and cell["epochs"] == 1 and cell["steps"] == (60000 - Config().val_size) // 256
        assert len(cell["test_error"]) == 1 and 0 < cell["mean"] < 50 and cell["std"] is None
    assert row["cells"]["backprop"]["mean"] < 6  # one epoch of backprop on MNIST


def test_quick_markdown_and_figures(quick):
    results, _ = quick
    md = (results / "table1_quick.md").read_text()
    lines = md.splitlines()
    header = lines.index("| network | layers | Bprop | DNI | cDNI | paper |")
    row = lines[header + 2].split("|")[1:-1]
    assert [c.strip() for c in row[:2]] == ["FCN", "3"] and row[-1].strip() == "not confirmed"
    for cell in row[2:5]:
        float(cell)  # one seed: a bare number, no ± or dash
    gaps = lines[lines.index("| network | layers | DNI | cDNI |") + 2].split("|")[3:-1]
    for gap, cell in zip(gaps, row[3:5]):
        assert abs(float(gap) - (float(cell) - float(row[2]))) < 0.011  # points above Bprop, from the cells
    assert "Complete: 3 runs." in md and "--depth n-1" in md and "torch " + torch.__version__ in md
    for name in ("table1_quick_curves.png", "table1_quick_sg.png"):
        assert (results / name).stat().st_size > 1000
    run = results / "table1_quick" / "mnist" / "mlp3_dni_s0"
    assert json.loads((run / "config.json").read_text())["depth"] == 2


def test_second_call_reuses_runs_and_stale_runs_are_refused(quick):
    results, _ = quick
    again = table1("--quick", "--results", str(results))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "0 run(s) to train" in again.stdout and "epoch 1 step" not in again.stdout
    stale = table1("--quick", "--results", str(results), "--epochs", "2")
    assert stale.returncode == 2
    assert stale.stderr.count("\n") == 1 and "num_epochs 1 -> 2" in stale.stderr and "--retrain_stale" in stale.stderr


def test_table_only_shows_the_whole_grid_as_partial(tmp_path):
    done = table1("--table_only", "--results", str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    table = json.loads((tmp_path / "table1.json").read_text())
    assert [(r["model"], r["layers"]) for r in table["rows"]] == [
        ("mlp", 3), ("mlp", 4), ("mlp", 5), ("mlp", 6), ("cnn", 3), ("cnn", 4)]
    assert table["meta"]["partial"] and table["meta"]["runs_total"] == 6 * 4 * 3
    assert "**PARTIAL**: 0 of 72 runs" in (tmp_path / "table1.md").read_text()


def test_a_slice_in_a_root_of_its_own_shows_only_that_slice(tmp_path):
    done = table1("--table_only", "--results", str(tmp_path), "--models", "cnn", "--methods", "backprop", "cdni")
    assert done.returncode == 0, done.stderr[-2000:]
    table = json.loads((tmp_path / "table1.json").read_text())
    assert [(r["model"], r["layers"]) for r in table["rows"]] == [("cnn", 3), ("cnn", 4)]
    assert table["meta"]["methods"] == ["backprop", "cdni"] and table["meta"]["runs_total"] == 2 * 2 * 3
    assert "| network | layers | Bprop | cDNI | paper |" in (tmp_path / "table1.md").read_text()


@pytest.mark.parametrize("line, typed", [
    ("/venv/bin/python /repo/experiments/table1.py --quick --jobs 2", "python -m experiments.table1 --quick --jobs 2"),
    ("/venv/bin/python /repo/dni/table1.py --quick --jobs 2", "python -m dni.table1 --quick --jobs 2"),  # an older run
    ("/root/.pyenv/versions/3.11.7/bin/python main.py --seed 0 --out /tmp/c3", "python main.py --seed 0 --out /tmp/c3"),
    ("/usr/bin/python3.11 main.py --model_type cnn", "python main.py --model_type cnn"),
    ("/venv/bin/python /work/run/experiments/deviations.py --models mlp", "python -m experiments.deviations --models mlp"),
    ("/venv/bin/python /w/run/experiments/table1.py --jobs 2 --results /w/main/results --retrain_stale",
     "python -m experiments.table1 --jobs 2 --retrain_stale"),
    ("/venv/bin/python /repo/experiments/table1.py --results results/cnn20", "python -m experiments.table1 --results results/cnn20"),
])
def test_the_table_names_each_run_s_command_as_typed(line, typed):
    assert typed_command(line) == typed


def test_cells_trained_in_the_root_stay_in_its_table(quick, tmp_path):
    results, _ = quick
    shutil.copytree(results, tmp_path, dirs_exist_ok=True)  # leave the fixture's table as it is
    done = table1("--quick", "--table_only", "--results", str(tmp_path),
                  "--models", "cnn", "--layers", "3", "--methods", "backprop")
    assert done.returncode == 0, done.stderr[-2000:]
    table = json.loads((tmp_path / "table1_quick.json").read_text())
    assert [(r["model"], r["layers"]) for r in table["rows"]] == [("mlp", 3), ("cnn", 3)]
    assert table["meta"]["methods"] == ["backprop", "dni", "cdni"]
    assert table["rows"][0]["cells"]["dni"]["test_error"] and not table["rows"][1]["cells"]["backprop"]["test_error"]
    dni_cell = table["rows"][0]["cells"]["dni"]  # validation error beside test error: what a later choice reads
    assert len(dni_cell["val_error"]) == len(dni_cell["test_error"]) and dni_cell["val_error"] != dni_cell["test_error"]


@pytest.mark.parametrize("args, message", [
    (["--layers", "1"], "at least 2 layers"),
    (["--quick", "--paper"], "pick one"),
    (["--methods", "sgd"], "invalid choice: 'sgd'"),
    (["--seeds", "0", "0"], "a seed is repeated"),
    (["--jobs", "0"], "must be > 0"),
    (["--dataset", "cifar10"], "invalid choice"),
])
def test_bad_flags_end_in_one_line(args, message):
    done = table1(*args, "--table_only", "--results", "/nonexistent/never/written")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and message in done.stderr, done.stderr


def test_paper_preset_builds_the_papers_model_at_the_tables_budget():
    args = parse_args(["--preset", "paper", "--models", "cnn"])
    cdni, dni = run_config(args, "cnn", 3, "cdni", 0), run_config(args, "cnn", 3, "dni", 0)
    assert (cdni.channels, cdni.synth_channels, cdni.synth_type, cdni.synth_position_map) == (128, 128, "conv", False)
    assert (cdni.synth_layers, dni.synth_layers, dni.synth_type) == (0, 1, "conv")
    assert (cdni.num_epochs, cdni.lr, cdni.sg_lr, cdni.schedule) == (10, 1e-2, 1e-2, "cosine")  # the table's budget
    assert "table1_preset_paper" in cdni.out and "table1_preset_paper" not in run_config(
        parse_args([]), "cnn", 3, "cdni", 0).out
    fcn = run_config(parse_args(["--preset", "paper", "--models", "mlp"]), "mlp", 4, "cdni", 0)
    assert (fcn.hidden, fcn.synth_width, fcn.synth_layers, fcn.synth_label_map) == (256, 1024, 0, False)


def test_layers_map_to_depth_and_paper_budget():
    args = parse_args(["--paper", "--models", "cnn"])
    config = run_config(args, "cnn", 4, "cdni", 1)
    assert (config.depth, config.method, config.conditioned, config.seed) == (3, "dni", True, 1)
    assert (config.lr, config.sg_lr, config.schedule, config.channels) == (3e-5, 3e-5, "paper", 128)
    steps = (60000 - config.val_size) // config.batch_size  # the iterations are counted on the training split
    assert config.num_epochs == paper_epochs("mnist", config.val_size, config.batch_size)
    assert (config.num_epochs - 1) * steps < PAPER_ITERATIONS <= config.num_epochs * steps
    assert "table1_paper" in config.out
    quick = run_config(parse_args(["--quick"]), "mlp", 3, "nobprop", 0)
    assert (quick.lr, quick.num_epochs) == (1e-3, 1) and quick.method == "nobprop" and quick.depth == 2
    assert quick.sg_lr == Config(model_type="mlp").sg_lr  # what the table does not set: defaults at run time
    cpu = run_config(parse_args([]), "cnn", 3, "dni", 0)  # the CPU grid's budget, not main.py's longer one
    assert (cpu.num_epochs, cpu.lr) == (10, 1e-2)


def test_a_table_names_where_its_runs_stage_rates_came_from_even_after_the_grid_moves_on():
    from experiments.grid import CPU_SETTINGS
    from experiments.table1_grid import stage_lr_line
    now = stage_lr_line({"mlp": [CPU_SETTINGS["mlp"]["lr"]], "cnn": [CPU_SETTINGS["cnn"]["lr"]]})
    assert "FCN 1e-3, chosen for 10 epochs on MNIST's validation split at FCN 4" in now
    assert "CNN 1e-2, chosen for 10 epochs on MNIST's validation split at CNN 3" in now and "test" not in now
    before = stage_lr_line({"cnn": [3e-3]})  # cells trained before validation moved the CNN's rate
    assert before.startswith("Stage learning rates: CNN 3e-3, chosen on test before the split; the grid's is now 1e-2")
    assert "CNN 3e-4, not chosen" in stage_lr_line({"cnn": [3e-4]})


def test_nobprop_step_trains_the_classifier_alone():
    torch.manual_seed(0)
    config = Config(model_type="mlp", depth=2, hidden=16, method="nobprop")
    net = build_net(config, (1, 8, 8), 10)
    optimizers = Optimizers(net, config, total_steps=10)
    before = [[p.detach().clone() for p in stage.parameters()] for stage in net.stages]
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))
    out = nobprop_step(net, optimizers.stages, x, y)
    assert torch.isfinite(out.loss)
    for stage, old in zip(net.stages[:-1], before[:-1]):
        for p, q in zip(stage.parameters(), old):
            assert torch.equal(p, q) and p.grad is None
    assert any(not torch.equal(p, q) for p, q in zip(net.stages[-1].parameters(), before[-1]))


def test_nobprop_schedules_step_without_warnings():
    """The frozen stages' optimizers never step; stepping their schedules must not warn at every run."""
    config = Config(model_type="mlp", depth=2, hidden=16, method="nobprop")
    net = build_net(config, (1, 8, 8), 10)
    optimizers = Optimizers(net, config, total_steps=10)
    nobprop_step(net, optimizers.stages, torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizers.step_schedules()


def test_search_grid_names_widths_and_trains_a_linear_synthesizer_once():
    from experiments import search
    args = search.parse_args(["--methods", "dni", "backprop", "--synth_layers", "0", "1", "--synth_widths", "512",
                              "2048", "--sg_lrs", "1e-3", "--lrs", "1e-3", "--results", "out"])
    points = search.points(args)
    assert points == [("dni", 0, 512, 1e-3, 1e-3), ("dni", 1, 512, 1e-3, 1e-3), ("dni", 1, 2048, 1e-3, 1e-3),
                      ("backprop", None, None, None, 1e-3)]
    config = search.run_config(args, *points[2], seed=0)
    assert (config.synth_layers, config.synth_width, Path(config.out).name) == \
        (1, 2048, "dni_sl1_w2048_sglr0.001_lr0.001_s0")


def test_cnn_search_sets_conv_filters_and_writes_its_own_table():
    from experiments import search
    assert search.parse_args(["--model_type", "cnn"]).synth_widths == [Config().synth_channels]
    args = search.parse_args(["--model_type", "cnn", "--methods", "dni", "--synth_layers", "1", "--synth_widths", "64",
                              "--sg_lrs", "1e-3", "--lrs", "3e-3", "--results", "out"])
    assert args.stem == "search_cnn"
    config = search.run_config(args, *search.points(args)[0], seed=0)
    assert (config.model_type, config.synth_layers, config.synth_channels) == ("cnn", 1, 64)


def test_once_asked_to_stop_the_grid_starts_no_queued_run(tmp_path, monkeypatch):
    """The pool hands runs to its workers ahead of time: after SIGINT/SIGTERM none of those may start."""
    import signal
    import threading

    from experiments import grid
    stop = grid.StopRequest(None, threading.Event())
    with stop:
        os.kill(os.getpid(), signal.SIGINT)  # noted by the handler, not raised
    assert stop.event.is_set() and stop.signum == signal.SIGINT
    monkeypatch.setattr(grid, "_stop_requested", stop.event)  # what a pool worker holds
    with pytest.raises(grid.Stopped, match="not started"):
        grid.train_one(Config(out=str(tmp_path / "run"), num_epochs=1, data_dir=str(tmp_path)), 1)
    assert not (tmp_path / "run").exists()


def test_runs_older_than_a_setting_are_judged_by_what_they_did(tmp_path):
    """A CNN DNI run recorded before --synth_type existed used conv synthesizers: stale once
    the default is dense; an FCN run (always dense) stays fresh."""
    args = parse_args([])
    for model, layers, stale in (("cnn", 3, True), ("mlp", 3, False)):
        config = run_config(args, model, layers, "dni", 0)
        saved = {k: v for k, v in config.to_dict().items() if k != "synth_type"}
        run_dir = tmp_path / model
        run_dir.mkdir()
        (run_dir / "config.json").write_text(json.dumps(saved))
        assert stale_settings(run_dir, config) == ({"synth_type": ("conv", "dense")} if stale else {})
    # Before --synth_label_map no dense cDNI synthesizer had the label map, which our preset again
    # leaves out: such an FCN run is fresh, one made while the map was the default is stale; a CNN
    # cDNI run (conv synthesizers, which have no such map) stays fresh whatever it recorded.
    for model, saved_map, stale in (("mlp", None, False), ("mlp", True, True), ("cnn", None, False),
                                    ("cnn", True, False)):
        config = run_config(args, model, 3, "cdni", 0)
        saved = {k: v for k, v in config.to_dict().items() if k != "synth_label_map"}
        if saved_map is not None:
            saved["synth_label_map"] = saved_map
        run_dir = tmp_path / f"{model}_cdni_{saved_map}"
        run_dir.mkdir()
        (run_dir / "config.json").write_text(json.dumps(saved))
        assert stale_settings(run_dir, config) == ({"synth_label_map": (True, False)} if stale else {})


def test_goal_lines_say_held_missed_or_not_measured():
    from experiments.table1_table import _goal_lines

    def cell(mean):
        return {"test_error": [mean] if mean is not None else [], "mean": mean}

    rows = [{"model": "mlp", "layers": n, "cells": {"backprop": cell(1.5), "dni": cell(1.5 + d), "cdni": cell(1.6)}}
            for n, d in ((3, 0.9), (4, 1.3), (5, 2.0), (6, 2.5))]
    rows.append({"model": "cnn", "layers": 3, "cells": {"backprop": cell(0.7), "dni": cell(None), "cdni": cell(0.8)}})
    meta = {"methods": ["backprop", "dni", "cdni"], "dataset": "mnist", "budget": "cpu", "val_sizes": [10_000],
            "hyperparameters": [{"num_epochs": 10}]}
    lines = _goal_lines({"meta": meta, "rows": rows})
    assert "- cDNI within 0.2 point of Bprop at FCN 3, 4, 5, 6: holds (FCN 3: +0.10, FCN 4: +0.10, FCN 5: +0.10, " \
           "FCN 6: +0.10)." in lines
    assert "- DNI within 1.0 point of Bprop at FCN 3, 4: missed (FCN 3: +0.90, FCN 4: +1.30)." in lines
    assert "- cDNI within 0.15 point of Bprop at CNN 3, 4: not measured at every depth (have 3) (CNN 3: +0.10)." in lines
    # the goals are set on MNIST, at the grid's epochs, under the split: no other table is judged by them
    for other in ({"dataset": "fashion_mnist"}, {"val_sizes": [0]}, {"hyperparameters": [{"num_epochs": 20}]}):
        assert _goal_lines({"meta": {**meta, **other}, "rows": rows}) == []


def test_the_training_set_line_says_what_the_runs_held_out():
    from experiments.table1_table import _training_set
    assert "first 50,000" in _training_set([10_000], "mnist") and "validation split" in _training_set([10_000], "mnist")
    assert "all 60,000" in _training_set([0], "mnist") and "nothing may be chosen" in _training_set([0], "mnist")
    assert "MIXED" in _training_set([0, 10_000], "mnist")


@pytest.mark.parametrize("command", ["table1", "deviations", "search", "stage_search", "synth_front"])
def test_a_stopped_grid_ends_in_one_line_with_the_signals_exit_code(command, tmp_path, monkeypatch, capsys):
    """SIGTERM reaches a grid as Stopped from its running run (checkpoint saved): one line, exit 143, no traceback."""
    import importlib

    from experiments import grid

    def stopped(config, threads):
        raise grid.Stopped(f"stopped by SIGTERM after step 3; checkpoint saved; continue with --resume {config.out}", 143)

    monkeypatch.setattr(grid, "train_one", stopped)
    module = importlib.import_module(f"experiments.{command}")
    with pytest.raises(SystemExit) as exit_:
        module.main(["--results", str(tmp_path), "--data_dir", str(tmp_path)])
    assert exit_.value.code == 143
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("rerun the same command to continue\n"), err
