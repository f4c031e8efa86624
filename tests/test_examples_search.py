"""The examples' validation search (experiments/examples_search.py): its rule on fabricated run
folders, its files rebuilt byte for byte without a test field, the grid taking its choices; and the
examples' flags it varies: they reach the synthesizers, heads and optimizer groups, and their
defaults train bit for bit as the examples did before the flags existed."""
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dni
from dnilab.example_runs import parameter_groups
from experiments import examples_search as search
from test_examples import ROOT, TINY_GPT, example, run, tiny_corpus


def fabricate(results, example_name, method, scores):
    """Finished run folders of the search: {candidate: (validation metric, cut parameters)}; each
    summary also holds a test score, which nothing may read."""
    for candidate, (metric, cost) in scores.items():
        folder = results / search.folder_name(example_name, method, candidate)
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"method": method}))
        val = {"val_acc": 1 - metric} if example_name == "resnet_fashion" else {"val_bpc": metric}
        (folder / "summary.json").write_text(json.dumps({**val, "test_acc": 0.5, "test_bpc": 9.0, "seconds": 12.0,
                                                         "cut_parameters": cost}))


def test_the_rule_takes_the_lowest_validation_metric_ties_to_the_cheaper_and_waits_for_every_candidate(tmp_path):
    results = tmp_path / "examples_search"
    names = list(search.CANDIDATES["resnet_fashion"]["dni"])
    # dni: 'deep' is lowest; cdni: a tie at 0.10 between 'default' (listed earlier, dearer) and 'rate_x3' (cheaper)
    fabricate(results, "resnet_fashion", "dni", {c: (0.20 - 0.01 * (c == "deep"), 100) for c in names})
    fabricate(results, "resnet_fashion", "cdni", {c: (0.10 if c in ("default", "rate_x3") else 0.3,
                                                      50 if c == "rate_x3" else 100) for c in names})
    fabricate(results, "char_gpt", "dni", {c: (float("nan") if c == "linear" else 2.5 + (c != "narrow"), 10)
                                           for c in names})
    fabricate(results, "char_gpt", "local", {"default": (2.0, 1)})  # one of three: nothing chosen yet
    record = search.collect(results)
    resnet, gpt = record["examples"]["resnet_fashion"]["methods"], record["examples"]["char_gpt"]["methods"]
    assert (resnet["dni"]["chosen"], resnet["dni"]["flags"]) == ("deep", {"synth_layers": 2})
    assert (resnet["cdni"]["chosen"], resnet["cdni"]["flags"]) == ("rate_x3", {"sg_lr": 3e-3})
    assert gpt["dni"]["chosen"] == "narrow"  # not-a-number loses to every number
    assert resnet["local"]["chosen"] is None and gpt["local"]["chosen"] is None and gpt["local"]["finished"] == 1
    assert search.choose({"a": (1.0, 5), "b": (1.0, 5)}) == "a"  # a full tie: the one listed first
    text = search.markdown(record)
    assert "Nothing chosen yet for cdni (0 of 6 finished), local (1 of 3 finished)." in text
    assert "| dni | deep | --synth_layers 2 | 19.00% | 100 | 12 s | **chosen** |" in text


def test_table_only_rebuilds_the_files_byte_for_byte_and_they_hold_no_test_field(tmp_path):
    results = tmp_path / "examples_search"
    fabricate(results, "char_gpt", "local", {c: (2.0 + i / 10, i) for i, c in
                                             enumerate(search.CANDIDATES["char_gpt"]["local"])})
    outputs = [tmp_path / "examples_search.md", tmp_path / "examples_search.json"]
    made = []
    for _ in range(2):
        done = run(["-m", "experiments.examples_search", "--table_only", "--results", str(results)], cwd=ROOT,
                   timeout=60)
        assert done.returncode == 0, done.stderr
        made.append([p.read_bytes() for p in outputs])
        for p in outputs:
            p.unlink()
    assert made[0] == made[1]
    record = json.loads(made[0][1])
    assert record["examples"]["char_gpt"]["methods"]["local"]["chosen"] == "default"
    assert "test" not in made[0][1].decode() and "test" not in made[0][0].decode().replace("never measures test", "")
    # every run the search would train leaves test unmeasured
    assert all(args[args.index("--eval_test") + 1] == "False" for _, args in search.runs(results))
    assert all(len(c) <= 8 for methods in search.CANDIDATES.values() for c in methods.values())


