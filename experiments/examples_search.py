"""The examples' validation search: the synthesizers' and local heads' settings of the examples' grid.

For each example (examples/resnet_fashion.py, examples/char_gpt.py) and each of DNI, cDNI
(Jaderberg et al. 2016, section 2) and local losses (Belilovsky et al. 2020), a few candidate
settings are trained once: one cut in the middle (--cuts 1), seed 100 (no table reports it), a
short budget (ResNet-18: 2 epochs; GPT: 600 steps, validation every 200), the test split never
measured (--eval_test False). Every other setting is the example's default.

Candidates, cheapest first as listed (CANDIDATES; rates are the examples' --lr, 1e-3, times 0.3 or 3):
  DNI and cDNI: linear (--synth_width 0); narrow (ResNet 16 channels, GPT 128 units); the default
    (ResNet 64 channels, GPT 512 units, one hidden layer, the stages' rate); the default at x0.3 and
    at x3 the rate (--sg_lr 3e-4, 3e-3); deep (two hidden layers of the default width). Six each.
  Local losses: today's head (pool and linear; LayerNorm and linear); one hidden layer, narrow
    (ResNet 64 channels, GPT 128 units) or wide (ResNet 256, GPT 512). Three each.

The rule, written before any run: per (example, method), the candidate with the lowest final
validation metric (ResNet: validation error after the last epoch; GPT: validation bits per
character after the last step) is chosen; a tie goes to the cheaper one (fewer parameters in the
synthesizers or heads, from the run's summary; then the one listed first). A candidate whose
metric is not a number (diverged) loses to every number. Until every candidate of a
(example, method) has finished, nothing is chosen for it. Only the validation fields of the runs'
summaries are read; results/examples_search.json holds no test field.

    python -m experiments.examples_search --jobs 2               # trains what is missing, then the files
    python -m experiments.examples_search --jobs 4 --device cuda # the same on a GPU
    python -m experiments.examples_search --list                 # the runs, finished or not; trains nothing
    python -m experiments.examples_search --table_only           # rebuilds the files from the run folders

Run folders go under results/examples_search/<example>_<method>_<candidate>_seed100/ and are reused
when finished (resumable); results/examples_search.md and .json are rebuilt from them, byte for
byte. experiments/examples_grid.py reads the JSON's choices (--settings).
"""
import json
import math
import sys
from pathlib import Path

from dnilab.cli import OneLineParser
from experiments.example_grids import add_options, results_dir, train_missing

SEED = 100  # a seed no table reports
CUTS = 1
BUDGETS = {"resnet_fashion": ("epochs", 2), "char_gpt": ("steps", 600)}
METRICS = {"resnet_fashion": "val_error", "char_gpt": "val_bpc"}  # lower is better
NAMES = {"resnet_fashion": "ResNet-18 on Fashion-MNIST", "char_gpt": "Character-level GPT on Debian's fortunes"}
NARROW = {"resnet_fashion": 16, "char_gpt": 128}  # synthesizer: a quarter of the default width
HEADS = {"resnet_fashion": (64, 256), "char_gpt": (128, 512)}  # local head's hidden width: narrow, wide (default)


def _synthesizers(example):
    return {"linear": {"synth_width": 0}, "narrow": {"synth_width": NARROW[example]}, "default": {},
            "rate_x0.3": {"sg_lr": 3e-4}, "rate_x3": {"sg_lr": 3e-3}, "deep": {"synth_layers": 2}}


def _heads(example):
    narrow, wide = HEADS[example]
    return {"default": {}, f"hidden{narrow}": {"head_layers": 1, "head_width": narrow},
            f"hidden{wide}": {"head_layers": 1}}


# {example: {method: {candidate: {flag: value}}}}: the flags each candidate adds to the example's defaults
CANDIDATES = {example: {"dni": _synthesizers(example), "cdni": _synthesizers(example), "local": _heads(example)}
              for example in BUDGETS}


def folder_name(example, method, candidate):
    return f"{example}_{method}_{candidate}_seed{SEED}"


def runs(results):
    """[(run folder, argv of its command)], ResNet's first."""
    out = []
    for example, methods in CANDIDATES.items():
        budget, length = BUDGETS[example]
        for method, candidates in methods.items():
            for candidate, flags in candidates.items():
                folder = Path(results) / folder_name(example, method, candidate)
                out.append((folder, [f"examples/{example}.py", "--method", method, "--cuts", str(CUTS), "--seed",
                                     str(SEED), f"--{budget}", str(length), "--eval_test", "False",
                                     *[x for k, v in flags.items() for x in (f"--{k}", str(v))],
                                     "--out", str(folder)]))
    return out


