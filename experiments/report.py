"""The generated sections of README.md and docs/*.md: the results table, made from the run folders'
summary.json files, and the markdown that the experiment scripts write to results/:
bench.md (`python -m experiments.bench`), table1.md and fashion_table1.md (`python -m experiments.table1`),
rnn_table.md, rnn_table_N<N>.md and rnn_table_f<F>.md (`python -m experiments.recurrent_table`),
search.md and search_cnn.md (`python -m experiments.search`), update_prob*.md and unlock*.md
(`python -m experiments.unlock_experiments`). A page's section <!-- name:start --> ... <!-- name:end -->
gets results/<name>.md (a name may hold a folder: <!-- cnn20/table1:start --> gets
results/cnn20/table1.md, a table made with --results results/cnn20); the section named results
gets the table of results/*/summary.json.

    python -m experiments.report                      # print the table of results/*/summary.json
    python -m experiments.report --readme README.md   # also rewrite every section between README.md's markers
    python -m experiments.report --docs               # the same for README.md and every docs/*.md
    python -m experiments.report --docs docs/table1.md docs/unlocking.md   # only these pages

No figure in a generated section is typed by hand: each comes from a run folder or a results file.
tests/test_figures.py checks that the pages' sections are what this module makes of results/.
"""
import argparse
import json
import platform
import re
import sys
from pathlib import Path

from dnilab.runs import write_text
from experiments.provenance import modified_tree_line

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


def results_table(summaries, results_dir="results"):
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
    # The machine comes from the runs' env.json, so the table reads the same wherever it is rebuilt.
    machines = ", ".join(sorted({s["env"]["cpu"] for s in summaries if s["env"].get("cpu")})) or platform.machine()
    rows.append(f"\nMeasured on {machines} ({hardware}); train time excludes evaluation.")
    modified = modified_tree_line(Path(results_dir) / s["run"] for s in summaries)
    if modified:
        rows.append(modified)
    return "\n".join(rows)


def section_text(path):
    """A results markdown file without its title, its headings one level under the README's."""
    return Path(path).read_text().split("\n", 1)[1].strip().replace("\n## ", "\n#### ")


SECTION = re.compile(r"<!-- ([\w./]+):start -->")


def rewrite_readme(readme, section, text):
    """Put `text` between the page's <!-- section:start --> and <!-- section:end --> markers."""
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    whole = Path(readme).read_text()
    head, rest = whole.split(start, 1)
    _, tail = rest.split(end, 1)
    write_text(Path(readme), f"{head}{start}\n{text}\n{end}{tail}")


def section_source(name, results="results"):
    """The text a section called `name` should hold, made from `results`; None if nothing there makes it."""
    if name == "results":
        return results_table(load_summaries(results), results)
    path = Path(results) / f"{name}.md"
    return section_text(path) if path.exists() else None


def rewrite_page(page, results="results"):
    """Rewrite every generated section of one markdown page from `results`; returns the sections left
    as they were because results/ holds no file for them."""
    missing = []
    for name in SECTION.findall(Path(page).read_text()):
        text = section_source(name, results)
        if text is None:
            missing.append(name)
        else:
            rewrite_readme(page, name, text)
    return missing


def default_pages(root="."):
    """README.md and every page under docs/, the pages `--docs` rewrites when given none."""
    return [Path(root) / "README.md"] + sorted((Path(root) / "docs").glob("*.md"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results", help="folder of run folders and results files")
    parser.add_argument("--readme", default=None, help="rewrite the generated sections of this page")
    parser.add_argument("--docs", nargs="*", default=None,
                        help="rewrite the generated sections of these pages (none named: README.md and docs/*.md)")
    args = parser.parse_args(argv)
    print(results_table(load_summaries(args.results), args.results))
    pages = ([args.readme] if args.readme else []) + (
        (args.docs or default_pages()) if args.docs is not None else [])
    for page in pages:
        for name in rewrite_page(page, args.results):
            print(f"{page}: no {Path(args.results) / name}.md for section {name}; left as it was", file=sys.stderr)


if __name__ == "__main__":
    main()
