"""experiments.synth_front: one synthesizer setting changed per run, and its rule read off validation."""
import json
from pathlib import Path

from experiments.synth_front import SIZES, collect, markdown, parse_args, run_config


def test_each_run_differs_from_the_default_in_the_synthesizer_size_alone(tmp_path):
    args = parse_args(["--results", str(tmp_path)])
    for method in ("dni", "cdni"):
        base = run_config(args, method, SIZES[-1], 0).to_dict()
        for units in SIZES:
            config = run_config(args, method, units, 0).to_dict()
            moved = {k for k in config if config[k] != base[k]} - {"out"}
            assert moved <= {"synth_layers", "synth_width"}, (method, units, moved)
            assert config["num_epochs"] == 10 and config["val_size"] == 10000


def test_a_cheaper_size_within_the_best_spread_is_flagged_and_test_is_never_read(tmp_path):
    args = parse_args(["--results", str(tmp_path), "--methods", "dni"])
    errors = {0: (5.0, 5.2, 5.1), 256: (4.0, 4.2, 4.1), 512: (3.95, 4.05, 4.0), 1024: (3.9, 4.1, 4.0),
              2048: (3.9, 4.0, 3.95)}  # 512 is within 2048's spread and costs less
    for units in SIZES:
        for seed, error in enumerate(errors[units]):
            folder = Path(run_config(args, "dni", units, seed).out)
            folder.mkdir(parents=True)
            (folder / "summary.json").write_text(json.dumps(dict(
                val_acc=1 - error / 100, test_acc=0.5 + units / 1e4, seconds=10 * (1 + units / 256), epochs=10)))
    table = collect(args)
    assert table["verdict"]["dni"] == dict(best=2048, bar=3.95 + 0.05, cheapest_within=512, default=2048, change=True)
    assert "the default (1 x 2048) should change to it" in markdown(table)
    assert "test" not in json.dumps(table["rows"])