def validation(folder, example):
    """(final validation metric, cut parameters, training seconds) of a finished run, else None.
    Reads the summary's validation fields alone."""
    path = Path(folder) / "summary.json"
    if not path.exists():
        return None
    s = json.loads(path.read_text())
    metric = 1 - s["val_acc"] if example == "resnet_fashion" else s["val_bpc"]
    return metric, s["cut_parameters"], s["seconds"]


def choose(scores):
    """The rule: {candidate: (metric, cost) or None} in listed order -> the chosen candidate, or None
    while any is unfinished. Lowest metric (not-a-number last), then lowest cost, then listed first."""
    if not scores or any(v is None for v in scores.values()):
        return None
    order = list(scores)
    return min(order, key=lambda c: (math.isnan(scores[c][0]), scores[c][0], scores[c][1], order.index(c)))


def collect(results):
    """The search's record ({"examples": {example: {"methods": {method: ...}}}}) from its run folders."""
    record = {"seed": SEED, "cuts": CUTS, "rule": "lowest final validation metric; ties to fewer synthesizer or "
              "head parameters, then the one listed first; nothing chosen until every candidate has finished",
              "examples": {}}
    for example, methods in CANDIDATES.items():
        budget, length = BUDGETS[example]
        cells = {}
        for method, candidates in methods.items():
            rows, scores = [], {}
            for candidate, flags in candidates.items():
                found = validation(Path(results) / folder_name(example, method, candidate), example)
                scores[candidate] = found and found[:2]
                rows.append({"candidate": candidate, "flags": flags, "run": folder_name(example, method, candidate),
                             METRICS[example]: found and found[0], "cut_parameters": found and found[1],
                             "seconds": found and found[2]})
            best = choose(scores)
            cells[method] = {"chosen": best, "flags": candidates[best] if best else None, "candidates": rows,
                             "finished": sum(v is not None for v in scores.values())}
        record["examples"][example] = {"budget": {budget: length}, "metric": METRICS[example], "methods": cells}
    return record


def _number(value, example):
    if value is None:
        return "to come"
    if math.isnan(value):
        return "nan"
    return f"{100 * value:.2f}%" if example == "resnet_fashion" else f"{value:.3f}"


def markdown(record):
    """results/examples_search.md from the record."""
    lines = ["# The examples' validation search", "",
             "Made by `python -m experiments.examples_search` from results/examples_search/ "
             f"(seed {record['seed']}, {record['cuts']} cut; rule: {record['rule']}). Validation only: "
             "the search never measures test.", ""]
    for example, cell in record["examples"].items():
        (budget, length), = cell["budget"].items()
        metric = "val error" if cell["metric"] == "val_error" else "val bits/char"
        lines += [f"#### {NAMES[example]} ({length} {budget})", "",
                  f"| method | candidate | flags | {metric} | cut parameters | train time | chosen |",
                  "|---|---|---|---|---|---|---|"]
        for method, m in cell["methods"].items():
            for row in m["candidates"]:
                flags = " ".join(f"--{k} {v}" for k, v in row["flags"].items()) or "(defaults)"
                mark = "**chosen**" if row["candidate"] == m["chosen"] else ""
                params = "" if row["cut_parameters"] is None else f"{row['cut_parameters']:,}"
                secs = "" if row["seconds"] is None else f"{row['seconds']:.0f} s"
                lines.append(f"| {method} | {row['candidate']} | {flags} | {_number(row[cell['metric']], example)} "
                             f"| {params} | {secs} | {mark} |")
        waiting = [f"{method} ({m['finished']} of {len(m['candidates'])} finished)"
                   for method, m in cell["methods"].items() if m["chosen"] is None]
        lines += [""] + ([f"Nothing chosen yet for {', '.join(waiting)}.", ""] if waiting else [])
    return "\n".join(lines)


def write(results):
    """Write <results>.md and <results>.json beside the run folders; returns their paths."""
    record = collect(results)
    md, js = Path(f"{results}.md"), Path(f"{results}.json")
    md.write_text(markdown(record))
    js.write_text(json.dumps(record, indent=1) + "\n")
    return md, js


def main(argv=None):
    p = OneLineParser(description=__doc__.split("\n")[0])
    add_options(p, "results/examples_search")
    p.add_argument("--table_only", action="store_true", help="train nothing: rebuild the .md and .json from the runs")
    args = p.parse_args(argv)
    results = results_dir(p, args)
    if args.table_only and args.list:
        p.error("--table_only and --list: give one")
    failed = [] if args.table_only else train_missing(p, args, runs(results))
    if failed is None:  # --list
        return
    md, js = write(results)
    print(f"wrote {md} and {js}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