def test_the_grid_takes_the_searchs_choices_and_keeps_the_defaults_until_then(tmp_path):
    settings = tmp_path / "choice.json"
    settings.write_text(json.dumps({"examples": {"resnet_fashion": {"methods": {
        "dni": {"chosen": "narrow", "flags": {"synth_width": 16}}, "cdni": {"chosen": None, "flags": None}}}}}))
    done = run(["-m", "experiments.examples_grid", "--list", "--results", str(tmp_path / "r"),
                "--settings", str(settings)], cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    dni_lines = [x for x in done.stdout.splitlines() if "resnet_fashion.py --method dni " in x]
    assert len(dni_lines) == 3 and all("--synth_width 16 --out" in x for x in dni_lines)
    assert sum("--synth_width" in x for x in done.stdout.splitlines()) == 3
    assert "for resnet_fashion cdni, resnet_fashion local, char_gpt dni," in done.stderr
    assert "resnet_fashion dni," not in done.stderr
    settings.write_text("{not json")
    done = run(["-m", "experiments.examples_grid", "--list", "--settings", str(settings)], cwd=ROOT, timeout=60)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and "--settings" in done.stderr


def test_bad_input_is_refused_in_one_line(capsys):
    for name, argv in [("resnet_fashion", ["--synth_width", "-1"]), ("char_gpt", ["--synth_layers", "-2"]),
                       ("resnet_fashion", ["--method", "local", "--sg_lr", "1e-3"]),
                       ("char_gpt", ["--sg_lr", "-1"]), ("char_gpt", ["--head_width", "0"])]:
        with pytest.raises(SystemExit) as stop:
            example(name).main(argv)
        err = capsys.readouterr().err.strip()
        assert stop.value.code == 2 and len(err.splitlines()) == 1 and "error:" in err, (name, argv, err)
        if "local" in argv:
            assert "--sg_lr sets the synthesizers' rate: --method local has none" in err
    for args in (["--jobs", "0"], ["--list", "--table_only"]):
        with pytest.raises(SystemExit) as stop:
            search.main(args)
        assert stop.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


def test_the_flags_reach_the_synthesizers_heads_and_optimizer_groups():
    gpt, resnet = example("char_gpt"), example("resnet_fashion")
    linear = resnet.ResNet18(method="cdni", cuts=1, synth_width=0).cuts[0].synthesizer
    assert [type(m) for m in linear.net] == [nn.Conv2d]  # no hidden layer
    deep = resnet.ResNet18(method="dni", cuts=1, synth_width=16, synth_layers=2).cuts[0].synthesizer
    assert [m.out_channels for m in deep.net if isinstance(m, nn.Conv2d)] == [16, 16, 128]
    seq = gpt.GPT(vocab=11, d_model=32, n_head=2, method="dni", cuts=1, synth_width=0).cuts[0].synthesizer
    assert isinstance(seq, dni.SequenceSynthesizer) and [type(m) for m in seq.net] == [nn.Linear]
    head = resnet.ResNet18(method="local", cuts=1, head_layers=1, head_width=64).cuts[0].head
    assert [m.out_channels for m in head if isinstance(m, nn.Conv2d)] == [64] and head[-1].in_features == 64
    head = gpt.GPT(vocab=11, d_model=32, n_head=2, method="local", cuts=1, head_layers=2, head_width=8).cuts[0].head
    assert [m.out_features for m in head if isinstance(m, nn.Linear)] == [8, 8, 11]
    model = gpt.GPT(vocab=11, d_model=32, n_head=2, method="dni", cuts=1)
    optimizer = torch.optim.AdamW(parameter_groups(model, 1e-3, 3e-3), lr=1e-3)
    rest, synth = optimizer.param_groups
    assert synth["lr"] == 3e-3 and rest["lr"] == 1e-3
    assert {id(p) for p in synth["params"]} == {id(p) for p in model.cuts.parameters()}
    assert len(rest["params"]) + len(synth["params"]) == len(list(model.parameters()))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=4)
    optimizer.step()
    schedule.step()
    assert math.isclose(synth["lr"] / rest["lr"], 3.0)  # the schedule scales both alike


