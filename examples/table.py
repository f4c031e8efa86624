"""Write results/examples.md, the examples' table, from their runs.

    python examples/table.py
    python -m experiments.report --docs docs/examples.md   # copies it into the page

A run is a run folder (results/examples/<name>/ with summary.json, env.json and command.txt, as
the examples write them now) or one of the older single JSON files (results/examples/*.json,
read until a run folder repeats it: same example, method, cuts, budget and seed). Runs that
differ only in their seed are one row: mean ± sample std over the seeds, where there are several.
Quick looks on part of the data (--subset, --eval_chars) are left out.
Budgets (epochs, steps) are the runs' own, never this script's. The test columns compare each
row with backprop at the same budget.
"""
import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout
from experiments.grid import mean_std  # noqa: E402

ROW_ORDER = {"backprop": 0, "dni": 1, "cdni": 2, "local": 3}  # rows of a table with the same budget and cuts
BUDGET = {"resnet_fashion": "epochs", "char_gpt": "steps"}  # what a run's length is counted in
SCORES = {"resnet_fashion": ("val_acc", "test_acc"), "char_gpt": ("val_bpc", "test_bpc")}


def _machine(env):
    """'x86_64 cpu, 1 threads, torch 2.x' from a run folder's env.json (the older files' words)."""
    where = env.get("gpu") or f"{env.get('cpu')} cpu, {env.get('threads')} threads"
    return f"{where}, torch {env.get('torch')}"


def load_runs(results):
    """Every run under `results`, each a dict of the fields the table reads."""
    runs = []
    for path in sorted(Path(results).glob("*/summary.json")):
        s = json.loads(path.read_text())
        config_path = path.parent / "config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        if config.get("subset") or config.get("eval_chars"):  # a quick look on part of the data: no result
            continue
        env_path = path.parent / "env.json"
        env = json.loads(env_path.read_text()) if env_path.exists() else {}
        val, test = SCORES[s["example"]]
        runs.append({"example": s["example"], "method": s["method"], "cuts": s["cuts"], "seed": s["seed"],
                     "budget": s[BUDGET[s["example"]]], "val": s[val], "test": s[test], "seconds": s["seconds"],
                     "machine": _machine(env), "env": env, "folder": True,
                     "parameters": s.get("parameters"), "corpus": s.get("corpus")})
    folders = {(r["example"], r["method"], r["cuts"], r["budget"], r["seed"]) for r in runs}
    for path in sorted(Path(results).glob("*.json")):
        r = json.loads(path.read_text())
        c, (val, test) = r["config"], SCORES[r["example"]]
        # These files predate --cuts: a DNI after every group (ResNet) or block (GPT) but the last
        cuts = 0 if c["method"] == "backprop" else (3 if r["example"] == "resnet_fashion" else c["n_layer"] - 1)
        run = {"example": r["example"], "method": c["method"], "cuts": cuts, "seed": c["seed"],
               "budget": c[BUDGET[r["example"]]], "val": r[val], "test": r[test], "seconds": r["train_seconds"],
               "machine": f"{r['hardware']}, torch {r['torch']}", "env": r.get("env"), "folder": False,
               "parameters": r.get("parameters"), "corpus": r.get("corpus")}
        if (run["example"], run["method"], run["cuts"], run["budget"], run["seed"]) not in folders:
            runs.append(run)
    return runs


def rows(runs, example):
    """[(method, cuts, budget, [runs over seeds])], sorted by budget, cuts and method."""
    groups = {}
    for r in runs:
        if r["example"] == example:
            groups.setdefault((r["method"], r["cuts"], r["budget"]), []).append(r)
    return sorted(((m, c, b, sorted(g, key=lambda r: r["seed"])) for (m, c, b), g in groups.items()),
                  key=lambda row: (row[2], row[1], ROW_ORDER[row[0]]))


def _cell(values, fmt, unit=""):
    """'90.96%' for one seed, '90.96 ± 0.12%' for several."""
    mean, std = mean_std(values)
    return f"{mean:{fmt}}{unit}" if std is None else f"{mean:{fmt}} ± {std:{fmt}}{unit}"


