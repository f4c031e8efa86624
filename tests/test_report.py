"""The generated sections of README.md and docs/*.md: every figure comes from a file, and nothing around the markers moves."""
import json

from experiments.report import main

README = """# title
text before
<!-- results:start -->
stale results
<!-- results:end -->
between
<!-- bench:start -->
stale bench
<!-- bench:end -->
<!-- rnn_table_f0.5:start -->
stale factor table
<!-- rnn_table_f0.5:end -->
<!-- cnn20/table1:start -->
stale longer table
<!-- cnn20/table1:end -->
text after
"""


def summary(run, method, acc, conditioned=False):
    return run, {"test_acc": acc, "epochs": 10, "seconds": 42.0, "method": method, "model_type": "mlp",
                 "conditioned": conditioned, "dataset": "mnist"}


def test_readme_sections_are_rewritten_from_the_result_files(tmp_path):
    results = tmp_path / "results"
    for run, s in (summary("mlp_backprop", "backprop", 0.985), summary("mlp_cdni", "dni", 0.9829, True)):
        (results / run).mkdir(parents=True)
        (results / run / "summary.json").write_text(json.dumps(s))
    (results / "bench.md").write_text("# experiments.bench: title\n\nhardware line\n\n## goals\n\n| goal | 1.87x | yes |\n")
    (results / "rnn_table_f0.5.md").write_text("# title\n\nfactor 0.5 rows\n")  # a factor in a file name
    (results / "cnn20").mkdir()
    (results / "cnn20" / "table1.md").write_text("# title\n\n20-epoch rows\n")  # a table of its own root
    readme = tmp_path / "README.md"
    readme.write_text(README)

    main(["--results", str(results), "--readme", str(readme)])
    text = readme.read_text()

    assert "stale" not in text
    assert "| mnist | mlp | cdni | 10 | 98.29% | -0.21 pt | 42 s | results/mlp_cdni |" in text
    assert "hardware line\n\n#### goals\n\n| goal | 1.87x | yes |\n<!-- bench:end -->" in text
    assert "experiments.bench: title" not in text
    assert "<!-- rnn_table_f0.5:start -->\nfactor 0.5 rows\n<!-- rnn_table_f0.5:end -->" in text
    assert "<!-- cnn20/table1:start -->\n20-epoch rows\n<!-- cnn20/table1:end -->" in text
    for kept in ("# title\ntext before\n<!-- results:start -->\n", "<!-- results:end -->\nbetween\n",
                 "<!-- cnn20/table1:end -->\ntext after\n"):
        assert kept in text


def test_docs_pages_are_rewritten_and_a_section_without_a_source_is_named(tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    (results / "table1.md").write_text("# title\n\ntable rows\n")
    readme, page = tmp_path / "README.md", tmp_path / "docs" / "table1.md"
    page.parent.mkdir()
    readme.write_text("front\n<!-- table1:start -->\nstale\n<!-- table1:end -->\n")
    page.write_text("# page\n<!-- table1:start -->\nstale\n<!-- table1:end -->\n"
                    "<!-- gone:start -->\nkept as it was\n<!-- gone:end -->\nend\n")

    main(["--results", str(results), "--docs", str(readme), str(page)])

    for text in (readme.read_text(), page.read_text()):
        assert "<!-- table1:start -->\ntable rows\n<!-- table1:end -->" in text
    assert page.read_text().endswith("<!-- gone:start -->\nkept as it was\n<!-- gone:end -->\nend\n")
    assert f"no {results / 'gone'}.md for section gone; left as it was" in capsys.readouterr().err


def test_docs_without_pages_rewrites_readme_and_every_docs_page(tmp_path, monkeypatch):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "bench.md").write_text("# title\n\nbench rows\n")
    (tmp_path / "docs").mkdir()
    for page in ("README.md", "docs/a.md", "docs/b.md"):
        (tmp_path / page).write_text("<!-- bench:start -->\nstale\n<!-- bench:end -->\n")
    monkeypatch.chdir(tmp_path)

    main(["--docs"])

    for page in ("README.md", "docs/a.md", "docs/b.md"):
        assert (tmp_path / page).read_text() == "<!-- bench:start -->\nbench rows\n<!-- bench:end -->\n"


def test_unlocking_tables_go_from_their_json_to_a_docs_section(tmp_path):
    """experiments.unlock_experiments writes results/<name>.md beside its JSON; experiments.report copies it, so no
    unlocking figure in docs/ is typed by hand."""
    from experiments.unlock_experiments import SETTINGS, write_markdown
    results = tmp_path / "results"
    results.mkdir()
    env = {"torch": "2.x", "cpu": "x86_64", "threads": 1}
    cell = lambda mean, std: {"test_error_mean": mean, "test_error_std": std, "seeds": 2}
    sweep = {"experiment": "update_prob", "budget": {"epochs": 4, "batch_size": 256, "steps": 936},
             "settings": SETTINGS, "seeds": [0, 1], "probs": [1.0, 0.2],
             "table": {"dni": {"1": cell(0.0764, 0.0021), "0.2": cell(0.1528, 0.0223)}},
             "runs": [], "wall_seconds": 1.0, "train_seconds_total": 631.0, "environment": env,
             "command": "python -m experiments.unlock_experiments update_prob "}
    unlock = {"experiment": "complete unlock", "budget": {"epochs": 12, "batch_size": 256, "steps": 2808},
              "settings": SETTINGS, "environment": env, "wall_seconds": 1.0,
              "command": "python -m experiments.unlock_experiments unlock --epochs 12 --name unlock_long",
              "runs": [{"method": "cdni", "unlock": "complete", "seed": 0, "test_error": 0.0216,
                        "train_seconds": 232.5}]}
    (results / "update_prob.json").write_text(json.dumps(sweep))
    (results / "unlock_long.json").write_text(json.dumps(unlock))
    write_markdown(results / "update_prob.json")
    write_markdown(results / "unlock_long.json")
    page = tmp_path / "unlocking.md"
    page.write_text("<!-- update_prob:start -->\n<!-- update_prob:end -->\n"
                    "<!-- unlock_long:start -->\n<!-- unlock_long:end -->\n")

    main(["--results", str(results), "--docs", str(page)])
    text = page.read_text()

    assert "| dni | 7.64 ± 0.21 | 15.28 ± 2.23 |" in text
    assert "| cdni | complete | 2.16% | 232 s |" in text
    assert "Command: `python -m experiments.unlock_experiments unlock --epochs 12 --name unlock_long`" in text
