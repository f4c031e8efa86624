"""Tests of the two-timescale system (dnilab.timescales; the paper's multi-network system): the
two clocks, no true gradient across the DNI interface, backprop against autograd through both
networks, the synthesizer fitting its target, two processes against one, the run folder and
one-line errors. Small random digits stand in for MNIST, so the whole file runs in seconds."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

from dni.errors import DNIError
from dnilab.cli import parse_config
from dnilab.data import Data
from dnilab.timescales import (TimescalesConfig, a_tick_dni, build, load_digits, odd_count, position_context,
                               span_step, synthesizer_step)
from dnilab.timescales_train import run, train, train_two_processes

STREAMS = 4


def fake_load(name, root, device):
    """A stand-in for dnilab.data.load_data: 400 training and 100 test 'digits' of random pixels."""
    g = torch.Generator().manual_seed(0)
    return Data(train_x=torch.rand(400, 1, 28, 28, generator=g), train_y=torch.randint(10, (400,), generator=g),
                test_x=torch.rand(100, 1, 28, 28, generator=g), test_y=torch.randint(10, (100,), generator=g),
                num_classes=10)


def tiny(**kwargs):
    settings = dict(span=3, streams=STREAMS, ticks=12, encoder=16, hidden_a=8, hidden_b=8, synth_width=16,
                    eval_every=6, val_size=60, val_streams=4, out="unused")
    return TimescalesConfig(**{**settings, **kwargs})


def span_data(config, seed=1):
    g = torch.Generator().manual_seed(seed)
    xs = torch.rand(config.span, config.streams, 784, generator=g)          # (T, S, 784)
    digits = torch.randint(10, (config.span, config.streams), generator=g)  # (T, S)
    return xs, digits


def zero_states(config, dtype=torch.float32):
    return torch.zeros(config.streams, config.hidden_a, dtype=dtype), torch.zeros(config.streams, config.hidden_b, dtype=dtype)


@pytest.mark.parametrize("method, a_steps, m_steps", [("dni", 12, 4), ("backprop", 4, 0), ("frozen", 0, 0),
                                                      ("own_task", 12, 0)])
def test_two_clocks(method, a_steps, m_steps):
    """A steps every tick (DNI, own task), B every T ticks; under backprop A waits for B: once per span."""
    config = tiny(method=method)
    _, summary = train(config, load_digits(config, fake_load), log=lambda line: None)
    assert (summary["a_steps"], summary["b_steps"], summary["m_steps"]) == (a_steps, 12 // 3, m_steps)


def test_dni_tick_gradient_is_the_synthetic_one():
    """Under DNI, A's parameter gradients at a tick are those of <a_t, g_hat_t / S> alone."""
    config = tiny(method="dni")
    system = build(config)
    torch.nn.init.normal_(system.synthesizer.net[-1].weight)               # a synthesizer that says something
    xs, _ = span_data(config)
    state, _ = zero_states(config)
    reference = copy.deepcopy(system.a)
    system.opt_a.step = lambda: None                                        # keep the gradients to read them
    a_tick_dni(system, xs[1], state, 1, config.span)
    a_t = reference(xs[1], state)
    g_hat = system.synthesizer(a_t.detach(), position_context(1, config.span, STREAMS))
    expected = torch.autograd.grad(a_t, list(reference.parameters()), g_hat / STREAMS, allow_unused=True)
    for p, e in zip(system.a.parameters(), expected):
        torch.testing.assert_close(p.grad, e) if e is not None else None


def test_no_true_gradient_crosses_the_interface():
    """Poison B: within a span A's updates under DNI are the same, whatever B is; only the
    synthesizer, which learns from B's gradient, changes."""
    config = tiny(method="dni")
    xs, digits = span_data(config)
    results = []
    for poison in (False, True):
        system = build(config)
        torch.manual_seed(5)
        torch.nn.init.normal_(system.synthesizer.net[-1].weight, std=0.1)  # so A moves in this span
        if poison:
            with torch.no_grad():
                for p in system.b.parameters():
                    p.mul_(-37.0).add_(3.0)
        span_step(system, config, xs, digits, *zero_states(config))
        results.append(system)
    for p, q in zip(results[0].a.parameters(), results[1].a.parameters()):
        assert torch.equal(p, q)
    assert any(not torch.equal(p, q) for p, q in zip(results[0].synthesizer.parameters(),
                                                     results[1].synthesizer.parameters()))
    assert not torch.equal(next(iter(results[0].a.parameters())), next(iter(build(config).a.parameters())))


