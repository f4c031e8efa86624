"""Figures quoted from public DNI reproductions, each with the file it was read from.

    python -m experiments.published      # writes results/published.md and results/published.json

They are not results of this repository: docs/table1.md quotes them beside ours, as
reproductions (settings differ from the paper's and from ours). Keeping them here, with
their sources, puts every figure the docs print under results/ (tests/test_figures.py).
The paper's own Table 1 cells are not among them: no copy reachable here confirmed them.
"""
import json
from pathlib import Path

from dnilab.runs import write_text

# (repository, file in it, what the figure is, the figure as printed there)
PUBLISHED = [
    ("kbullaughey/dni-synthetic-gradients", "README.md",
     "MNIST FCN (two hidden layers of 256), backprop with SGD: error by epoch 21 (its README: training error)",
     "2.0%"),
    ("kbullaughey/dni-synthetic-gradients", "README.md", "the same FCN, cDNI (linear synthesizer): error by epoch 80",
     "2.0%"),
    ("kbullaughey/dni-synthetic-gradients", "README.md", "the same FCN, plain DNI: error after 249 epochs", "2.8%"),
    ("kbullaughey/dni-synthetic-gradients", "README.md", "the same FCN, plain DNI: not below this error by epoch 770",
     "2.7%"),
    ("eugenium/DGL", "dni_comparisons/backprop.log", "CIFAR-10 3-layer CNN, backprop: test top-1 at epoch 2000",
     "84.47%"),
    ("eugenium/DGL", "dni_comparisons/dni.log", "the same CNN, DNI: test top-1 at epoch 2000", "64.74%"),
    ("eugenium/DGL", "dni_comparisons/cdni.log", "the same CNN, cDNI: test top-1 at epoch 1990 (its last line)",
     "80.86%"),
]


def markdown():
    lines = ["# Figures quoted from public reproductions (not results of this repository)", "",
             "| source | file | what | figure |", "|---|---|---|---|"]
    lines += [f"| {repo} | {path} | {what} | {figure} |" for repo, path, what, figure in PUBLISHED]
    lines += ["", "Made by `python -m experiments.published`; quoted in docs/table1.md.", ""]
    return "\n".join(lines)


def main(out="results"):
    out = Path(out)
    rows = [dict(source=repo, file=path, what=what, figure=figure) for repo, path, what, figure in PUBLISHED]
    write_text(out / "published.json", json.dumps(rows, indent=2) + "\n")
    write_text(out / "published.md", markdown())
    print(f"wrote {out / 'published.md'} and {out / 'published.json'}")


if __name__ == "__main__":
    main()
