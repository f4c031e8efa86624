"""Thin the run folders under results/ before they are committed, so the tree stays light.

    python -m experiments.thin results          # every finished run folder below results/
    python -m experiments.thin --check results  # exit 1 naming what is not thin yet

What it keeps of a finished run (one with summary.json), and why that is enough:
- every row of metrics.jsonl that is not a per-step row, as written (epoch rows hold the
  accuracies that tables and curves read; recurrent runs log every 500 windows already);
- of the per-step rows: the first, the last and every STRIDE-th (for a run longer than
  STRIDE * MAX_STEP_ROWS steps, such as the paper's 500k iterations, a multiple of STRIDE that
  keeps about MAX_STEP_ROWS), with floats rounded to DIGITS significant digits. They feed only the loss and synthesizer-loss plots, which smooth
  over many steps. Rows that record which stages updated (stochastic updates) stay whole: the
  unlocking tables count them;
- no per-run plot that README.md and docs/ do not show: `python -m dnilab.plots RUN_DIR` redraws
  it from what is kept.
Runs still training (no summary.json) are left alone: a resume reads their full log.
"""
import argparse
import json
import sys
from pathlib import Path

STRIDE, DIGITS = 10, 4
MAX_STEP_ROWS = 5000
RUN_PLOTS = ("loss.png", "sg_loss.png", "aux_loss.png", "test_acc.png", "bits.png", "length.png")
ROOT = Path(__file__).resolve().parent.parent


def _round(value):
    if isinstance(value, float):
        return float(f"{value:.{DIGITS}g}")
    if isinstance(value, list):
        return [_round(v) for v in value]
    return value


def stride_of(last_step):
    """Every how many steps a run of `last_step` steps keeps a row: STRIDE, or the multiple of it
    that keeps at most MAX_STEP_ROWS. It depends on the last step alone, so thinning twice keeps
    what thinning once kept."""
    return STRIDE * max(1, -(-last_step // (STRIDE * MAX_STEP_ROWS)))


def thin_rows(rows):
    """The rows to keep, in order (see the module docstring)."""
    steps = [r for r in rows if r.get("kind") == "step" and "updated" not in r]
    last = steps[-1]["step"] if steps else None
    stride = stride_of(last or 0)
    out = []
    for row in rows:
        if row.get("kind") != "step" or "updated" in row:
            out.append(row)
        elif row["step"] == 1 or row["step"] == last or row["step"] % stride == 0:
            out.append({k: _round(v) for k, v in row.items()})
    return out


def shown_plots(root=ROOT):
    """results/... PNG paths that README.md or a page of docs/ shows."""
    texts = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    found = set()
    for path in texts:
        if path.exists():
            text = path.read_text()
            found.update(w for w in text.replace("(", " ").replace(")", " ").replace("`", " ").split()
                         if w.startswith("results/") and w.endswith(".png"))
    return found


def run_folders(results):
    return sorted(p.parent for p in Path(results).rglob("summary.json"))


def what_is_fat(results, root=ROOT):
    """(path, reason) of everything `thin` would change."""
    shown, fat = shown_plots(root), []
    for run in run_folders(results):
        metrics = run / "metrics.jsonl"
        if metrics.exists():
            rows = [json.loads(line) for line in metrics.read_text().splitlines() if line]
            if thin_rows(rows) != rows:
                fat.append((metrics, "per-step rows beyond every STRIDE-th or unrounded"))
        for name in RUN_PLOTS:
            plot = run / name
            if plot.exists() and _relative(plot, root) not in shown:
                fat.append((plot, "a per-run plot no page shows"))
    return fat


def _relative(path, root):
    try:
        return path.resolve().relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def thin(results, root=ROOT, log=print):
    for path, reason in what_is_fat(results, root):
        if path.name == "metrics.jsonl":
            rows = [json.loads(line) for line in path.read_text().splitlines() if line]
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in thin_rows(rows)))
            tmp.replace(path)
        else:
            path.unlink()
        log(f"{path}: {reason}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m experiments.thin", description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="folders to thin (every run folder below them)")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if anything is not thin")
    args = parser.parse_args(argv)
    missing = [r for r in args.results if not Path(r).is_dir()]
    if missing:
        parser.exit(2, f"python -m experiments.thin: no such folder: {missing[0]}\n")
    if args.check:
        fat = [f for r in args.results for f in what_is_fat(r)]
        for path, reason in fat[:20]:
            print(f"{path}: {reason}")
        return 1 if fat else 0
    for r in args.results:
        thin(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
