"""charlm.py's language model: it learns, it keeps the best validation parameters, its run folder."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dnilab.charlm import CharLMConfig, bits_per_char, build, run, streams

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def corpus(tmp_path):
    """A tiny corpus in the fortunes layout: two plain files (and an index file to skip)."""
    folder = tmp_path / "fortunes"
    folder.mkdir()
    (folder / "a").write_text("the cat sat on the mat.\n%\n" * 200)
    (folder / "b").write_text("a dog ate the hat.\n%\n" * 200)
    (folder / "a.dat").write_bytes(b"\x00\x01")
    return folder


def tiny(corpus, tmp_path, **changes):
    settings = dict(corpus=str(corpus), hidden=32, embedding=8, batch_size=4, chars=3000, eval_every=1000,
                    eval_streams=2, lr=1e-2, out=str(tmp_path / "run"))
    return CharLMConfig(**{**settings, **changes})


@pytest.mark.parametrize("method", ["bptt", "dni", "dni_aux"])
def test_every_method_learns_the_text_and_writes_its_run_folder(corpus, tmp_path, method):
    config = tiny(corpus, tmp_path, method=method)
    summary = run(config, log=lambda _: None)
    folder = Path(config.out)
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["chars"] for r in rows] == [1008, 2004, 3000]  # windows of 12: the first past each 1000
    assert rows[-1]["val_bits"] < min(0.3, rows[0]["val_bits"])  # far below log2(vocab), about 4.2 bits, and falling
    assert summary["val_bits"] == min(r["val_bits"] for r in rows)  # test is read at the best validation
    assert summary["test_bits"] < 2.0 and (folder / "env.json").exists() and (folder / "summary.json").exists()
    with pytest.raises(Exception, match="already|overwrite"):
        run(config, log=lambda _: None)  # a finished run is not replaced


def test_bits_per_char_is_the_cross_entropy_in_bits_over_every_next_character(corpus, tmp_path):
    config = tiny(corpus, tmp_path, method="bptt")
    model, _, _ = build(config, vocab=5, device=torch.device("cpu"))
    with torch.no_grad():
        model.readout.weight.zero_()
        model.readout.bias.zero_()  # uniform over 5 characters: log2(5) bits each
    ids = torch.randint(0, 5, (101,))
    assert bits_per_char(model, ids, count=4, chunk=7) == pytest.approx(torch.log2(torch.tensor(5.0)).item())
    assert streams(ids, 4).shape == (25, 4) and streams(ids, 4)[:, 1].tolist() == ids[25:50].tolist()


def test_the_script_refuses_an_unknown_method_in_one_line():
    out = subprocess.run([sys.executable, "charlm.py", "--method", "lstm"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "lstm" in out.stderr


def fake_run(out, method, T, seed, test_bits, seconds_per_mchar):
    folder = Path(out, "charlm", f"{method}_T{T}_s{seed}")
    folder.mkdir(parents=True)
    config = dict(CharLMConfig(method=method, truncation=T, seed=seed).__dict__, out=str(folder))
    (folder / "metrics.jsonl").write_text(json.dumps(dict(kind="eval", chars=1000, val_bits=test_bits + 0.1)) + "\n")
    (folder / "summary.json").write_text(json.dumps(dict(config=config, test_bits=test_bits, val_bits=test_bits + 0.1,
                                                         chars=1000, seconds_per_mchar=seconds_per_mchar)))


def test_the_table_reads_its_run_folders_and_picks_the_equal_compute_bptt_by_seconds(tmp_path):
    from experiments.charlm_table import markdown, table_dict
    for seed, bits in ((0, 2.0), (1, 2.2)):
        fake_run(tmp_path, "bptt", 3, seed, bits, seconds_per_mchar=10.0)
    fake_run(tmp_path, "bptt", 5, 0, 1.9, seconds_per_mchar=14.0)
    fake_run(tmp_path, "dni", 3, 0, 1.95, seconds_per_mchar=13.0)
    table = table_dict(tmp_path, "python -m experiments.charlm_table --table_only")
    assert table["equal_compute"]["truncation"] == 5  # 14 s is nearer DNI's 13 than BPTT at T = 3's 10
    text = markdown(table)
    assert "| 3 | 2.100 ± 0.141 (val 2.200 ± 0.141; seeds [0, 1]) | 1.950 (val 2.050; seeds [0]) | not run | yes | — |" \
        in text
    assert "every run saw 1,000 training characters" in text


def test_the_aux_weight_is_chosen_on_seed_100_by_validation_alone(tmp_path):
    from dataclasses import asdict
    from experiments.charlm_table import TableConfig, choice_configs, choose_aux
    table = TableConfig(out=str(tmp_path), choose_aux="1,0.1,0.01", table_only=True)
    configs = choice_configs(table)
    assert [(c.seed, c.truncation, c.aux_weight) for c in configs] == [(100, 3, 0.01), (100, 3, 0.1), (100, 3, 1.0)]
    for c, val, test in zip(configs, (1.90, 1.85, 1.95), (1.5, 2.5, 1.0)):  # test would pick another weight
        Path(c.out).mkdir(parents=True)
        Path(c.out, "summary.json").write_text(json.dumps(dict(config=asdict(c), val_bits=val, test_bits=test)))
    assert choose_aux(table, ["--choose_aux", "1,0.1,0.01"], log=lambda _: None) == 0.1
    assert "Chosen: 0.1." in (tmp_path / "charlm_aux_choice.md").read_text()
    assert not (tmp_path / "charlm").exists()  # the choice's runs are not the table's
    with pytest.raises(Exception, match="at most|1 to 4"):
        choice_configs(TableConfig(choose_aux="1,2,3,4,5"))


def test_a_missing_corpus_is_one_line_and_leaves_no_run_folder(tmp_path):
    out = subprocess.run([sys.executable, "charlm.py", "--corpus", str(tmp_path / "none"), "--out", str(tmp_path / "run")],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "fortunes" in out.stderr
    assert not (tmp_path / "run").exists()
