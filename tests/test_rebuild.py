"""results/ as committed: every table rebuilds from its run folders, and the tree stays light.

- each table under results/ is listed in experiments/rebuild.py with a command that makes it
  without training; run as typed in a scratch copy of results/, it gives the committed table
  byte for byte (so a table cannot hold a number its run folders do not);
- the tracked files under results/ weigh at most 40 MB, and every finished run folder is thin
  (experiments/thin.py: every 10th step row, rounded; no per-run plot that no page shows).
"""
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from experiments import rebuild, thin

ROOT = Path(__file__).resolve().parent.parent
# Measured again, never rebuilt: timings, and the optimizer probe (it trains; it has no run folders).
MEASUREMENTS = {"results/api_speed.md", "results/bench.md", "results/sg_optimizers.md", "results/cost_model/bench.md"}
LIMIT_MB = 40


def tracked(under="results"):
    try:
        listed = subprocess.run(["git", "ls-files", "-z", under], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: what is committed cannot be told")
    return [ROOT / p for p in listed.decode().split("\0") if p]


def test_every_table_has_a_rebuild_command():
    runs = {p.parent for p in ROOT.glob("results/**/summary.json")}
    tables = {p.relative_to(ROOT).as_posix() for p in ROOT.glob("results/**/*.md")
              if not any(parent in runs for parent in p.parents)}
    assert tables - MEASUREMENTS - set(rebuild.REBUILDS) == set()


def test_every_table_rebuilds_byte_for_byte(tmp_path):
    where = rebuild.scratch_copy(tmp_path)
    tables = [t for t in rebuild.REBUILDS if (ROOT / t).exists()]
    # Two at once: each is a process of its own, and no two write the same file.
    families = {}
    for table in tables:  # tables one command family writes to the same files go one after another
        families.setdefault(" ".join(rebuild.REBUILDS[table].split()[:3]), []).append(table)

    def run_family(members):
        return [(t, *rebuild.rebuild(t, where)) for t in members]

    with ThreadPoolExecutor(2) as pool:
        done = [r for family in pool.map(run_family, families.values()) for r in family]
    failed = {t: tail.strip().splitlines()[-1:] for t, code, tail in done if code}
    assert not failed, failed
    differ = [t for t in tables if (where / t).read_bytes() != (ROOT / t).read_bytes()]
    assert not differ, f"rebuilt differently (python -m experiments.rebuild {' '.join(differ)} shows how): {differ}"


def test_results_are_light_and_thin():
    files = tracked()
    size = sum(p.stat().st_size for p in files if p.exists()) / 2 ** 20
    assert size <= LIMIT_MB, f"results/ holds {size:.1f} MB; python -m experiments.thin results"
    fat = [(p, why) for p, why in thin.what_is_fat(ROOT / "results") if p in set(files)]
    assert not fat, f"{len(fat)} committed file(s) not thin, e.g. {fat[0]}; python -m experiments.thin results"


def test_thinning_keeps_epoch_rows_and_every_tenth_step():
    rows = [{"kind": "step", "epoch": 1, "step": s, "loss": 1 / 3, "sg_loss": [2 / 3]} for s in range(1, 26)]
    rows.insert(12, {"kind": "epoch", "epoch": 1, "step": 12, "test_acc": 0.123456789})
    kept = thin.thin_rows(rows)
    assert [r["step"] for r in kept if r["kind"] == "step"] == [1, 10, 20, 25]
    assert {"kind": "epoch", "epoch": 1, "step": 12, "test_acc": 0.123456789} in kept
    assert kept[0]["loss"] == 0.3333 and kept[0]["sg_loss"] == [0.6667]
    assert thin.thin_rows(kept) == kept


def test_a_run_of_500k_steps_keeps_at_most_5000_step_rows():
    last = 500_000
    steps = [{"kind": "step", "epoch": 1, "step": s, "loss": 0.5} for s in range(1, last + 1)]
    kept = [r["step"] for r in thin.thin_rows(steps)]
    assert kept[:3] == [1, 100, 200] and kept[-1] == last and len(kept) == 5001
    assert thin.stride_of(11_700) == thin.STRIDE  # the long runs committed so far keep every 10th


def test_a_run_from_a_modified_tree_keeps_its_diff(tmp_path):
    """A run started with edits not committed saves them beside env.json, and a table says how
    many of its runs were made that way, and whether their diffs were kept."""
    import shutil as sh
    from dnilab.runs import save_diff
    from experiments.provenance import modified_tree_line
    clean, dirty, lost = (tmp_path / n for n in ("clean", "dirty", "lost"))
    for folder, env in ((clean, {"git_commit": "a" * 40, "git_dirty": False}),
                        (dirty, {"git_commit": "a" * 40, "git_dirty": True}),
                        (lost, {"git_commit": "a" * 40, "git_dirty": True})):
        folder.mkdir()
        (folder / "env.json").write_text(__import__("json").dumps(env))
    save_diff(clean, {"git_dirty": False})
    assert not (clean / "diff.patch").exists()
    if sh.which("git"):
        save_diff(dirty, {"git_dirty": True})
        assert (dirty / "diff.patch").exists()
    else:
        (dirty / "diff.patch").write_text("")
    assert modified_tree_line([clean]) == ""
    line = modified_tree_line([clean, dirty, lost])
    assert line.startswith("Made from a modified tree: 2 of 3 runs") and "the diffs of 1 were not saved" in line


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed: there is no commit to compare with")
def test_a_run_folder_rewritten_is_not_an_edit_of_the_tree(tmp_path, monkeypatch):
    """README's `--overwrite True` rewrites committed run folders one after another: what runs
    wrote (results/, or the run's own folder elsewhere) leaves a run made from a clean tree; an edit
    of the code does not, and its diff, less the run folders, is kept."""
    import torch

    from dnilab import runs
    repo = tmp_path / "repo"
    for folder in ("results/first", "results/second", "runs/mine", "runs/other"):
        (repo / folder).mkdir(parents=True)
        (repo / folder / "summary.json").write_text("{}\n")
    (repo / "code.py").write_text("lr = 1e-3\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "runs"]):
        subprocess.run(git + args, check=True)
    monkeypatch.setattr(runs, "REPO", repo)
    cpu = torch.device("cpu")
    for folder in ("results/first", "results/second", "runs/mine"):  # made again in place, in turn
        (repo / folder / "summary.json").write_text('{"val_acc": 0.9}\n')
        assert runs.environment(cpu, repo / folder)["git_dirty"] is False, folder
    assert runs.environment(cpu, repo / "runs" / "other")["git_dirty"] is True  # runs/mine is not its own
    assert runs.environment(cpu, tmp_path / "elsewhere")["git_dirty"] is True
    (repo / "code.py").write_text("lr = 3e-3\n")
    env = runs.environment(cpu, repo / "runs" / "mine")
    assert env["git_dirty"] is True
    runs.save_diff(repo / "runs" / "mine", env)
    diff = (repo / "runs" / "mine" / "diff.patch").read_text()
    assert "+lr = 3e-3" in diff and "val_acc" not in diff
