"""The recurrent DNI results table (paper, section 3.2, Table 2): longest length solved,
truncated BPTT vs DNI, at T = 2, 3, 4, 5, 8 on Copy and Repeat Copy, over seeds.

    python -m experiments.recurrent_table                # the full table, CPU, 1 thread
    python -m experiments.recurrent_table --jobs 2       # two runs at once (one process each)
    python -m experiments.recurrent_table --quick        # a tiny slice (the test's)
    python -m experiments.recurrent_table --device auto  # on a GPU if there is one
    python -m experiments.recurrent_table --length 5 --steps 8000 --jobs 2
                                                 # no curriculum: every run at N = 5, the error there

Choosing the synthetic-gradient factor reads seeds the reported table does not use: train the
candidates on seeds 100-102, let `--choose` pick the one whose DNI solves the longest lengths on
average over every cell, then report seeds 0-2 at that factor alone:

    python -m experiments.recurrent_table --first_seed 100 --dni_only --sg_factor F --jobs 2   # F: 0.1 0.3 0.5 1
    python -m experiments.recurrent_table --first_seed 100 --choose 0.1,0.3,0.5,1   # -> rnn_factor_choice.md
    python -m experiments.recurrent_table --sg_factor <chosen> --jobs 2             # the reported table

Each run is a dnilab.recurrent run folder under <out>/rnn/; a run whose summary.json
holds the same config is reused, so an interrupted table resumes where it stopped.
Writes <out>/rnn_table.json, <out>/rnn_table.md and <out>/rnn_table.png
(with --length N: <out>/rnn_table_N<N>.*; with an --sg_factor F other than 0.1: *_f<F>.*; with
--first_seed S other than 0: *_s<S>.*).
"""
import dataclasses
import json
import multiprocessing
import shlex
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from dnilab.cli import main_guard, parse_config
from dni.errors import DNIError
from dnilab.config import DEVICES
from dnilab.recurrent import RecurrentConfig, factor_tag, run
from dnilab.runs import write_json, write_text
from experiments.grid import mean_std
from experiments.provenance import modified_tree_line

TRUNCATIONS = (2, 3, 4, 5, 8)
TASK_NAMES = {"copy": "Copy", "repeat_copy": "Repeat Copy"}
RECURRENT_METHODS = {"bptt": False, "dni": True}  # method -> RecurrentConfig.dni

# The paper's Table 2 (Copy / Repeat Copy: largest sequence length solved) could not be
# retrieved in this environment, so no number of it is quoted: None means "not confirmed".
PAPER_NOTE = "n/c: not confirmed; the paper's Table 2 could not be retrieved where this table was made."
PAPER_TABLE2 = {task: {method: {T: None for T in TRUNCATIONS} for method in RECURRENT_METHODS} for task in TASK_NAMES}
# What runs made before a setting existed did instead: streams in step, no auxiliary loss.
LEGACY = dict(stagger=0, aux_weight=0.0)
# Settings only a DNI run reads: a BPTT run made under other values is the same run.
DNI_ONLY = ("sg_factor", "sg_discount", "sg_lr", "aux_weight")
# Where a run was written, not what it computed: a run made elsewhere and moved into place counts.
PLACE = ("out", "name", "overwrite")


