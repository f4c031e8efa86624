"""Every figure in README.md and docs/*.md comes from the results file named beside it.

Figures are found by unit: percentages ("98.49%"), point gaps ("+0.86 pt", "2.17 points", a
signed decimal, in a table or in prose: "+0.86", "-0.37") and bits ("3.067 bits per character", "0.45 bits per step",
"bits/char"). A figure is held when a results/ file or run folder named in the same paragraph or
table (a blank-line-delimited block) holds it at the rounding shown:
- a .md/.txt file: the figure's text (a whole number only with its unit, e.g. "3%", since a bare
  "3" is in every table), sign optional;
- a .json file: a value under a key naming an accuracy, error, gap or bits ("acc", "err", "gap",
  "bits", "bpc"; or the mean/std beside one) that prints as the figure, read for percentages
  also as a fraction or an error (100 - x);
- a folder named stands for the files directly in it (a run folder's summary.json), not for
  every file below it: results/table1/ alone holds hundreds of runs, and a typed two-decimal
  accuracy would match one of them by chance.
Nothing else holds a figure: a number found in some other results file does not.
Goals and thresholds are not results: a figure in a sentence that says "goal" or "threshold" is
skipped. Generated sections (<!-- name:start --> ... <!-- name:end -->) are skipped by the scan, and
instead must be exactly what `python -m experiments.report` makes of results/ today. Figures
quoted from published reproductions are held like any other: results/published.md lists each
with its source (`python -m experiments.published`).
"""
import json
import re
from pathlib import Path

import pytest

from experiments.report import SECTION, default_pages, section_source

ROOT = Path(__file__).resolve().parent.parent
SIGN = "+-\u2212"
PERCENT = re.compile(r"(?<![\w.])([+\-\u2212]?\d+(?:\.\d+)?)\s?%")
POINTS = re.compile(r"(?<![\w.])([+\-\u2212]?\d+(?:\.\d+)?)\s?(?:pt|pts|points?)\b")
BITS = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)\s?(?:bits?(?: per (?:character|char|scored step|step))?|bpc|bits/char)\b")
SIGNED = re.compile(r"(?<![\w.+\-\u2212])([+\-\u2212]\d+\.\d+)(?![\d.])")  # a gap: +0.86, -0.37
UNITS = (("%", PERCENT), ("pt", POINTS), ("bits", BITS))
GOAL = re.compile(r"\b(goals?|thresholds?)\b", re.I)
RESULT_PATH = re.compile(r"results/[\w./-]*\w")
METRIC_KEY = re.compile(r"acc|err|gap|bits|bpc")
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


UNIT_TEXT = {"%": r"\s?%", "pt": r"\s?(?:pt|pts|points?)\b", "bits": r"\s?bits?\b"}


def sentence_at(block, pos):
    """The sentence (or table row) of `block` around position `pos`."""
    line_start = block.rfind("\n", 0, pos) + 1
    line_end = block.find("\n", pos)
    line = block[line_start:line_end if line_end >= 0 else len(block)]
    if line.lstrip().startswith("|"):
        return line
    start = max(block.rfind(". ", 0, pos), block.rfind("\n\n", 0, pos), -1) + 1
    end = block.find(". ", pos)
    return block[start:end if end >= 0 else len(block)]


def figures(block):
    """(position, figure text, unit) of every figure in a block, goals and thresholds left out."""
    found = [(m.start(), m.group(1), unit) for unit, pattern in UNITS for m in pattern.finditer(block)]
    rows = [(m.start(1), m.group(1), "pt") for m in SIGNED.finditer(block)]
    taken = {pos for pos, _, _ in found}
    found += [r for r in rows if r[0] not in taken]
    return sorted(f for f in found if not GOAL.search(sentence_at(block, f[0])))


