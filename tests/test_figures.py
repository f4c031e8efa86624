"""Every percentage in README.md and docs/*.md comes from a file under results/.

A percentage is held when
- its text ("98.49%") appears in a results/ .md, .json or .txt file, or
- a results/ file named in the same paragraph (a blank-line-delimited block; a folder stands for
  the files under it) holds it at its printed precision: a .md/.txt file as the bare number, a
  .json file as an accuracy or error value (a key with "acc" or "err" in its name, or the
  mean/std beside one) that prints as the figure read as a percentage, a fraction, or an error
  (100 - x).
Numbers in a .json file count only where the paragraph names the file: MNIST accuracies crowd
97-99.5%, so a typed two-decimal figure matches some value in some run folder about one time in
three, and a check that accepts any of them catches nothing.

Generated sections (<!-- name:start --> ... <!-- name:end -->) are skipped by the scan, and instead
must be exactly what `python -m experiments.report` makes of results/ today. Figures quoted from
published reproductions are held like any other: results/published.md lists each with its source
(`python -m experiments.published`).
"""
import json
import re
from pathlib import Path

import pytest

from experiments.report import SECTION, default_pages, section_source

ROOT = Path(__file__).resolve().parent.parent
PERCENT = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)\s?%")
RESULT_PATH = re.compile(r"results/[\w./-]*\w")
METRIC_KEY = re.compile(r"acc|err")
GENERATED = re.compile(r"<!-- ([\w./]+):start -->.*?<!-- \1:end -->", re.S)
TEXT_SUFFIXES = (".md", ".json", ".txt")

def paragraphs(text):
    """(first line number, paragraph) for every blank-line-delimited block, generated sections blanked
    out (their line numbers kept)."""
    text = GENERATED.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    blocks, start, lines = [], 1, []
    for number, line in enumerate(text.split("\n"), 1):
        if line.strip():
            if not lines:
                start = number
            lines.append(line)
        elif lines:
            blocks.append((start, "\n".join(lines)))
            lines = []
    if lines:
        blocks.append((start, "\n".join(lines)))
    return blocks


def metric_values(obj, metric=False):
    """The numbers of a JSON object that are accuracies or errors: under a key naming acc or err, or
    the mean/std of a record that holds such a key."""
    if isinstance(obj, dict):
        has_metric = any(METRIC_KEY.search(k) for k in obj)
        for key, value in obj.items():
            yield from metric_values(value, metric or bool(METRIC_KEY.search(key))
                                     or (has_metric and key in ("mean", "std")))
    elif isinstance(obj, list):
        for value in obj:
            yield from metric_values(value, metric)
    elif metric and isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield float(obj)


def printed(figure):
    """'98.49' -> 2: the decimals a figure was printed with."""
    return len(figure.split(".")[1]) if "." in figure else 0


class Results:
    """What the files under a results folder hold, read once."""

    def __init__(self, root):
        self.root = Path(root)
        self.texts = {}
        for path in sorted(self.root.rglob("*")):
            if path.suffix in TEXT_SUFFIXES and path.is_file():
                self.texts[path] = path.read_text(errors="replace")
        self.percent_texts = {f"{m.group(1)}%" for text in self.texts.values() for m in PERCENT.finditer(text)}

    def files(self, named):
        """The text files a path named in a page stands for: the file, or every file under the folder."""
        path = self.root.parent / named
        return [p for p in self.texts if p == path or path in p.parents]

    def holds(self, figure, path):
        """Whether the file at `path` holds `figure` (digits, no %) at its printed precision."""
        text = self.texts[path]
        if f"{figure}%" in text or f"{figure} %" in text:
            return True
        if path.suffix != ".json":
            return re.search(rf"(?<![\d.]){re.escape(figure)}(?![\d])(?!\.\d)", text) is not None
        decimals = printed(figure)
        if decimals == 0:  # a whole percentage must appear as text: any value near it would do otherwise
            return False
        try:
            values = metric_values(json.loads(text))
        except json.JSONDecodeError:
            return False
        return any(f"{x:.{decimals}f}" == figure for v in values for x in (v, 100 * v, 100 - v, 100 * (1 - v)))