def _table(rows_, extended, header, value, gap):
    """Markdown rows; `value(x)` formats a score, `gap(row, base)` the test difference with backprop."""
    bases = {b: g for m, _, b, g in rows_ if m == "backprop"}
    cols = ["method", "cuts", header[0], "seeds"] if extended else ["method", header[0]]
    lines = ["| " + " | ".join(cols + list(header[1:])) + " |", "|" + "---|" * (len(cols) + len(header) - 1)]
    for method, cuts, budget, group in rows_:
        base = bases.get(budget)
        diff = gap([r["test"] for r in group], [r["test"] for r in base]) if base and base is not group else ""
        seconds = sum(r["seconds"] for r in group) / len(group)
        first = [method, str(cuts), str(budget), str(len(group))] if extended else [method, str(budget)]
        lines.append("| " + " | ".join(first + [value([r["val"] for r in group]), value([r["test"] for r in group]),
                                                 diff, f"{seconds:.0f} s"]) + " |")
    return lines + [""]


def table(results="results/examples"):
    runs = load_runs(results)
    extended = any(r["folder"] for r in runs)  # run folders: cuts and seeds get columns
    if not extended:
        source = "results/examples/*.json (the command of each run is in its file)"
    elif all(r["folder"] for r in runs):
        source = "the run folders in results/examples/ (the command of each run is in its command.txt)"
    else:
        source = ("the run folders in results/examples/ (each with its command.txt) and the older "
                  "results/examples/*.json (the command in each file)")
    lines = ["# Examples", "", f"Made by `python examples/table.py` from {source}.", ""]
    if extended:
        lines += ["Cuts: how many interfaces or local losses the model holds (0: backprop). Where a row has several "
                  "seeds, each cell is their mean ± sample std; test vs backprop compares means at the same budget.",
                  ""]
    resnet = rows(runs, "resnet_fashion")
    if resnet:
        lines += ["## ResNet-18 on Fashion-MNIST", ""] + _table(
            resnet, extended, ("epochs", "val accuracy", "test accuracy", "test vs backprop", "train time"),
            lambda v: _cell([100 * x for x in v], ".2f", "%"),
            lambda a, b: f"{100 * (sum(a) / len(a) - sum(b) / len(b)):+.2f} pt")
    gpt = rows(runs, "char_gpt")
    if gpt:
        first = gpt[0][3][0]
        c = first["corpus"]
        lines += ["## Character-level GPT on Debian's fortunes", "",
                  f"{first['parameters']:,} parameters (synthesizers aside); vocabulary {c['vocab']} characters; "
                  f"train {c['train_chars']:,}, validation {c['val_chars']:,}, test {c['test_chars']:,} characters.",
                  ""] + _table(
            gpt, extended, ("steps", "val bits/char", "test bits/char", "test vs backprop", "train time"),
            lambda v: _cell(v, ".3f"), lambda a, b: f"{sum(a) / len(a) - sum(b) / len(b):+.3f}")
    machines = sorted({r["machine"] for r in runs})
    seeds = sorted({r["seed"] for r in runs})
    seed_words = f"seed {seeds[0]}" if len(seeds) == 1 else "seeds " + ", ".join(map(str, seeds))
    lines.append(f"Measured on {'; '.join(machines)}, {seed_words}; train time excludes evaluation, and other jobs "
                 "shared the 2 cores during most runs, so train times are no speed comparison.")
    unrecorded = sum(not r["env"] for r in runs)
    dirty = sum(bool((r["env"] or {}).get("git_dirty")) for r in runs)
    if unrecorded or dirty:
        lines.append("Provenance: " + "; ".join(
            ([f"{unrecorded} of {len(runs)} runs recorded no commit (made before the examples recorded one)"]
             if unrecorded else []) + ([f"{dirty} of {len(runs)} runs were made from a modified tree"] if dirty else []))
            + ".")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", default="results/examples", help="run folders and older JSON files")
    p.add_argument("--out", default="results/examples.md")
    args = p.parse_args(argv)
    text = table(args.results)
    Path(args.out).write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
