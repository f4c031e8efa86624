"""The evaluation protocol: a validation split no step trains on, choices that read it
alone, and the paper's own model one flag away (`--preset paper`)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from experiments import search
from dnilab.config import Config
from dnilab.data import Data, batches, split_validation
from dni.errors import DNIError
from dni.synthesizers import ConvSynthesizer, DenseSynthesizer
from dnilab.parts import build_net


def numbered_data(n=600, test=50):
    """Images whose every pixel is the image's index, so a batch tells which images it holds."""
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 2, 2).clone()  # (N, 1, 2, 2)
    return Data(train_x=x, train_y=torch.arange(n) % 10, test_x=x[:test], test_y=torch.arange(test) % 10,
                num_classes=10)


def test_the_split_is_the_last_images_and_no_training_batch_holds_one():
    data = split_validation(numbered_data(), 100)
    assert data.val_x[:, 0, 0, 0].tolist() == list(range(500, 600))  # the last 100, in order
    for seed in (0, 1, 2):  # whatever the seed, every epoch draws from the first 500 only
        seen = torch.cat([x[:, 0, 0, 0] for x, _ in batches(data.train_x, data.train_y, 32, torch.Generator().manual_seed(seed))])
        assert seen.max() < 500 and len(seen.unique()) == len(seen) == 15 * 32
    again = split_validation(numbered_data(), 100)  # no seed or device enters the cut
    assert torch.equal(again.val_x, data.val_x) and torch.equal(again.train_y, data.train_y)
    whole = split_validation(numbered_data(), 0)
    assert len(whole.train_x) == 600 and len(whole.val_x) == 0


@pytest.mark.parametrize("size", [600, 601])
def test_a_split_as_large_as_the_training_set_is_refused(size):
    with pytest.raises(DNIError, match="--val_size must be in"):
        split_validation(numbered_data(), size)


def test_a_negative_split_is_one_line_and_exit_2():
    done = subprocess.run([sys.executable, "main.py", "--val_size", "-1"], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "--val_size must be >= 0" in done.stderr


def first_synthetic_gradient(net, shape, context):
    synthesizer = net.synthesizers[0].eval()
    return synthesizer(torch.randn(4, *shape), context)


def test_paper_preset_fcn_is_section_3_1_and_nothing_of_ours():
    for conditioned, hidden in ((False, 1), (True, 0)):
        config = Config(preset="paper", model_type="mlp", conditioned=conditioned)
        assert (config.lr, config.sg_lr, config.schedule, config.batch_size) == (3e-5, 3e-5, "paper", 256)
        net = build_net(config, (1, 28, 28), 10)
        for stage in net.stages[:-1]:  # Linear(256) -> BatchNorm -> ReLU
            assert [type(m) for m in stage if not isinstance(m, nn.Flatten)] == [nn.Linear, nn.BatchNorm1d, nn.ReLU]
            assert stage[-3].out_features == 256
        synthesizer = net.synthesizers[0]
        assert isinstance(synthesizer, DenseSynthesizer) and synthesizer.context_map is None
        layers = list(synthesizer.net)
        assert len(layers) == 3 * hidden + 1 and all(m.out_features == 1024 for m in layers[:-1:3])
        assert layers[0].in_features == 256 + 10 * conditioned  # cDNI: the one-hot label concatenated
        context = torch.eye(10)[:4] if conditioned else None
        assert torch.count_nonzero(first_synthetic_gradient(net, (256,), context)) == 0  # zero-initialised output


def test_paper_preset_cnn_is_section_3_1_and_nothing_of_ours():
    config = Config(preset="paper", model_type="cnn", conditioned=True, depth=2)
    net = build_net(config, (1, 28, 28), 10)
    convs = [m for m in net.stages.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(128, (5, 5))] * 2
    pools = [type(m) for m in net.stages.modules() if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d))]
    assert pools == [nn.MaxPool2d, nn.AvgPool2d]  # max then average pooling
    synthesizer = net.synthesizers[0]
    assert isinstance(synthesizer, ConvSynthesizer)
    assert synthesizer.position is None and synthesizer.context_map is None  # label planes only
    assert synthesizer.net[0].in_channels == 128 + 10 and synthesizer.net[0].kernel_size == (5, 5)
    assert torch.count_nonzero(first_synthetic_gradient(net, (128, 14, 14), torch.eye(10)[:4])) == 0
    dni = Config(preset="paper", model_type="cnn", depth=2)
    assert (dni.synth_layers, dni.synth_channels, dni.synth_type) == (1, 128, "conv")


def test_a_flag_typed_beats_the_preset():
    config = Config(preset="paper", model_type="mlp", lr=1e-3, num_epochs=3, synth_layers=2)
    assert (config.lr, config.num_epochs, config.synth_layers, config.sg_lr) == (1e-3, 3, 2, 3e-5)
    assert Config().synth_position_map and Config().schedule == "cosine"  # ours is unchanged by its absence


def fake_search_run(root, name, val_acc, test_acc):
    run = root / "search" / name
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"val_acc": val_acc, "test_acc": test_acc, "seconds": 1.0}))


def test_the_search_ranks_by_validation_and_never_reads_test(tmp_path):
    args = search.parse_args(["--methods", "dni", "--synth_layers", "0", "--sg_lrs", "1e-3", "1e-2", "--lrs", "1e-3",
                              "--results", str(tmp_path)])
    names = [search.run_name(*point, seed=0) for point in search.points(args)]
    fake_search_run(tmp_path, names[0], val_acc=0.97, test_acc=0.99)  # better on test, worse on validation
    fake_search_run(tmp_path, names[1], val_acc=0.98, test_acc=0.90)
    table = search.collect(args)
    assert table["best"]["dni"]["sg_lr"] == 1e-2 and table["best"]["dni"]["mean"] == pytest.approx(2.0)
    assert "test" not in json.dumps(table["rows"])  # nothing of the test set reaches the ranking
    (tmp_path / "search" / names[1] / "summary.json").write_text(json.dumps({"val_acc": None, "test_acc": 0.9,
                                                                            "seconds": 1.0}))
    with pytest.raises(DNIError, match="no validation accuracy"):  # a --val_size 0 run cannot be chosen
        search.collect(args)


