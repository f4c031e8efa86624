"""Where a table's runs came from: the line a table prints when some were made from a modified tree.

A run folder's env.json (a recurrent run's summary.json, under "env") records the commit and
`git_dirty`: whether tracked files differed from that commit when the run started. Such a run
is the commit plus edits; dnilab.runs saves those edits as diff.patch in the folder, and runs made
before it did have none, so the table says so beside its numbers.
"""
import json
from pathlib import Path


def environment(run_dir):
    """The run's recorded environment, {} when it has none."""
    run_dir = Path(run_dir)
    if (run_dir / "env.json").exists():
        return json.loads((run_dir / "env.json").read_text())
    if (run_dir / "summary.json").exists():
        return json.loads((run_dir / "summary.json").read_text()).get("env", {})
    return {}


def modified_tree_line(run_dirs):
    """'' when every run was made from a clean tree at a commit; else one sentence for the table."""
    run_dirs = [Path(r) for r in run_dirs]
    dirty = [r for r in run_dirs if environment(r).get("git_dirty")]
    unknown = [r for r in run_dirs if environment(r).get("git_commit") is None]
    parts = []
    if dirty:
        lost = sum(not (r / "diff.patch").exists() for r in dirty)
        parts.append(f"{len(dirty)} of {len(run_dirs)} runs (their commit plus edits not committed" + (f"; the diffs of {lost} were not saved" if lost else ", saved as "
                                              "diff.patch in each folder") + ")")
    if unknown:
        parts.append(f"{len(unknown)} of {len(run_dirs)} runs recorded no commit")
    return ("Made from a modified tree: " + "; ".join(parts) + ".") if parts else ""