@pytest.mark.parametrize("task", ["count", "parities"])
def test_backprop_equals_autograd_through_both(task):
    """The backprop span (A's graph, B's backward, A's backward from B's gradient) is one backward
    of B's loss through B and A: the same parameters after an SGD step (float64)."""
    config = tiny(method="backprop", task=task)
    system = build(config)
    system.a.double()
    system.b.double()
    system.opt_a = torch.optim.SGD(system.a.parameters(), lr=0.5)
    system.opt_b = torch.optim.SGD(system.b.parameters(), lr=0.5)
    a, b = copy.deepcopy(system.a), copy.deepcopy(system.b)
    xs, digits = span_data(config)
    xs = xs.double()
    a_state, b_state = zero_states(config, torch.float64)
    span_step(system, config, xs, digits, a_state, b_state)

    state, outputs = a_state, []
    for x in xs:
        state = a(x, state)
        outputs.append(state)
    logits, _ = b(torch.stack(outputs, 1), b_state)
    if task == "count":
        F.cross_entropy(logits, odd_count(digits.T)).backward()
    else:  # the T parities' cross-entropies, summed over the span, averaged over streams
        parities = digits.T % 2                                                          # (S, T)
        sum(F.cross_entropy(logits[:, 2 * t:2 * t + 2], parities[:, t]) for t in range(config.span)).backward()
    with torch.no_grad():
        for p in list(a.parameters()) + list(b.parameters()):
            if p.grad is not None:
                p -= 0.5 * p.grad
    for got, want in zip(list(system.a.parameters()) + list(system.b.parameters()),
                         list(a.parameters()) + list(b.parameters())):
        torch.testing.assert_close(got, want)


def test_synthesizer_fits_its_target():
    """Trained on one span again and again, the synthesizer predicts S times B's gradient."""
    config = tiny(method="dni", sg_lr=1e-2)
    system = build(config)
    g = torch.Generator().manual_seed(2)
    triggers = torch.randn(STREAMS, config.span, config.hidden_a, generator=g)
    contexts = torch.stack([position_context(t, config.span, STREAMS) for t in range(config.span)], 1)
    grad = torch.randn(STREAMS, config.span, config.hidden_a, generator=g) / STREAMS
    first, _ = synthesizer_step(system, triggers, contexts, grad)
    for _ in range(400):
        last, cos = synthesizer_step(system, triggers, contexts, grad)
    assert last < first / 100 and cos > 0.99
    prediction = system.synthesizer(triggers.flatten(0, 1), contexts.flatten(0, 1)).view_as(grad)
    torch.testing.assert_close(prediction, grad * STREAMS, atol=0.05, rtol=0.05)


def test_two_processes_backprop_equals_one_process():
    """Split across two processes (A waits for B's gradient), backprop is the same run, to the bit;
    under DNI the clocks are the same as in one process."""
    config = tiny(method="backprop", ticks=9)
    data = load_digits(config, fake_load)
    one, _ = train(config, data, log=lambda line: None)
    two, summary = train_two_processes(config, data, log=lambda line: None)
    for p, q in zip(list(one.a.parameters()) + list(one.b.parameters()),
                    list(two.a.parameters()) + list(two.b.parameters())):
        assert torch.equal(p, q)
    assert (summary["a_steps"], summary["b_steps"]) == (3, 3)


def test_two_processes_dni_clocks():
    config = tiny(method="dni", processes=2, ticks=9)
    _, summary = train_two_processes(config, load_digits(config, fake_load), log=lambda line: None)
    assert (summary["a_steps"], summary["b_steps"]) == (9, 3) and summary["m_steps"] <= 3


def test_run_folder_and_no_overwrite(tmp_path):
    config = tiny(method="dni", out=str(tmp_path))
    summary = run(config, log=lambda line: None, load=fake_load)
    folder = tmp_path / config.name
    assert {"config.json", "env.json", "command.txt", "metrics.jsonl", "summary.json"} <= {p.name for p in folder.iterdir()}
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["tick"] for r in rows] == [6, 12] and 0 <= summary["test_acc"] <= 1
    with pytest.raises(DNIError, match="already holds a finished run"):
        run(tiny(method="dni", out=str(tmp_path)), log=lambda line: None, load=fake_load)


@pytest.mark.parametrize("argv, words", [(["--span", "0"], "must be > 0"), (["--method", "sgd"], "invalid choice"),
                                         (["--ticks", "3", "--span", "4"], "less than one span"),
                                         (["--processes", "3"], "invalid choice"),
                                         (["--name", "a/b"], "plain folder name")])
def test_bad_input_is_one_line(argv, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(TimescalesConfig, argv, prog="timescales.py")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and words in err and err.count("\n") == 1


def test_table_only_reads_the_run_folders(tmp_path):
    """--table_only trains nothing: it tabulates the finished runs it finds, with their own settings."""
    from experiments.timescales_table import TableConfig, make_table
    for method in ("dni", "frozen"):
        run(tiny(method=method, out=str(tmp_path / "timescales")), log=lambda line: None, load=fake_load)
    table = make_table(TableConfig(results=str(tmp_path), table_only=True, ticks=999, target=0.1), log=lambda line: None)
    assert [(c["task"], c["T"], c["method"], c["ticks"]) for c in table["cells"]] == [("count", 3, "dni", 12), ("count", 3, "frozen", 12)]
    assert "| count | 3 | DNI" in (tmp_path / "timescales.md").read_text()
    with pytest.raises(DNIError, match="no finished run"):
        make_table(TableConfig(results=str(tmp_path / "empty"), table_only=True), log=lambda line: None)


def test_two_processes_say_so_when_b_dies(monkeypatch):
    """A does not wait forever on a process B that has exited: one line names it."""
    import os
    import dnilab.timescales_train as timescales
    monkeypatch.setattr(timescales, "_b_worker", lambda *args: os._exit(3))   # forked: B runs the patched one
    config = tiny(method="backprop", processes=2)
    with pytest.raises(DNIError, match=r"process B exited \(code 3\)"):
        train_two_processes(config, load_digits(config, fake_load), log=lambda line: None)


def fake_run(results, stem, *, seed, val_acc, span=2, method="dni", dni_lr=1e-5, task="count"):
    """A finished run folder as the table reads it (summary and metrics), trained by no one."""
    import dataclasses
    config = TimescalesConfig(method=method, span=span, seed=seed, dni_lr=dni_lr, task=task, processes=2,
                              out=str(results / stem))
    folder = results / stem / config.name
    folder.mkdir(parents=True)
    env = dict(cpu="test", torch=torch.__version__, git_commit="0" * 40, git_dirty=False)
    summary = dict(config=dataclasses.asdict(config), env=env, val_acc=val_acc, test_acc=val_acc, train_s=1.0)
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "metrics.jsonl").write_text(json.dumps(dict(tick=config.ticks, time=1.0, val_acc=val_acc)) + "\n")