@dataclass
class TableConfig:
    """Every default of `python -m experiments.recurrent_table`."""
    quick: bool = field(default=False, metadata=dict(help="a tiny slice: Copy, T=3, one seed, a few windows"))
    seeds: int = field(default=3, metadata=dict(help="seeds per cell", positive=True))
    first_seed: int = field(default=0, metadata=dict(help="the cells' seeds are first_seed .. first_seed + seeds - 1; "
                                                          "settings are chosen on seeds no reported table uses (100)"))
    dni_only: bool = field(default=False, metadata=dict(help="train and show only the DNI runs (all that --choose "
                                                             "reads); the BPTT columns say 'not run'"))
    choose: str = field(default="", metadata=dict(help="comma-separated factors: train nothing, pick the factor "
                                                       "whose DNI solves longest on average in the tables of these "
                                                       "seeds, write <out>/rnn_factor_choice.md"))
    steps: int = field(default=15000, metadata=dict(help="training windows per run", positive=True))
    hidden: int = field(default=RecurrentConfig.hidden, metadata=dict(help="each run's --hidden", positive=True))
    stagger: int = field(default=RecurrentConfig.stagger, metadata=dict(help="each run's --stagger"))
    sg_factor: float = field(default=RecurrentConfig.sg_factor, metadata=dict(help="each run's --sg_factor",
                                                                               positive=True))
    length: int = field(default=0, metadata=dict(help="every run at this episode length N, no curriculum: the "
                                                      "table then gives the error at N (files rnn_table_N<N>.*)"))
    device: str = field(default="cpu", metadata=dict(help="device of every run", choices=DEVICES))
    threads: int = field(default=1, metadata=dict(help="torch CPU threads per run", positive=True))
    jobs: int = field(default=1, metadata=dict(help="runs at once, one process each", positive=True))
    out: str = field(default="results", metadata=dict(help="writes <out>/rnn_table.* and <out>/rnn/<run>/"))
    table_only: bool = field(default=False, metadata=dict(help="train nothing: tabulate the finished runs (a missing "
                                                               "one is an error)"))

    @property
    def stem(self):
        """The table's file name without extension: rnn_table[_N<length>][_f<sg_factor>]."""
        fixed = f"_N{self.length}" if self.length else ""
        seeds = f"_s{self.first_seed}" if self.first_seed else ""
        return f"rnn_table{fixed}{factor_tag(self.sg_factor)}{seeds}"


def cells(config):
    """(task, T, method) of every cell of the table, and the per-run config overrides."""
    methods = ["dni"] if config.dni_only else list(RECURRENT_METHODS)
    if config.quick:
        return ([("copy", 3, m) for m in methods],
                dict(steps=60, hidden=16, min_scored=50, length=config.length, stagger=config.stagger,
                     sg_factor=config.sg_factor, seed_count=1))
    return ([(task, T, m) for task in TASK_NAMES for T in TRUNCATIONS for m in methods],
            dict(steps=config.steps, length=config.length, hidden=config.hidden, stagger=config.stagger,
                 sg_factor=config.sg_factor, seed_count=config.seeds))


def finished(run_config):
    """The summary of `run_config`'s run folder if it holds a finished run of this config, else None.
    A setting added since the run was made (absent from its config) counts as its value then
    (LEGACY), or else as unchanged; PLACE, and for a BPTT run the DNI_ONLY settings, are ignored."""
    summary_path = Path(run_config.out) / run_config.name / "summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        wanted = dataclasses.asdict(run_config)
        ignored = {key: wanted[key] for key in PLACE + (() if run_config.dni else DNI_ONLY)}
        if {**wanted, **LEGACY, **summary.get("config", {}), **ignored} == wanted:
            return summary
    return None


def run_or_reuse(run_config, log):
    """The summary of `run_config`'s finished run, or of a fresh one (a stale run: retrained on purpose)."""
    summary = finished(run_config)
    if summary is not None:
        log(f"reuse {Path(run_config.out) / run_config.name}: solved {summary['solved']}")
        return summary
    return run(dataclasses.replace(run_config, overwrite=True), log=log)


def table_command(argv):
    """The table's command as typed, less what does not change it (--table_only, --jobs)."""
    argv, kept = list(argv), []
    while argv:
        arg = argv.pop(0)
        name, _, value = arg.partition("=")
        if name in ("--table_only", "--jobs"):
            if not value and argv and not argv[0].startswith("--"):
                argv.pop(0)
            continue
        kept.append(arg)
    return shlex.join(["python", "-m", "experiments.recurrent_table", *kept])


def _cell(row, key, format_values):
    """One method's cell of `row`, or 'not run' where the table trained the other method only."""
    return format_values(row[key]) if key in row else "not run"