def test_each_deviation_row_changes_one_setting_of_its_baseline(tmp_path):
    from experiments import deviations
    from experiments.grid import CPU_SETTINGS
    args = deviations.parse_args(["--results", str(tmp_path)])
    seen = set()
    for model, method, baseline, row, change in deviations.grid(args):
        config = deviations.run_config(args, model, method, baseline, row, change, 0).to_dict()
        base = deviations.run_config(args, model, method, baseline, "paper preset", {}, 0).to_dict()
        moved = {k for k in config if config[k] != base[k]} - {"out"}
        if change is None:
            assert config["preset"] == "ours" and moved
        else:
            allowed = set(change) if isinstance(change, dict) else {change}
            assert (row == "paper preset") == (not moved) and moved <= allowed, (baseline, row, moved)
        assert config["val_size"] == 10000 and config["num_epochs"] == 10
        seen.add((baseline, config["lr"] if row == "paper preset" else None, config["schedule"]))
    # the "paper" baseline is the preset itself, its optimiser included; the "table" one trains as Table 1
    paper = deviations.run_config(args, "mlp", "dni", "paper", "paper preset", {}, 0)
    assert (paper.lr, paper.sg_lr, paper.schedule) == (3e-5, 3e-5, "paper")
    table = deviations.run_config(args, "mlp", "dni", "table", "paper preset", {}, 0)
    assert (table.lr, table.sg_lr, table.schedule) == (CPU_SETTINGS["mlp"]["lr"],) * 2 + ("cosine",)
    rows = {row for *_, row, _ in deviations.grid(args)}
    assert {"our stage rate", "our schedule", "our sg_lr"} <= rows


def test_deviation_rows_say_how_many_seeds_they_hold_their_stage_rate_and_which_command_trained_them(tmp_path):
    from experiments import deviations
    args = deviations.parse_args(["--results", str(tmp_path), "--models", "mlp"])
    for seed, acc in ((0, 0.98), (1, 0.97)):  # the paper preset's row has two of three seeds
        config = deviations.run_config(args, "mlp", "dni", "table", "paper preset", {}, seed)
        run_dir = Path(config.out)
        run_dir.mkdir(parents=True)
        # trained when the table's rate was another: the row says the rate its runs had
        (run_dir / "config.json").write_text(json.dumps({**config.to_dict(), "lr": 3e-3}))
        (run_dir / "summary.json").write_text(json.dumps({"val_acc": acc, "test_acc": 0.5, "seconds": 20.0,
                                                          "epochs": 10}))
        (run_dir / "command.txt").write_text("/venv/bin/python /repo/experiments/deviations.py --models mlp\n")
    text = deviations.markdown(deviations.collect(args))
    assert "| FCN 4 | DNI | paper preset | 3e-3 | 2.50 ± 0.71 (2 of 3 seeds) |" in text
    assert "| FCN 4 | DNI | our sg_lr |  | not measured |" in text
    assert "Runs trained by `python -m experiments.deviations --models mlp`" in text



def test_a_deviation_row_at_another_stage_rate_than_its_baseline_shows_no_difference(tmp_path):
    """A rerun at a new table rate lands row by row: until a row's baseline is at the same rate,
    the row shows its error but no difference, since it would differ in two settings."""
    from experiments import deviations
    args = deviations.parse_args(["--results", str(tmp_path), "--models", "mlp", "--methods", "dni"])

    def fake(baseline, row, change, lr, acc):
        for seed in (0, 1, 2):
            config = deviations.run_config(args, "mlp", "dni", baseline, row, change, seed)
            Path(config.out).mkdir(parents=True)
            (Path(config.out) / "config.json").write_text(json.dumps({**config.to_dict(), "lr": lr}))
            (Path(config.out) / "summary.json").write_text(json.dumps({"val_acc": acc, "seconds": 10.0,
                                                                       "epochs": 10}))

    fake("table", "paper preset", {}, 1e-3, 0.95)
    fake("table", "our sg_lr", "sg_lr", 1e-3, 0.96)
    fake("table", "2048-unit hidden layer", dict(synth_width=2048), 3e-3, 0.97)
    fake("paper", "paper preset", {}, 3e-5, 0.90)
    fake("paper", "our stage rate", "lr", 1e-3, 0.93)
    text = deviations.markdown(deviations.collect(args))
    assert "| FCN 4 | DNI | our sg_lr | 1e-3 | 4.00 ± 0.00 | -1.00 |" in text
    assert "| FCN 4 | DNI | 2048-unit hidden layer | 3e-3 | 3.00 ± 0.00 |  |" in text
    assert "| FCN 4 | DNI | our stage rate | 1e-3 | 7.00 ± 0.00 | -3.00 |" in text  # the rate is the row's change

def test_unlock_sweeps_hold_out_the_split_and_retrain_runs_made_without_it():
    from argparse import Namespace
    from experiments.unlock_experiments import base_config, same_settings
    config = base_config(Namespace(epochs=4, batch_size=256, data_dir="data"), method="dni", seed=0, out="x")
    assert config.val_size == 10_000 and not config.synth_label_map
    saved = config.to_dict()
    assert same_settings(saved, config)
    before_the_split = {k: v for k, v in saved.items() if k != "val_size"}  # trained on all 60k
    assert not same_settings(before_the_split, config)
