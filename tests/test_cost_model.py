"""The cost model's arithmetic (experiments.cost_model.predict) on costs we choose."""
import pytest

from experiments.cost_model import BATCH, predict


def costs(K=2):
    stage = {"F": 1.0, "B": 2.0, "O": 0.5, **{f"F/{m}": 1.0 / m for m in (2, 4, 8)},
             **{f"B/{m}": 2.0 / m for m in (2, 4, 8)}}
    return {"stages": [stage] * K, "synthesizers": {"dni": [0.25] * K}, "partition": [[k, k + 1] for k in range(K)],
            "cut_bytes": 1000}


FREE = (0.0, float("inf"))  # a link that costs nothing


def test_locked_backprop_adds_every_stage_and_two_messages_per_cut():
    assert predict(costs(4), FREE, "locked") == pytest.approx(BATCH / (4 * 3.5))
    slow = (0.1, 1000.0)  # 0.1 s + 1 s a message of 1000 bytes
    assert predict(costs(2), slow, "locked") == pytest.approx(BATCH / (2 * 3.5 + 2 * 1.1))


def test_pipelines_pay_the_bubble_and_dni_the_slowest_worker():
    # m micro-batches of linear cost: (m + K - 1) slots of 3 / m, then one Adam step per worker
    assert predict(costs(4), FREE, "1f1b", 2) == pytest.approx(BATCH / ((2 + 3) * 1.5 + 0.5))
    assert predict(costs(4), FREE, "gpipe", 8) == pytest.approx(BATCH / ((8 + 3) * 3 / 8 + 0.5))
    # every worker but the last runs its stage's synthesizer; the pace is the slowest worker's
    assert predict(costs(4), FREE, "dni") == pytest.approx(BATCH / (3.5 + 0.25))
    # messages cost their copy (bytes / bandwidth), not the latency
    assert predict(costs(2), (5.0, 1000.0), "dni") == pytest.approx(BATCH / (3.5 + 0.25 + 2 * 1.0))


def test_a_missing_input_is_one_line_naming_the_command_that_makes_it(tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    for flags, command in (([], "python -m experiments.bench"), (["--table_only"], "python -m experiments.cost_model")):
        out = subprocess.run([sys.executable, "-m", "experiments.cost_model", "--results", str(tmp_path), *flags],
                             cwd=root, capture_output=True, text=True)
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and command in out.stderr
