"""The README's generated sections: every figure comes from a file, and nothing around the markers moves."""
import json

from dni.report import main

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
    (results / "bench.md").write_text("# dni.bench: title\n\nhardware line\n\n## goals\n\n| goal | 1.87x | yes |\n")
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
    assert "dni.bench: title" not in text
    assert "<!-- rnn_table_f0.5:start -->\nfactor 0.5 rows\n<!-- rnn_table_f0.5:end -->" in text
    assert "<!-- cnn20/table1:start -->\n20-epoch rows\n<!-- cnn20/table1:end -->" in text
    for kept in ("# title\ntext before\n<!-- results:start -->\n", "<!-- results:end -->\nbetween\n",
                 "<!-- cnn20/table1:end -->\ntext after\n"):
        assert kept in text