def _format(values, digits=1):
    """'2.3 ± 0.6 (2, 3, 2)': mean ± std, then each value (floats with `digits` decimals)."""
    mean, std = mean_std(values, single=0.0)
    each = ", ".join(f"{v:.{digits}f}" if isinstance(v, float) else str(v) for v in values)
    return f"{mean:.{digits}f} ± {std:.{digits}f} ({each})"


def _format_next(pairs):
    """'N=4: 1.55, 1.49' (the length each seed was learning when training stopped, and its error)."""
    by_length = {}
    for length, bits in pairs:
        by_length.setdefault(length, []).append(f"{bits:.2f}")
    return "; ".join(f"N={length}: {', '.join(bits)}" for length, bits in sorted(by_length.items()))


def _settings(meta):
    return (f"LSTM {meta['hidden']} units, {meta['symbols']} symbols (Repeat Copy: R in 1..{meta['max_repeats']}), "
            f"batch {meta['batch_size']}, Adam lr {meta['lr']} (synthesizer {meta['sg_lr']}), "
            f"linear synthesizer, synthetic gradient x {meta['sg_factor']}, "
            + (f"streams staggered by 0..{meta['stagger'] - 1} steps." if meta["stagger"]
               else "streams in step (every window at the same phase of the episodes)."))


def _fixed_length_lines(table):
    """The table of a fixed-length grid: the error at N where training stopped."""
    meta = table["meta"]
    lines = [
        f"# Recurrent DNI: error at length N = {meta['length']}, BPTT vs DNI",
        "",
        f"Every run trains at episode length N = {meta['length']} only (no curriculum) for {meta['steps']} "
        f"windows; error in bits per scored step at the last decision ({meta['threshold']} counts as solved), "
        f"mean ± std over {meta['seeds']} seed(s), per-seed values in brackets. " + _settings(meta),
        "",
        "| task | T | BPTT | DNI |",
        "| --- | --- | --- | --- |",
    ]
    for row in table["rows"]:
        cells = [_cell(row, f"{m}_next", lambda pairs: _format([bits for _, bits in pairs], digits=2))
                 for m in RECURRENT_METHODS]
        lines.append(f"| {TASK_NAMES[row['task']]} | {row['T']} | {cells[0]} | {cells[1]} |")
    return lines + [""]


