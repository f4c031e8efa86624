"""Stages on one GPU each (experiments.cost_model_cuda), without a GPU: the refusal, the arithmetic
on a cuda.json we write, the markdown without and with it, and the timing code on the CPU."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments import cost_model_cuda as cm_cuda
from experiments.cost_model import BATCH, WallClock, _median_time, cost_model, parse_args, stage_times

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "results" / "cost_model"


def stage():
    return {"F": 1.0, "B": 2.0, "O": 0.5, **{f"F/{m}": 1.0 / m for m in (2, 4, 8, 16, 32)},
            **{f"B/{m}": 2.0 / m for m in (2, 4, 8, 16, 32)}}


def fabricated_cuda():
    """Two stages of F 1 s, B 2 s, O 0.5 s, linear in the micro-batch; synthesizers 0.25 s (DNI) and
    0.5 s (cDNI); a cut of 1000 bytes; each pinned copy 0.5 s + n / 1000 B/s."""
    costs = {"stages": [stage()] * 2, "synthesizers": {"dni": [0.25] * 2, "cdni": [0.5] * 2},
             "partition": [[0, 1], [1, 2]], "cut_bytes": 1000}
    copy = {"alpha": 0.5, "beta": 1000.0, "seconds": {}}
    return {"command": "python -m experiments.cost_model --measure_cuda", "gpu": "Fake GPU", "torch": "0",
            "cuda": "0", "cudnn": 0, "env": {"git_commit": "abcdef0", "git_dirty": False}, "repeats": 3,
            "batch": BATCH, "costs": {"wide": costs}, "deep": {"two-unit stages": dict(costs, synthesizers={"dni": [0.25] * 2})},
            "copies": {k: copy for k in ("h2d_pinned", "d2h_pinned", "h2d_pageable", "d2h_pageable")}}


LOOPBACK = (1.0, 1000.0)  # the measured link of our fabricated cost_model.json: 1 s + n / 1000 B/s


def test_measure_cuda_is_refused_in_one_line_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = subprocess.run([sys.executable, "-m", "experiments.cost_model", "--measure_cuda", "--results", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "--measure_cuda needs a CUDA device" in out.stderr and not (tmp_path / "cuda.json").exists()


def test_a_host_staged_link_adds_the_copies_to_the_network_in_series():
    alpha, beta = cm_cuda.staged_link(fabricated_cuda()["copies"], LOOPBACK)
    assert alpha == pytest.approx(2.0) and beta == pytest.approx(1000.0 / 3)  # 0.5 + 1 + 0.5; n/1000 three times


def test_predictions_of_a_small_case_by_hand():
    rows = cm_cuda.predictions(fabricated_cuda(), LOOPBACK)
    staged = {r["link"]: r for r in rows["bench"]}["host-staged, loopback (measured)"]
    # a message of 1000 B costs 2 + 3 = 5 s; locked: both stages and two messages
    assert staged["locked"] == pytest.approx(BATCH / (2 * 3.5 + 2 * 5))
    # 1F1B at m = 8: 9 slots of 3/8 s, one Adam step, two messages of 125 B (2 + 0.375 s); m = 8 is the best
    assert staged["microbatches"] == 8 and staged["one_f_one_b"] == pytest.approx(BATCH / (9 * 3 / 8 + 0.5 + 2 * 2.375))
    # DNI: each worker's stage and synthesizer, and the copy time (not the latency) of its two messages
    assert staged["dni"] == pytest.approx(BATCH / (3.5 + 0.25 + 2 * 3.0))
    assert staged["cdni"] == pytest.approx(BATCH / (3.5 + 0.5 + 2 * 3.0))
    nvlink = {r["link"]: r for r in rows["bench"]}["NVLink by NCCL (modelled)"]
    assert nvlink["dni"] == pytest.approx(BATCH / 3.75, rel=1e-6)  # 1000 B at 150 GB/s is nothing
    deep = {(r["K"], r["link"]): r for r in rows["deep"]}
    # K = 4: a middle worker sends and receives four messages a step
    assert deep[4, "host-staged, 10 GbE"]["dni"] == pytest.approx(BATCH / (3.75 + 4 * 1000 * (2 / 1000 + 1 / 1.25e9)))
    assert len(rows["deep"]) == 4 * 4 and {r["link"] for r in rows["deep"]} == set(cm_cuda.links(fabricated_cuda(), LOOPBACK))


def table_only(results):
    cost_model(parse_args(["--results", str(results), "--table_only"]))
    return (results / "cost_model.md").read_text()


def test_without_cuda_json_the_table_is_as_committed_and_with_it_gains_one_section(tmp_path, capsys):
    shutil.copy(COMMITTED / "cost_model.json", tmp_path / "cost_model.json")
    committed = (COMMITTED / "cost_model.md").read_text()
    if (COMMITTED / "cuda.json").exists():  # the committed table has the section: rebuild it, then take it away
        shutil.copy(COMMITTED / "cuda.json", tmp_path / "cuda.json")
        assert table_only(tmp_path) == committed
        (tmp_path / "cuda.json").unlink()
        committed = committed[:committed.index("\n## Stages on one GPU each")]
    assert table_only(tmp_path) == committed
    (tmp_path / "cuda.json").write_text(json.dumps(fabricated_cuda()))
    link = json.loads((tmp_path / "cost_model.json").read_text())["link"]
    with_cuda = table_only(tmp_path)
    assert with_cuda.startswith(committed) and with_cuda.count("\n## ") == committed.count("\n## ") + 1
    assert "NVLink by NCCL is modelled, not measured" in with_cuda and "Fake GPU" in with_cuda
    expected = cm_cuda.predictions(fabricated_cuda(), (link["alpha"], link["beta"]))["bench"][0]
    assert f"| wide | host-staged, loopback (measured) | {expected['locked']:.0f} |" in with_cuda


class ScriptedClock:
    """A clock that runs fn and reads its times from a list: what _median_time does with them shows."""

    def __init__(self, times, warmup=2):
        self.times, self.warmup, self.calls = list(times), warmup, 0

    def __call__(self, fn):
        fn()
        self.calls += 1
        return self.times.pop(0)


def test_the_timer_warms_up_then_takes_the_median_of_its_clock():
    ran = []
    clock = ScriptedClock([5.0, 1.0, 3.0])
    assert _median_time(lambda: ran.append(1), 3, clock) == 3.0
    assert len(ran) == 2 + 3 and clock.calls == 3  # two warm-up calls, untimed


def test_stage_times_take_backward_as_forward_and_backward_less_forward():
    stage = torch.nn.Linear(4, 4)
    costs, h = stage_times(stage, torch.randn(8, 4), last=False, repeats=1, clock=ScriptedClock([1.0, 3.0, 0.5], 0))
    assert costs == {"F": 1.0, "B": 2.0, "O": 0.5} and h.shape == (8, 4)


def test_cuda_clock_synchronises_before_and_reads_the_events_in_seconds(monkeypatch):
    log = []

    class Event:
        def __init__(self, enable_timing):
            assert enable_timing
            self.name = "start" if not any(e.startswith("new") for e in log) else "end"
            log.append(f"new {self.name}")

        def record(self):
            log.append(f"record {self.name}")

        def synchronize(self):
            log.append(f"synchronize {self.name}")

        def elapsed_time(self, end):
            return 250.0  # ms

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device: log.append("synchronize device"))
    seconds = cm_cuda.CudaClock(torch.device("cuda"))(lambda: log.append("fn"))
    assert seconds == 0.25
    assert log[2:] == ["synchronize device", "record start", "fn", "record end", "synchronize end"]


def test_the_measurement_runs_on_the_cpu_with_the_schema_the_model_reads():
    sizes = [4096, 65536]
    copies = cm_cuda.measure_copies(torch.device("cpu"), sizes, 2, WallClock(), pinned_kinds=(False,))
    assert set(copies) == {"h2d_pageable", "d2h_pageable"}
    # two sizes on a busy CPU fit no line worth asserting; the times and their keys are what the fit reads
    assert all(set(c["seconds"]) == {"4096", "65536"} and min(c["seconds"].values()) > 0 and c["alpha"] >= 0
               for c in copies.values())
    out = cm_cuda.measure(torch.device("cpu"), 1, WallClock(), pinned_kinds=(False,), models=(),
                          deep_models=[("tiny", 32, 0)])
    base = out["deep"]["tiny"]
    assert base["cut_bytes"] == BATCH * 32 * 4 and {"F", "B", "O", "F/32", "B/32"} <= set(base["stages"][0])
    assert len(base["synthesizers"]["dni"]) == 2 and out["batch"] == BATCH