def unsourced(page, results):
    """'page:line: figure' for every percentage of `page` outside its generated sections that no
    results file holds."""
    found = []
    for line, block in paragraphs(Path(page).read_text()):
        named = [p for name in RESULT_PATH.findall(block) for p in results.files(name)]
        for match in PERCENT.finditer(block):
            figure = match.group(1)
            text = f"{figure}%"
            if text in results.percent_texts or any(results.holds(figure, p) for p in named):
                continue
            found.append(f"{Path(page).name}:{line + block[:match.start()].count(chr(10))}: {text}")
    return found


# ------------------------------------------------------------------ the checker itself

def test_checker_flags_a_typed_figure_and_accepts_a_sourced_one(tmp_path):
    results = tmp_path / "results"
    (results / "run").mkdir(parents=True)
    (results / "run" / "summary.json").write_text(json.dumps({"test_acc": 0.9728, "seconds": 97.31}))
    (results / "table.md").write_text("# t\n\n| FCN | 1.63 ± 0.03 |\n\nbench: blocked 3%\n")
    (results / "sweep.json").write_text(json.dumps({"rows": [{"test_error": [2.5], "mean": 2.61, "lr": 0.0131}]}))
    page = tmp_path / "page.md"
    page.write_text(
        "DNI reached 97.28% (results/run).\n\n"            # accuracy from test_acc, file named: held
        "Its error was 2.72% (results/run/summary.json).\n\n"  # the same run as an error (100 - x): held
        "DNI reached 97.29% (results/run).\n\n"            # typed: no value prints so
        "DNI reached 97.31% (results/run).\n\n"            # 'seconds' is not an accuracy
        "DNI reached 97.28%.\n\n"                          # held by a file the paragraph does not name
        "The mean, 2.61%, and 1.31% (results/sweep.json).\n\n"  # mean beside test_error: held; lr: not
        "FCN 6 1.63% (results/table.md); 1.6% there.\n\n"  # bare number in a named .md; wrong precision
        "The pipeline waits 3%.\n\n"                       # the same text in a results file: held
        "<!-- t:start -->\n| 12.34% |\n<!-- t:end -->\n\n"  # generated: not scanned here
        "Our DNI: 2.8% error.\n")                          # in no results file
    found = unsourced(page, Results(results))
    assert found == ["page.md:5: 97.29%", "page.md:7: 97.31%", "page.md:9: 97.28%", "page.md:11: 1.31%",
                     "page.md:13: 1.6%", "page.md:21: 2.8%"]


def test_paragraph_line_numbers_survive_generated_sections():
    text = "a\n<!-- x:start -->\nb\n\nc\n<!-- x:end -->\n\nd 5%\ne\n"
    assert paragraphs(text) == [(1, "a"), (8, "d 5%\ne")]


# ------------------------------------------------------------------ the pages

PAGES = default_pages(ROOT)


@pytest.fixture(scope="module")
def results():
    return Results(ROOT / "results")


def test_every_percentage_in_the_pages_is_held_by_a_results_file(results):
    found = [f for page in PAGES for f in unsourced(page, results)]
    assert not found, ("percentages no file under results/ holds (name the results file in the paragraph, "
                       "or drop the figure):\n" + "\n".join(found))


def test_generated_sections_are_what_dni_report_makes_of_results():
    stale = []
    for page in PAGES:
        for match in GENERATED.finditer(page.read_text()):
            name = match.group(1)
            body = match.group(0)[len(f"<!-- {name}:start -->\n"):-len(f"\n<!-- {name}:end -->")]
            source = section_source(name, ROOT / "results")
            if source is None:
                stale.append(f"{page.name}: section {name} has no results/{name}.md")
            elif body != source:
                stale.append(f"{page.name}: section {name} differs from results/{name}.md")
    assert not stale, "run `python -m experiments.report --docs`:\n" + "\n".join(stale)


def test_readme_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert {"table1.md", "unlocking.md", "recurrent.md", "pipeline.md", "search.md", "deviations.md"} <= set(pages)
    assert [p for p in pages if f"(docs/{p})" not in readme] == []


def test_every_section_marker_is_closed():
    for page in PAGES:
        text = page.read_text()
        assert sorted(SECTION.findall(text)) == sorted(m.group(1) for m in GENERATED.finditer(text)), page.name