def choice_tables(results, first_seed, accuracies):
    """For each rate, the --dni_only table of seeds first_seed..+2 at T = 2, 4, 8 from fake runs whose
    final validation accuracy is the rate's; returns the table files' names."""
    from experiments.timescales_table import TableConfig, make_table
    names = []
    for rate, acc in accuracies.items():
        config = TableConfig(results=str(results), first_seed=first_seed, dni_only=True, dni_lr=rate, table_only=True)
        for span in (2, 4, 8):
            for seed in config.seed_list:
                fake_run(results, config.stem, seed=seed, val_acc=acc, span=span, dni_lr=rate)
        fake_run(results, config.stem, seed=first_seed, val_acc=0.0, method="frozen")   # not a DNI row: not shown
        table = make_table(config, log=lambda line: None)
        assert {c["method"] for c in table["cells"]} == {"dni"}
        names.append(config.stem)
    return names


def test_the_dni_rate_is_chosen_on_the_seeds_s_tables_alone(tmp_path):
    """--choose_lr reads the --dni_only tables of --first_seed's seeds, one per rate, and picks the
    best mean validation accuracy (ties: the smaller rate); the reported table and other seeds' are
    never read, and no table of a non-zero first seed takes the reported table's name."""
    from experiments.timescales_table import main
    assert choice_tables(tmp_path, 100, {1e-4: 0.5, 1e-5: 0.7, 1e-6: 0.6}) == \
        ["timescales_lr0.0001_s100", "timescales_lr1e-05_s100", "timescales_lr1e-06_s100"]
    choice_tables(tmp_path, 200, {1e-4: 0.9, 1e-5: 0.1})             # other seeds favour 1e-4: never read
    for seed in range(3):                                              # so do the reported seeds
        fake_run(tmp_path, "timescales", seed=seed, val_acc=0.99, dni_lr=1e-4)
    assert not (tmp_path / "timescales.json").exists()
    argv = ["--results", str(tmp_path), "--first_seed", "100", "--task", "count"]
    assert main([*argv, "--choose_lr", "1e-4,1e-5,1e-6"]) == 1e-5
    choice = json.loads((tmp_path / "timescales_lr_choice_count.json").read_text())
    assert choice["chosen"] == 1e-5 and choice["first_seed"] == 100 and choice["scores"]["1e-06"] == 0.6
    assert "| 1e-05 | 0.7000 |" in (tmp_path / "timescales_lr_choice_count.md").read_text()
    choice_tables(tmp_path, 300, {1e-4: 0.5, 1e-6: 0.5})
    assert main(["--results", str(tmp_path), "--first_seed", "300", "--choose_lr", "1e-4,1e-6"]) == 1e-6


@pytest.mark.parametrize("flags, words", [
    (["--choose_lr", "1e-4,1e-5"], "give --first_seed (e.g. 100)"),
    (["--first_seed", "100", "--choose_lr", "1e-3,1e-4,1e-5,1e-6,1e-7"], "at most 4 rates, each > 0"),
    (["--first_seed", "100", "--choose_lr", "0,1e-5"], "at most 4 rates, each > 0"),
    (["--first_seed", "100", "--choose_lr", "1e-5,1e-6"],
     "timescales_lr1e-06_s100.json is missing: train it with python -m experiments.timescales_table --task count "
     "--first_seed 100 --dni_only --dni_lr 1e-06"),
    (["--first_seed", "100", "--seeds", "2", "--choose_lr", "1e-5"],
     "--first_seed 100 --seeds 2 --dni_only --dni_lr 1e-05"),
    (["--dni_only"], "give --first_seed (e.g. 100)")])
def test_a_choice_that_cannot_be_made_is_one_line(tmp_path, capsys, flags, words):
    from experiments.timescales_table import main
    choice_tables(tmp_path, 100, {1e-5: 0.5})
    with pytest.raises(SystemExit) as exit_info:
        main(["--results", str(tmp_path), *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and words in err and err.count("\n") == 1
