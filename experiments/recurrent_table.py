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

DNI + Aux (`--aux_weight W` > 0) adds a third method beside DNI, the same runs with the core also
predicting the synthetic gradient of its window's end; the BPTT and DNI runs are the table's without it.
Its weight is chosen the same way, at the chosen factor, scored by the DNI + Aux runs alone:

    python -m experiments.recurrent_table --first_seed 100 --dni_only --sg_factor 0.3 --aux_weight W --jobs 2
    python -m experiments.recurrent_table --first_seed 100 --sg_factor 0.3 --choose_aux 0.03,0.1,0.3
                                                             # -> rnn_aux_choice.md
    python -m experiments.recurrent_table --sg_factor 0.3 --aux_weight <chosen> --jobs 2   # the reported table

Each run is a dnilab.recurrent run folder under <out>/rnn/; a run whose summary.json
holds the same config is reused, so an interrupted table resumes where it stopped.
Writes <out>/rnn_table.json, <out>/rnn_table.md and <out>/rnn_table.png
(with --length N: <out>/rnn_table_N<N>.*; with an --sg_factor F other than 0.1: *_f<F>.*; with
--aux_weight W > 0: *_aux<W>.*; with --first_seed S other than 0: *_s<S>.*).
"""
import dataclasses
import json
import multiprocessing
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from dnilab.cli import parse_config
from dni.errors import DNIError
from dnilab.config import DEVICES
from dnilab.recurrent import RecurrentConfig, factor_tag, run
from dnilab.runs import write_json, write_text
from experiments.recurrent_table_view import (AUX, RECURRENT_METHODS, TASK_NAMES, columns, plot_table,
                                              write_markdown)
from experiments.grid import RECURRENT_NAMES, best_candidate, choice_candidates, grid_main, run_pool
from experiments.provenance import modified_tree_line

TRUNCATIONS = (2, 3, 4, 5, 8)

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
    dni_only: bool = field(default=False, metadata=dict(help="train and show only the DNI (and DNI + Aux) runs (all "
                                                             "that --choose and --choose_aux read); the BPTT columns "
                                                             "say 'not run'"))
    choose: str = field(default="", metadata=dict(help="comma-separated factors: train nothing, pick the factor "
                                                       "whose DNI solves longest on average in the tables of these "
                                                       "seeds, write <out>/rnn_factor_choice.md"))
    choose_aux: str = field(default="", metadata=dict(help="comma-separated DNI + Aux weights: train nothing, pick "
                                                           "the weight whose DNI + Aux solves longest on average in "
                                                           "the tables of these seeds (made with --aux_weight W "
                                                           "--dni_only), write <out>/rnn_aux_choice.md"))
    steps: int = field(default=15000, metadata=dict(help="training windows per run", positive=True))
    hidden: int = field(default=RecurrentConfig.hidden, metadata=dict(help="each run's --hidden", positive=True))
    stagger: int = field(default=RecurrentConfig.stagger, metadata=dict(help="each run's --stagger"))
    sg_factor: float = field(default=RecurrentConfig.sg_factor, metadata=dict(help="each run's --sg_factor",
                                                                               positive=True))
    aux_weight: float = field(default=0.0, metadata=dict(help="> 0: a DNI + Aux column, its runs' --aux_weight "
                                                              "(files *_aux<W>.*); 0: BPTT and DNI only"))
    length: int = field(default=0, metadata=dict(help="every run at this episode length N, no curriculum: the "
                                                      "table then gives the error at N (files rnn_table_N<N>.*)"))
    device: str = field(default="cpu", metadata=dict(help="device of every run", choices=DEVICES))
    threads: int = field(default=1, metadata=dict(help="torch CPU threads per run", positive=True))
    jobs: int = field(default=1, metadata=dict(help="runs at once, one process each", positive=True))
    out: str = field(default="results", metadata=dict(help="writes <out>/rnn_table.* and <out>/rnn/<run>/"))
    table_only: bool = field(default=False, metadata=dict(help="train nothing: tabulate the finished runs (a missing "
                                                               "one is an error)"))

    def __post_init__(self):
        if not 0 <= self.aux_weight < float("inf"):
            raise DNIError(f"--aux_weight must be >= 0 (0: no DNI + Aux column), got {self.aux_weight}")
        if self.choose and self.choose_aux:
            raise DNIError("--choose and --choose_aux are two choices: give one at a time")

    @property
    def stem(self):
        """The table's file name without extension:
        rnn_table[_N<length>][_f<sg_factor>][_aux<aux_weight>][_s<first_seed>]."""
        fixed = f"_N{self.length}" if self.length else ""
        aux = f"_aux{self.aux_weight:g}" if self.aux_weight else ""
        seeds = f"_s{self.first_seed}" if self.first_seed else ""
        return f"rnn_table{fixed}{factor_tag(self.sg_factor)}{aux}{seeds}"


def method_settings(method, aux_weight):
    """The RecurrentConfig settings that make a run of `method`; only DNI + Aux runs get the weight,
    so the BPTT and DNI runs are those of the table without it."""
    return dict(dni=RECURRENT_METHODS[method], aux_weight=aux_weight if method == AUX else 0.0)


def cells(config):
    """(task, T, method) of every cell of the table, and the per-run config overrides."""
    methods = [m for m in columns(config.aux_weight) if not (config.dni_only and m == "bptt")]
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


def make_table(config, argv=(), *, log=print):
    """Run (or reuse) every cell's runs and write the table files; returns the table dict.
    `argv` (the flags given) is recorded as the table's command."""
    t0 = time.perf_counter()
    out = Path(config.out)
    grid, overrides = cells(config)
    seed_count = overrides.pop("seed_count")
    run_configs = [RecurrentConfig(task=task, truncation=T, seed=seed, device=config.device, threads=config.threads,
                                   out=str(out / "rnn"), **method_settings(method, config.aux_weight), **overrides)
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
        with run_pool(config.jobs, multiprocessing.get_context("spawn")) as pool:
            summaries = list(pool.map(run_or_reuse, run_configs, [print] * len(run_configs)))
    rows = []
    for n, (task, T, method) in enumerate(grid):
        mine = summaries[n * seed_count:(n + 1) * seed_count]
        row = next((r for r in rows if r["task"] == task and r["T"] == T), None)
        if row is None:
            row = dict(task=task, T=T, paper={m: PAPER_TABLE2[task][m][T] for m in columns(config.aux_weight)})
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
                **({"aux_weight": config.aux_weight} if config.aux_weight else {}),
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


@dataclass(frozen=True)
class Choice:
    """What a choice flag picks: the table setting it varies, the method whose runs score it, the
    files it writes (<out>/<stem>.md and .json) and the table files it reads (`files`, a pattern
    shown in its page), and the settings held fixed that its page records."""
    flag: str
    setting: str
    method: str
    noun: str
    title: str
    stem: str
    files: str
    fixed: tuple = ()


CHOICES = {
    "choose": Choice(flag="choose", setting="sg_factor", method="dni", noun="factor", stem="rnn_factor_choice",
                     title="Recurrent DNI: the synthetic-gradient factor, chosen on seeds the table does not report",
                     files="rnn_table*_s{first_seed}.json"),
    "choose_aux": Choice(flag="choose_aux", setting="aux_weight", method=AUX, noun="weight", stem="rnn_aux_choice",
                         title="Recurrent DNI + Aux: the auxiliary weight, chosen on seeds the table does not report",
                         files="rnn_table{factor}_aux*_s{first_seed}.json", fixed=("sg_factor",)),
}


def choose(config, argv=(), *, choice, log=print):
    """Pick `choice.setting` from finished tables of seeds `config.first_seed`..: the candidate (the
    comma-separated values of --<choice.flag>) whose `choice.method` runs solve the longest lengths,
    averaged over every task, T and seed (ties: the smaller value). Reads only those tables, so the
    reported seeds (0-2) never take part; writes <out>/<choice.stem>.md and .json; returns the value."""
    flag = f"--{choice.flag}"
    values = choice_candidates(flag, getattr(config, choice.flag), choice.noun, first_seed=config.first_seed,
                               example="0.1,0.5,1")
    out, scores = Path(config.out), {}
    for value in values:
        candidate = dataclasses.replace(config, choose="", choose_aux="", **{choice.setting: value})
        path = out / f"{candidate.stem}.json"
        remake = (f"python -m experiments.recurrent_table --first_seed {config.first_seed}"
                  + (f" --seeds {config.seeds}" if config.seeds != TableConfig.seeds else "")
                  + f" --dni_only --sg_factor {candidate.sg_factor:g}"
                  + (f" --aux_weight {candidate.aux_weight:g}" if candidate.aux_weight else ""))
        if not path.exists():
            raise DNIError(f"{path} is missing: train it with {remake}")
        rows = json.loads(path.read_text())["rows"]
        if any(len(row.get(choice.method, ())) != config.seeds for row in rows):
            raise DNIError(f"{path} does not hold {config.seeds} seeds per cell: remake it with {remake}")
        scores[value] = statistics.mean(v for row in rows for v in row[choice.method])
    chosen = best_candidate(scores)
    files = choice.files.format(factor=factor_tag(config.sg_factor), first_seed=config.first_seed)
    lines = [f"# {choice.title}", "",
             f"Mean length solved by {RECURRENT_NAMES[choice.method]} over every task, T and seed {config.first_seed}.."
             f"{config.first_seed + config.seeds - 1} (files {files}):", "",
             f"| {choice.noun} | mean length solved |", "|---|---|"]
    lines += [f"| {v:g} | {scores[v]:.2f} |" for v in values]
    lines += ["", f"Chosen: {chosen:g}. Made by `{shlex.join(['python', '-m', 'experiments.recurrent_table', *argv])}`.", ""]
    write_json(out / f"{choice.stem}.json", dict(scores={f"{v:g}": score for v, score in scores.items()},
                                                 chosen=chosen, first_seed=config.first_seed,
                                                 **{key: getattr(config, key) for key in choice.fixed}))
    write_text(out / f"{choice.stem}.md", "\n".join(lines))
    log("\n".join(lines))
    return chosen


def main(argv=None):
    """CLI entry point; a bare `--quick` means `--quick True`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, arg in enumerate(argv):
        if arg == "--quick" and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            argv.insert(i + 1, "True")
    config = parse_config(TableConfig, argv, prog="python -m experiments.recurrent_table",
                          description="Longest length solved, BPTT vs DNI (vs DNI + Aux), on Copy / Repeat Copy.")
    flag = "choose" if config.choose else "choose_aux" if config.choose_aux else None
    return grid_main(partial(choose, choice=CHOICES[flag]) if flag else make_table, config, argv)


if __name__ == "__main__":
    main()