class Results:
    """What the files under a results folder hold, read once."""

    def __init__(self, root):
        self.root = Path(root)
        self.texts = {}
        for path in sorted(self.root.rglob("*")):
            if path.suffix in TEXT_SUFFIXES and path.is_file():
                self.texts[path] = path.read_text(errors="replace")

    def files(self, named):
        """The text files a path named in a page stands for: the file, or the files directly in the folder."""
        path = self.root.parent / named
        return [p for p in self.texts if p == path or p.parent == path]

    def holds(self, figure, unit, path):
        """Whether the file at `path` holds `figure` (its digits, sign aside) at its printed precision."""
        digits, text = figure.lstrip(SIGN), self.texts[path]
        decimals = printed(digits)
        if path.suffix != ".json":
            tail = UNIT_TEXT[unit] if decimals == 0 else r"(?![\d])(?!\.\d)"
            if figure[0] in SIGN:  # a signed gap must be there with its sign, not as some std or error
                signs = r"\+" if figure[0] == "+" else "-\u2212"
                return re.search(rf"(?<![\d.])[{signs}]{re.escape(digits)}{tail}", text) is not None
            return re.search(rf"(?<![\d.]){re.escape(digits)}{tail}", text) is not None
        if decimals == 0:  # a whole number must appear as text: any value near it would do otherwise
            return False
        try:
            values = list(metric_values(json.loads(text)))
        except json.JSONDecodeError:
            return False
        scaled = (lambda v: (v, 100 * v, 100 - v, 100 * (1 - v))) if unit == "%" else (lambda v: (v, 100 * v))
        return any(f"{abs(x):.{decimals}f}" == digits for v in values for x in scaled(v))


def unsourced(page, results):
    """'page:line: figure' for every figure of `page` outside its generated sections that no results
    file named beside it holds."""
    found = []
    for line, block in paragraphs(Path(page).read_text()):
        named = [p for name in RESULT_PATH.findall(block) for p in results.files(name)]
        for pos, figure, unit in figures(block):
            if any(results.holds(figure, unit, p) for p in named):
                continue
            shown = figure + ("%" if unit == "%" else f" {unit}")
            found.append(f"{Path(page).name}:{line + block[:pos].count(chr(10))}: {shown}")
    return found


# ------------------------------------------------------------------ the checker itself

def test_checker_flags_a_typed_figure_and_accepts_a_sourced_one(tmp_path):
    results = tmp_path / "results"
    (results / "run").mkdir(parents=True)
    (results / "grid" / "deep").mkdir(parents=True)
    (results / "run" / "summary.json").write_text(json.dumps({"test_acc": 0.9728, "seconds": 97.31,
                                                             "last_bits": 0.4512}))
    (results / "grid" / "deep" / "summary.json").write_text(json.dumps({"test_acc": 0.9555}))
    (results / "table.md").write_text("# t\n\n| FCN | 1.63 ± 0.14 | +0.86 |\n\nbench: blocked 3%, 12 runs\n")
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
        "The pipeline waits 3%.\n\n"                       # the same text in a results file not named
        "<!-- t:start -->\n| 12.34% |\n<!-- t:end -->\n\n"  # generated: not scanned here
        "Our DNI: 2.8% error.\n\n"                         # in no results file
        "A gap of +0.86 points, then 0.87 pt (results/table.md).\n\n"  # points: held; typed
        "Blocked 12% of the time (results/table.md).\n\n"  # '12' is there, but not as a percentage
        "| row | gap |\n|---|---|\n| FCN | +0.91 |\n\n"     # a signed gap in a hand-written table
        "It ends at 0.45 bits per step, not 0.46 bits (results/run).\n\n"  # bits: held; typed
        "Deeper: 95.55% (results/grid).\n\n"                # a folder stands for its own files only
        "A prose gap of +0.14 and -0.86, then +0.86 (results/table.md: 0.14 only as a std).\n\n"
        "The goal: within 0.2 point of Bprop, and 1% more.\n")  # a goal sentence is skipped
    found = unsourced(page, Results(results))
    assert found == ["page.md:5: 97.29%", "page.md:7: 97.31%", "page.md:9: 97.28%", "page.md:11: 1.31%",
                     "page.md:13: 1.6%", "page.md:15: 3%", "page.md:21: 2.8%", "page.md:23: 0.87 pt",
                     "page.md:25: 12%", "page.md:29: +0.91 pt", "page.md:31: 0.46 bits", "page.md:33: 95.55%",
                     "page.md:35: +0.14 pt", "page.md:35: -0.86 pt"]


def test_paragraph_line_numbers_survive_generated_sections():
    text = "a\n<!-- x:start -->\nb\n\nc\n<!-- x:end -->\n\nd 5%\ne\n"
    assert paragraphs(text) == [(1, "a"), (8, "d 5%\ne")]


# ------------------------------------------------------------------ the pages

PAGES = default_pages(ROOT)


@pytest.fixture(scope="module")
def results():
    return Results(ROOT / "results")


def test_every_figure_in_the_pages_is_held_by_the_results_file_named_beside_it(results):
    found = [f for page in PAGES for f in unsourced(page, results)]
    assert not found, ("figures that no results file named beside them holds (name the file in the paragraph, "
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