def _curriculum_lines(table):
    """The table of the curriculum grid: longest length solved, and where each run stopped."""
    meta = table["meta"]
    lines = [
        "# Recurrent DNI: longest sequence length solved (paper section 3.2, Table 2)",
        "",
        f"Longest length N solved (error < {meta['threshold']} bits per scored step) in {meta['steps']} "
        f"training windows per run; mean ± std over {meta['seeds']} seed(s), per-seed values in brackets. "
        + _settings(meta),
        "",
        "| task | T | BPTT | DNI | paper BPTT | paper DNI |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in table["rows"]:
        paper = [("n/c" if row["paper"][m] is None else str(row["paper"][m])) for m in RECURRENT_METHODS]
        lines.append(f"| {TASK_NAMES[row['task']]} | {row['T']} | {_cell(row, 'bptt', _format)} | "
                     f"{_cell(row, 'dni', _format)} | {paper[0]} | {paper[1]} |")
    lines += [
        "",
        "Where training stopped: the length N each run was still learning and its error there "
        "(bits per scored step, last curriculum decision; solved below the threshold).",
        "",
        "| task | T | BPTT | DNI |",
        "| --- | --- | --- | --- |",
    ]
    for row in table["rows"]:
        lines.append(f"| {TASK_NAMES[row['task']]} | {row['T']} | {_cell(row, 'bptt_next', _format_next)} | "
                     f"{_cell(row, 'dni_next', _format_next)} |")
    return lines + ["", meta["paper_note"]]


def write_markdown(table, path):
    """rnn_table.md: one row per task and T; ours as mean ± std (per seed), the paper's beside,
    then the error each run had reached on the length it was still learning. A fixed-length
    grid gives the error at its length instead."""
    meta = table["meta"]
    lines = _fixed_length_lines(table) if meta["length"] else _curriculum_lines(table)
    lines += [
        f"Compute: {meta['run_wall_s'] / 60:.1f} min of training in all ({meta['runs']} runs) on "
        f"{meta['gpu'] or meta['cpu'] or meta['device']} ({meta['device']}, {meta['threads']} thread(s) per run, "
        f"torch {meta['torch']}, commit {(meta['git_commit'] or 'unknown')[:7]}).",
        f"Command: `{meta['command']}`",
        *([meta["modified_tree"]] if meta.get("modified_tree") else []),
        "",
    ]
    write_text(Path(path), "\n".join(lines))


def plot_table(table, path):
    """rnn_table.png: longest length solved (fixed length: the error at N) against T, per task,
    BPTT vs DNI, one dot per seed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    length = table["meta"]["length"]
    if length:
        ylabel, values = f"error at N = {length} (bits per step)", lambda row, m: [b for _, b in row[f"{m}_next"]]
    else:
        ylabel, values = "longest length solved", lambda row, m: row[m]
    tasks = sorted({row["task"] for row in table["rows"]}, key=list(TASK_NAMES).index)
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = [r for r in table["rows"] if r["task"] == task]
        for method, color in zip(RECURRENT_METHODS, ("tab:gray", "tab:blue")):
            if method not in rows[0]:
                continue
            Ts = [r["T"] for r in rows]
            ax.plot(Ts, [mean_std(values(r, method))[0] for r in rows], "-o", color=color, label=method.upper())
            for r in rows:
                ax.scatter([r["T"]] * len(values(r, method)), values(r, method), color=color, alpha=0.3, s=12)
        ax.set(title=TASK_NAMES[task], xlabel="truncation T", ylabel=ylabel)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def make_table(config, argv=(), *, log=print):
    """Run (or reuse) every cell's runs and write the table files; returns the table dict.
    `argv` (the flags given) is recorded as the table's command."""
    t0 = time.perf_counter()
    out = Path(config.out)
    grid, overrides = cells(config)
    seed_count = overrides.pop("seed_count")
    run_configs = [RecurrentConfig(task=task, truncation=T, dni=RECURRENT_METHODS[method], seed=seed, device=config.device,
                                   threads=config.threads, out=str(out / "rnn"), **overrides)
                   for task, T, method in grid for seed in range(config.first_seed, config.first_seed + seed_count)]
    if config.table_only:
        summaries = [finished(c) for c in run_configs]
        missing = [c.name for c, s in zip(run_configs, summaries) if s is None]
        if missing:
            raise DNIError(f"{len(missing)} run(s) of this table are not finished, e.g. {out / 'rnn' / missing[0]}; "
                           f"train them with {table_command(argv)}")
    elif config.jobs == 1:
        summaries = [run_or_reuse(c, log) for c in run_configs]
    else:
        with ProcessPoolExecutor(config.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            summaries = list(pool.map(run_or_reuse, run_configs, [print] * len(run_configs)))
    rows = []
    for n, (task, T, method) in enumerate(grid):
        mine = summaries[n * seed_count:(n + 1) * seed_count]
        row = next((r for r in rows if r["task"] == task and r["T"] == T), None)
        if row is None:
            row = dict(task=task, T=T, paper={m: PAPER_TABLE2[task][m][T] for m in RECURRENT_METHODS})
            rows.append(row)
        row[method] = [s["solved"] for s in mine]
        row[f"{method}_next"] = [[s["length"], s["last_bits"]] for s in mine]
    first = summaries[0]["config"]
    dni = next(s["config"] for s in summaries if s["config"]["dni"])  # the DNI_ONLY settings of the table
    env = summaries[0]["env"]
    meta = dict(steps=first["steps"], length=config.length, stagger={**LEGACY, **first}["stagger"], seeds=seed_count,
                first_seed=config.first_seed,
                hidden=first["hidden"],
                batch_size=first["batch_size"], lr=first["lr"], sg_lr=dni["sg_lr"], sg_factor=dni["sg_factor"],
                symbols=first["symbols"], max_repeats=first["max_repeats"], threshold=first["threshold"],
                runs=len(summaries), run_wall_s=round(sum(s["wall_s"] for s in summaries), 1),
                device=env["device"], gpu=env["gpu"],
                cpu=env["cpu"], threads=config.threads, torch=env["torch"], git_commit=env["git_commit"],
                command=table_command(argv), paper_note=PAPER_NOTE,
                modified_tree=modified_tree_line(Path(c.out) / c.name for c in run_configs))
    table = dict(meta=meta, rows=rows)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{config.stem}.json", table)
    write_markdown(table, out / f"{config.stem}.md")
    plot_table(table, out / f"{config.stem}.png")
    log(f"wrote {out / config.stem}.md ({(time.perf_counter() - t0) / 60:.1f} min)")
    return table


def choose_factor(config, argv=(), *, log=print):
    """Pick the synthetic-gradient factor from finished tables of seeds `config.first_seed`..: the one whose
    DNI runs solve the longest lengths, averaged over every task, T and seed (ties: the smaller factor).
    Reads only those tables, so the reported seeds (0-2) never take part; writes rnn_factor_choice.*."""
    if not config.first_seed:
        raise DNIError("--choose reads tables of seeds the reported table does not use: give --first_seed (e.g. 100)")
    try:
        factors = sorted({float(f) for f in config.choose.split(",")})
    except ValueError:
        raise DNIError(f"--choose takes comma-separated factors, e.g. 0.1,0.5,1; got {config.choose!r}") from None
    out, scores = Path(config.out), {}
    for factor in factors:
        stem = dataclasses.replace(config, sg_factor=factor, choose="").stem
        path = out / f"{stem}.json"
        if not path.exists():
            raise DNIError(f"{path} is missing: train it with python -m experiments.recurrent_table --first_seed "
                           f"{config.first_seed} --sg_factor {factor:g}")
        rows = json.loads(path.read_text())["rows"]
        if any(len(row["dni"]) != config.seeds for row in rows):
            raise DNIError(f"{path} does not hold {config.seeds} seeds per cell: remake it with python -m "
                           f"experiments.recurrent_table --first_seed {config.first_seed} --seeds {config.seeds} "
                           f"--dni_only --sg_factor {factor:g}")
        scores[factor] = statistics.mean(v for row in rows for v in row["dni"])
    chosen = max(factors, key=lambda f: (scores[f], -f))
    lines = ["# Recurrent DNI: the synthetic-gradient factor, chosen on seeds the table does not report", "",
             f"Mean length solved by DNI over every task, T and seed {config.first_seed}.."
             f"{config.first_seed + config.seeds - 1} (files rnn_table*_s{config.first_seed}.json):", "",
             "| factor | mean length solved |", "|---|---|"]
    lines += [f"| {f:g} | {scores[f]:.2f} |" for f in factors]
    lines += ["", f"Chosen: {chosen:g}. Made by `{shlex.join(['python', '-m', 'experiments.recurrent_table', *argv])}`.", ""]
    write_json(out / "rnn_factor_choice.json", dict(scores={f"{f:g}": v for f, v in scores.items()},
                                                    chosen=chosen, first_seed=config.first_seed))
    write_text(out / "rnn_factor_choice.md", "\n".join(lines))
    log("\n".join(lines))
    return chosen


def main(argv=None):
    """CLI entry point; a bare `--quick` means `--quick True`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, arg in enumerate(argv):
        if arg == "--quick" and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            argv.insert(i + 1, "True")
    config = parse_config(TableConfig, argv, prog="python -m experiments.recurrent_table",
                          description="Longest length solved, BPTT vs DNI, on Copy / Repeat Copy.")
    return main_guard(choose_factor if config.choose else make_table, config, argv)


if __name__ == "__main__":
    main()
