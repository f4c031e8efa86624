"""The README's generated sections: the results table, made from the run folders'
summary.json files, and the markdown that the experiment scripts write to results/:
bench.md (`python -m dni.bench`), table1.md and fashion_table1.md (`python -m dni.table1`),
rnn_table.md, rnn_table_N<N>.md and rnn_table_f<F>.md (`python -m dni.recurrent_table`): the README section
<!-- name:start --> ... <!-- name:end --> gets results/<name>.md (a name may hold a folder:
<!-- cnn20/table1:start --> gets results/cnn20/table1.md, a table made with --results results/cnn20).

    python -m dni.report                 # print the table of results/*/summary.json
    python -m dni.report --readme README.md   # also rewrite every section between the README's markers

No figure in the README is typed by hand: each comes from a run folder or a benchmark file.
"""
import argparse
import json
import platform
import re
from pathlib import Path

from dni.runs import write_text

METHOD_ORDER = {"backprop": 0, "dni": 1, "cdni": 2}


def load_summaries(results_dir):
    """Every finished run's summary under results_dir, with its folder name."""
    summaries = []
    for path in sorted(Path(results_dir).glob("*/summary.json")):
        summary = json.loads(path.read_text())
        summary["run"] = path.parent.name
        env = path.parent / "env.json"
        summary["env"] = json.loads(env.read_text()) if env.exists() else {}
        summaries.append(summary)
    return summaries


def method_name(summary):
    return "cdni" if summary.get("conditioned") else summary["method"]


def results_table(summaries):
    """Markdown: test accuracy of each run, with the gap to backprop of the same model and data."""
    baseline = {(s["dataset"], s["model_type"], s["epochs"]): s["test_acc"]
                for s in summaries if s["method"] == "backprop"}
    rows = ["| data | model | method | epochs | test accuracy | vs backprop | train time | run |",
            "|---|---|---|---|---|---|---|---|"]
    key = lambda s: (s["dataset"], s["model_type"], METHOD_ORDER.get(method_name(s), 9), s["run"])
    for s in sorted(summaries, key=key):
        base = baseline.get((s["dataset"], s["model_type"], s["epochs"]))
        gap = "" if base is None or s["method"] == "backprop" else f"{100 * (s['test_acc'] - base):+.2f} pt"
        rows.append(f"| {s['dataset']} | {s['model_type']} | {method_name(s)} | {s['epochs']} | "
                    f"{100 * s['test_acc']:.2f}% | {gap} | {s['seconds']:.0f} s | results/{s['run']} |")
    envs = {(s["env"].get("torch"), s["env"].get("device"), s["env"].get("threads")) for s in summaries}
    hardware = "; ".join(f"torch {t}, {d}, {n} threads" for t, d, n in sorted(envs, key=str))
    rows.append(f"\nMeasured on {platform.machine()} ({hardware}); train time excludes evaluation.")
    return "\n".join(rows)


def section_text(path):
    """A results markdown file without its title, its headings one level under the README's."""
    return Path(path).read_text().split("\n", 1)[1].strip().replace("\n## ", "\n#### ")


def rewrite_readme(readme, section, text):
    """Put `text` between the README's <!-- section:start --> and <!-- section:end --> markers."""
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    whole = Path(readme).read_text()
    head, rest = whole.split(start, 1)
    _, tail = rest.split(end, 1)
    write_text(Path(readme), f"{head}{start}\n{text}\n{end}{tail}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results", help="folder of run folders")
    parser.add_argument("--readme", default=None, help="rewrite this README's table between its markers")
    args = parser.parse_args(argv)
    table = results_table(load_summaries(args.results))
    print(table)
    if args.readme:
        rewrite_readme(args.readme, "results", table)
        for name in re.findall(r"<!-- ([\w./]+):start -->", Path(args.readme).read_text()):
            path = Path(args.results) / f"{name}.md"
            if path.exists():
                rewrite_readme(args.readme, name, section_text(path))


if __name__ == "__main__":
    main()