def _two_steps(model, optimizer, batches, loss_of):
    for batch in batches:
        loss = loss_of(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.state_dict()


@pytest.mark.parametrize("method", ["cdni", "local"])
def test_resnet_defaults_train_bit_for_bit_as_before_the_flags(method):
    resnet = example("resnet_fashion")
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(2)]
    settings = resnet.Settings(method=method, cuts=1, device="cpu")
    torch.manual_seed(0)
    new = resnet.build_model(settings)
    torch.manual_seed(0)
    ref = resnet.ResNet18(method="backprop")  # today's code path: the net, then the cut after layer2
    shape = (128, 4, 4)
    ref.cuts = nn.ModuleList([dni.DNI(shape=shape, context_features=10) if method == "cdni" else dni.LocalLoss(
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(shape[0], 10)))])
    ref.cut_after, ref.method = (2,), method
    assert str(new) == str(ref)
    loss_of = lambda m, b: F.cross_entropy(m(b[0], b[1]), b[1])  # noqa: E731
    optimizer = torch.optim.Adam(parameter_groups(new, 1e-3, settings.sg_lr), lr=1e-3)
    after_new = _two_steps(new, optimizer, batches, loss_of)
    after_ref = _two_steps(ref, torch.optim.Adam(ref.parameters(), lr=1e-3), batches, loss_of)
    for name, value in after_ref.items():
        torch.testing.assert_close(after_new[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("method", ["dni", "local"])
def test_gpt_defaults_train_bit_for_bit_as_before_the_flags(method):
    gpt = example("char_gpt")
    settings = gpt.Settings(method=method, cuts=1, n_layer=2, d_model=32, n_head=2, block_size=16, device="cpu")
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 11, (4, 17), generator=g) for _ in range(2)]
    torch.manual_seed(0)
    new = gpt.build_model(settings, vocab=11)
    torch.manual_seed(0)
    ref = gpt.GPT(vocab=11, block_size=16, n_layer=2, d_model=32, n_head=2)  # today's: the model, then the cut
    ref.cuts = nn.ModuleList([
        dni.DNI(shape=(16, 32), width=512, context_features=0, loss_scale=lambda h: h.shape[0] * h.shape[1])
        if method == "dni" else
        dni.LocalLoss(nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 11)), loss_fn=gpt.token_cross_entropy)])
    ref.cut_after, ref.method = (1,), method
    assert str(new) == str(ref)
    loss_of = lambda m, b: F.cross_entropy(m(b[:, :-1], b[:, 1:]).flatten(0, 1), b[:, 1:].flatten())  # noqa: E731
    after_new = _two_steps(new, torch.optim.AdamW(parameter_groups(new, 1e-3, settings.sg_lr), lr=1e-3), batches,
                           loss_of)
    after_ref = _two_steps(ref, torch.optim.AdamW(ref.parameters(), lr=1e-3), batches, loss_of)
    for name, value in after_ref.items():
        torch.testing.assert_close(after_new[name], value, rtol=0, atol=0, msg=name)


def test_a_search_run_records_its_flags_and_cut_parameters_and_measures_no_test(tmp_path):
    out = tmp_path / "run"
    example("char_gpt").main(["--method", "cdni", "--cuts", "1", "--steps", "2", "--eval_every", "2",
                              "--corpus", str(tiny_corpus(tmp_path / "corpus")), "--eval_test", "False",
                              "--synth_layers", "2", "--sg_lr", "3e-3", "--out", str(out), *TINY_GPT])
    config = json.loads((out / "config.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert (config["synth_layers"], config["sg_lr"], config["eval_test"]) == (2, 3e-3, False)
    assert summary["test_bpc"] is None and summary["val_bpc"] > 0 and summary["cut_parameters"] > 0
    assert search.validation(out, "char_gpt") == (summary["val_bpc"], summary["cut_parameters"], summary["seconds"])
