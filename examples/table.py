"""Write results/examples.md, the examples' table, from the JSON files the examples wrote.

    python examples/table.py
    python -m experiments.report --docs docs/examples.md   # copies it into the page
"""
import argparse
import json
from pathlib import Path

ROW_ORDER = {"backprop": 0, "dni": 1, "cdni": 2}  # rows of a table, by method


def rows(results, example):
    runs = sorted((json.loads(p.read_text()) for p in Path(results).glob(f"{example}_*.json")),
                  key=lambda r: ROW_ORDER[r["config"]["method"]])
    base = next((r for r in runs if r["config"]["method"] == "backprop"), None)
    return runs, base


def table(results="results/examples"):
    lines = ["# Examples", "", "Made by `python examples/table.py` from results/examples/*.json "
             "(the command of each run is in its file).", ""]
    runs, base = rows(results, "resnet_fashion")
    if runs:
        lines += ["## ResNet-18 on Fashion-MNIST", "",
                  "| method | epochs | val accuracy | test accuracy | test vs backprop | train time |",
                  "|---|---|---|---|---|---|"]
        for r in runs:
            gap = f"{100 * (r['test_acc'] - base['test_acc']):+.2f} pt" if base and r is not base else ""
            lines.append(f"| {r['config']['method']} | {r['config']['epochs']} | {100 * r['val_acc']:.2f}% | "
                         f"{100 * r['test_acc']:.2f}% | {gap} | {r['train_seconds']:.0f} s |")
        lines.append("")
    runs, base = rows(results, "char_gpt")
    if runs:
        c = runs[0]["corpus"]
        lines += ["## Character-level GPT on Debian's fortunes", "",
                  f"{runs[0]['parameters']:,} parameters (synthesizers aside); vocabulary {c['vocab']} characters; "
                  f"train {c['train_chars']:,}, validation {c['val_chars']:,}, test {c['test_chars']:,} characters.", "",
                  "| method | steps | val bits/char | test bits/char | test vs backprop | train time |",
                  "|---|---|---|---|---|---|"]
        for r in runs:
            gap = f"{r['test_bpc'] - base['test_bpc']:+.3f}" if base and r is not base else ""
            lines.append(f"| {r['config']['method']} | {r['config']['steps']} | {r['val_bpc']:.3f} | "
                         f"{r['test_bpc']:.3f} | {gap} | {r['train_seconds']:.0f} s |")
        lines.append("")
    every = [json.loads(p.read_text()) for p in sorted(Path(results).glob("*.json"))]
    machines = sorted({f"{r['hardware']}, torch {r['torch']}" for r in every})
    lines.append(f"Measured on {'; '.join(machines)}, seed 0; train time excludes evaluation, and other jobs shared the "
                 "2 cores during most runs, so train times are no speed comparison.")
    unrecorded = sum("env" not in r for r in every)
    dirty = sum(bool(r.get("env", {}).get("git_dirty")) for r in every)
    if unrecorded or dirty:
        lines.append("Provenance: " + "; ".join(
            ([f"{unrecorded} of {len(every)} runs recorded no commit (made before the examples recorded one)"]
             if unrecorded else []) + ([f"{dirty} of {len(every)} runs were made from a modified tree"] if dirty else []))
            + ".")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", default="results/examples")
    p.add_argument("--out", default="results/examples.md")
    args = p.parse_args(argv)
    text = table(args.results)
    Path(args.out).write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
