"""The two-timescale table (the paper's multi-network system, section 3): B's validation accuracy
against A's ticks, and the seconds to reach an accuracy with A and B as two processes, for
backprop, DNI and the two baselines where B does not teach A (A frozen; A on its own task),
at T = 2, 4, 8.

    python -m experiments.timescales_table                       # the grid: 3 T x 4 methods x 3 seeds, two processes each
    python -m experiments.timescales_table --seeds 1 --ticks 2000   # a short slice
    python -m experiments.timescales_table --table_only          # tabulate the finished runs in results/timescales/

A's learning rate under DNI (`--dni_lr`) is chosen on seeds the reported table does not use:
train the DNI runs of each candidate on seeds 100-102, let `--choose_lr` pick the rate whose DNI
runs end with the best mean validation accuracy over every T and seed, then report seeds 0-2 at
that rate (one task per choice):

    python -m experiments.timescales_table --task count --first_seed 100 --dni_only --dni_lr L   # L: 1e-4 1e-5 1e-6
    python -m experiments.timescales_table --task count --first_seed 100 --choose_lr 1e-4,1e-5,1e-6
                                                        # -> timescales_lr_choice_count.md
    python -m experiments.timescales_table --task count --dni_lr <chosen>   # the reported grid

Each run is a `python timescales.py` run folder under <results>/<stem>/ (its command.txt holds
its command); a finished run with the same settings is reused. The stem is `timescales` for the
reported seeds (--first_seed 0) and `timescales_lr<dni_lr>_s<first_seed>` otherwise, so a
choice's runs and tables never mix with the reported ones, nor one candidate's with another's.
`--table_only` trains nothing and reads every finished run folder there, whatever this command's
other flags say: the settings in the table are the runs' own (a cell whose runs differ in
settings other than the seed is refused). Writes <results>/<stem>.md, .json and .png.
"""
import dataclasses
import json
import shlex
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from dni.errors import DNIError
from dnilab.cli import parse_config
from dnilab.runs import write_json, write_text
from dnilab.timescales import SYSTEM_METHODS, TASKS, TimescalesConfig
from dnilab.timescales_train import run
from experiments.grid import best_candidate, choice_candidates, grid_main, mean_std
from experiments.provenance import modified_tree_line

SPANS = (2, 4, 8)
# What a run's folder and place are, not what it computed: ignored when runs are compared.
PLACE = ("out", "name", "overwrite", "seed")
METHOD_NAMES = {"backprop": "backprop (A waits for B)", "dni": "DNI (A taught by a synthesizer)",
                "frozen": "A frozen at init", "own_task": "A on its own task (digit class)"}


@dataclass
class TableConfig:
    """The grid's settings; those of each run are TimescalesConfig's defaults unless given here."""
    spans: str = field(default="2,4,8", metadata=dict(help="values of T, comma-separated"))
    task: str = field(default="count", metadata=dict(help="B's target (dnilab.timescales.TASKS)", choices=TASKS))
    methods: str = field(default=",".join(SYSTEM_METHODS), metadata=dict(help="methods, comma-separated"))
    seeds: int = field(default=3, metadata=dict(help="seeds first_seed..first_seed+seeds-1 per cell", positive=True))
    first_seed: int = field(default=0, metadata=dict(help="the first seed of every cell; choices are made on seeds no "
                                                          "reported table uses (100), in files and a run folder "
                                                          "named timescales_lr<dni_lr>_s<first_seed>"))
    dni_only: bool = field(default=False, metadata=dict(help="train and show only the DNI runs (all that --choose_lr "
                                                             "reads); needs a non-zero --first_seed"))
    choose_lr: str = field(default="", metadata=dict(help="comma-separated DNI rates of A: train nothing, pick the "
                                                          "rate whose DNI runs end with the best mean validation "
                                                          "accuracy in the tables of these seeds, write "
                                                          "<results>/timescales_lr_choice_<task>.md"))
    ticks: int = field(default=TimescalesConfig.ticks, metadata=dict(help="training ticks of A per run", positive=True))
    dni_lr: float = field(default=TimescalesConfig.dni_lr, metadata=dict(help="A's Adam learning rate under DNI",
                                                                          positive=True))
    processes: int = field(default=2, metadata=dict(help="1 or 2 processes per run (the seconds need 2)",
                                                    choices=(1, 2)))
    target: float = field(default=0.6, metadata=dict(help="the accuracy whose seconds and ticks the table reports",
                                                     positive=True))
    results: str = field(default="results", metadata=dict(help="writes <results>/<stem>.* and runs in "
                                                               "<results>/<stem>/ (stem: timescales for seeds 0..)"))
    table_only: bool = field(default=False, metadata=dict(help="train nothing: tabulate the finished runs"))

    def __post_init__(self):
        try:
            self.span_list = tuple(int(t) for t in self.spans.split(","))
        except ValueError:
            raise DNIError(f"--spans must be integers separated by commas, got {self.spans!r}") from None
        if any(t < 1 for t in self.span_list):
            raise DNIError(f"--spans must be positive, got {self.spans!r}")
        self.method_list = ("dni",) if self.dni_only else tuple(self.methods.split(","))
        unknown = [m for m in self.method_list if m not in SYSTEM_METHODS]
        if unknown:
            raise DNIError(f"--methods got {unknown[0]!r}; expected some of {', '.join(SYSTEM_METHODS)}")
        if not self.target < 1:
            raise DNIError(f"--target must be below 1, got {self.target}")
        if self.first_seed < 0:
            raise DNIError(f"--first_seed must be >= 0, got {self.first_seed}")
        if self.dni_only and not self.first_seed:
            raise DNIError("--dni_only makes a table for a choice, on seeds the reported table does not use: "
                           "give --first_seed (e.g. 100)")

    @property
    def stem(self):
        """The table's file name without extension, and its runs' folder under <results>:
        timescales for the reported seeds, timescales_lr<dni_lr>_s<first_seed> for any other."""
        return f"timescales_lr{self.dni_lr:g}_s{self.first_seed}" if self.first_seed else "timescales"

    @property
    def seed_list(self):
        """The seeds of every cell: first_seed .. first_seed + seeds - 1."""
        return tuple(range(self.first_seed, self.first_seed + self.seeds))


def _settings(config):
    """What a run computed: its config less its place and seed (and dni_lr, unless it is a DNI run)."""
    ignored = PLACE + (() if config.get("method") == "dni" else ("dni_lr",))
    return {k: v for k, v in config.items() if k not in ignored}


def finished_runs(folder):
    """Every finished run under `folder`: (run folder, summary, metrics rows)."""
    runs = []
    for summary_path in sorted(Path(folder).glob("*/summary.json")):
        run_dir = summary_path.parent
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
        runs.append((run_dir, json.loads(summary_path.read_text()), rows))
    return runs


def train_grid(config, log=print):
    """Run, or reuse, every run of the grid (one at a time: a two-process run takes both cores)."""
    out = Path(config.results) / config.stem
    for T in config.span_list:
        for method in config.method_list:
            for seed in config.seed_list:
                run_config = TimescalesConfig(method=method, task=config.task, span=T, ticks=config.ticks,
                                              dni_lr=config.dni_lr, processes=config.processes, seed=seed,
                                              out=str(out))
                path = out / run_config.name / "summary.json"
                if path.exists() and _settings(json.loads(path.read_text())["config"]) == \
                        _settings(dataclasses.asdict(run_config)):
                    log(f"reuse {path.parent}")
                    continue
                run(dataclasses.replace(run_config, overwrite=True), log=log)


def first_reaching(rows, target):
    """(tick, seconds) of the first evaluation at or above `target`, or None."""
    for row in rows:
        if row["val_acc"] >= target:
            return row["tick"], row["time"]
    return None


def tabulate(runs, target):
    """Cells keyed by (T, method, processes): per seed the final val and test accuracy, the curve
    and the first (tick, seconds) at `target`; one set of settings per cell, else an error."""
    cells = {}
    for run_dir, summary, rows in runs:
        c = summary["config"]
        key = (c.get("task", "count"), c["span"], c["method"], c["processes"])
        cell = cells.setdefault(key, dict(settings=_settings(c), runs=[]))
        if cell["settings"] != _settings(c):
            differ = sorted(k for k in cell["settings"] if cell["settings"][k] != _settings(c).get(k))
            raise DNIError(f"runs of {key[0]} T={key[1]} {key[2]} differ in {', '.join(differ)} ({run_dir}); "
                           f"move one set out of the folder")
        cell["runs"].append(dict(folder=str(run_dir), seed=c["seed"], val_acc=summary["val_acc"],
                                 test_acc=summary["test_acc"], train_s=summary["train_s"],
                                 curve=[[r["tick"], r["time"], r["val_acc"]] for r in rows],
                                 reached=first_reaching(rows, target)))
    return cells


def _pm(values, digits=3):
    mean, std = mean_std(values)
    return f"{mean:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


def _reached(cell, index, digits):
    got = [r["reached"][index] for r in cell["runs"] if r["reached"] is not None]
    n = len(cell["runs"])
    if not got:
        return f"not reached (0/{n})"
    return _pm(got, digits) + ("" if len(got) == n else f" ({len(got)}/{n} seeds)")


def write_markdown(table, path):
    meta, cells = table["meta"], table["cells"]
    seeds = sorted({r["seed"] for cell in cells for r in cell["runs"]})
    rates = sorted({cell["dni_lr"] for cell in cells if "dni_lr" in cell})
    lines = ["# Two networks at two timescales", "",
             "B's accuracy (spans right) at its task on the last T digits that A read: count, how many were odd; parities, the parity of each (validation split: the last "
             "10,000 training images, read as fixed streams; test once at the end). "
             f"Runs: {meta['runs']}, seeds {', '.join(map(str, seeds))}"
             + (f"; A's rate under DNI {', '.join(f'{r:g}' for r in rates)}" if rates else "")
             + f"; command: `{meta['command']}`. "
             f"{meta['hardware']}.", ""]
    if meta["modified_tree"]:
        lines += [meta["modified_tree"], ""]
    lines += ["| task | T | method | processes | ticks | seeds | val acc | test acc | "
              f"ticks to {meta['target']:g} | seconds to {meta['target']:g} | train s |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for cell in cells:
        runs = cell["runs"]
        lines.append(f"| {cell['task']} | {cell['T']} | {METHOD_NAMES[cell['method']]} | {cell['processes']} | "
                     f"{cell['ticks']} | {len(runs)} | {_pm([r['val_acc'] for r in runs])} | "
                     f"{_pm([r['test_acc'] for r in runs])} | {_reached(cell, 0, 0)} | {_reached(cell, 1, 1)} | "
                     f"{_pm([r['train_s'] for r in runs], 1)} |")
    lines += ["", "Seconds are training time from both processes being ready to B finishing the span "
              "evaluated (evaluation is untimed); with one process they measure nothing about DNI. "
              f"Mean ± std over seeds. The curves (val acc against A's ticks) are in {meta['stem']}.json and "
              f"{meta['stem']}.png.", ""]
    write_text(path, "\n".join(lines))


def plot(table, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spans = sorted({c["T"] for c in table["cells"]})
    fig, axes = plt.subplots(1, len(spans), figsize=(4.5 * len(spans), 3.5), squeeze=False)
    for ax, T in zip(axes[0], spans):
        for cell in (c for c in table["cells"] if c["T"] == T):  # every task's, each labelled
            curves = [r["curve"] for r in cell["runs"]]
            n = min(len(c) for c in curves)
            ticks = [curves[0][i][0] for i in range(n)]
            mean = [sum(c[i][2] for c in curves) / len(curves) for i in range(n)]
            ax.plot(ticks, mean, label=f"{cell['task']} {cell['method']} ({cell['processes']}p)")
        ax.set(title=f"T = {T}", xlabel="A's ticks", ylabel="B's val accuracy")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def make_table(config, argv=(), *, log=print):
    """Train (or reuse) the grid unless --table_only, then write the table from the run folders of
    <results>/<stem>/ (with --dni_only, their DNI runs alone)."""
    folder = Path(config.results) / config.stem
    if not config.table_only:
        train_grid(config, log)
    runs = [r for r in finished_runs(folder) if not config.dni_only or r[1]["config"]["method"] == "dni"]
    if not runs:
        kept = [a for a in argv if a not in ("--table_only", "--table_only=True")]
        raise DNIError(f"no finished run in {folder}; train them with "
                       f"{shlex.join(['python', '-m', 'experiments.timescales_table', *kept])}")
    cells = tabulate(runs, config.target)
    ordered = []
    for (task, T, method, processes), cell in sorted(
            cells.items(), key=lambda kv: (TASKS.index(kv[0][0]), kv[0][1], SYSTEM_METHODS.index(kv[0][2]), kv[0][3])):
        rate = {k: v for k, v in cell["settings"].items() if k == "dni_lr" and method == "dni"}
        ordered.append(dict(task=task, T=T, method=method, processes=processes, ticks=cell["settings"]["ticks"],
                            **rate, runs=cell["runs"]))
    env = runs[0][1]["env"]
    kept = [a for a in argv if a not in ("--table_only", "--table_only=True")]
    meta = dict(stem=config.stem, target=config.target, runs=len(runs), command=shlex.join(["python", "-m", "experiments.timescales_table", *kept]),
                hardware=f"CPU {env['cpu']}, torch {env['torch']}, one thread per process, commit {env['git_commit']}",
                modified_tree=modified_tree_line(r[0] for r in runs), settings=runs[0][1]["config"])
    table = dict(meta=meta, cells=ordered)
    out = Path(config.results)
    write_json(out / f"{config.stem}.json", table)
    write_markdown(table, out / f"{config.stem}.md")
    plot(table, out / f"{config.stem}.png")
    log(f"wrote {out / config.stem}.md")
    return table


def choose_lr(config, argv=(), *, log=print):
    """Pick A's rate under DNI from finished tables of seeds `config.first_seed`.. (made with
    `--first_seed S --dni_only --dni_lr L` for each candidate L of --choose_lr): the rate whose DNI
    runs of `config.task` end with the best validation accuracy, averaged over every T of --spans
    and every seed (ties: the smaller rate). Reads only those tables, so the reported seeds (0..)
    never take part; writes <results>/timescales_lr_choice_<task>.md and .json; returns the rate."""
    values = choice_candidates("--choose_lr", config.choose_lr, "rate", first_seed=config.first_seed,
                               example="1e-4,1e-5,1e-6")
    out, scores, files = Path(config.results), {}, []
    for rate in values:
        candidate = dataclasses.replace(config, choose_lr="", dni_only=True, dni_lr=rate)
        path = out / f"{candidate.stem}.json"
        defaults = TableConfig(first_seed=config.first_seed, dni_only=True)
        remake = shlex.join(["python", "-m", "experiments.timescales_table", "--task", config.task,
                             "--first_seed", str(config.first_seed),
                             *[a for key in ("seeds", "spans", "ticks", "processes")
                               if getattr(config, key) != getattr(defaults, key)
                               for a in (f"--{key}", str(getattr(config, key)))],
                             "--dni_only", "--dni_lr", f"{rate:g}"])
        if not path.exists():
            raise DNIError(f"{path} is missing: train it with {remake}")
        cells = [c for c in json.loads(path.read_text())["cells"]
                 if c["method"] == "dni" and c["task"] == config.task and c["processes"] == config.processes]
        if sorted(c["T"] for c in cells) != sorted(config.span_list) or any(
                c["ticks"] != config.ticks or c.get("dni_lr") != rate
                or sorted(r["seed"] for r in c["runs"]) != list(candidate.seed_list) for c in cells):
            raise DNIError(f"{path} does not hold the DNI runs of {config.task} at T = {config.spans}, "
                           f"seeds {candidate.seed_list[0]}..{candidate.seed_list[-1]}, {config.ticks} ticks, "
                           f"{config.processes} process(es), rate {rate:g}: remake it with {remake}")
        scores[rate] = statistics.mean(r["val_acc"] for c in cells for r in c["runs"])
        files.append(path.name)
    chosen = best_candidate(scores)
    seeds = config.seed_list
    lines = [f"# Two timescales ({config.task}): A's learning rate under DNI, chosen on seeds the table does not report",
             "", f"Mean final validation accuracy of B with A taught by DNI, over T = {config.spans} and seeds "
             f"{seeds[0]}..{seeds[-1]} ({config.ticks} ticks, {config.processes} process(es); files "
             f"{', '.join(files)}):", "",
             "| A's rate under DNI | mean val acc |", "|---|---|"]
    lines += [f"| {v:g} | {scores[v]:.4f} |" for v in values]
    lines += ["", f"Chosen: {chosen:g}. Made by "
              f"`{shlex.join(['python', '-m', 'experiments.timescales_table', *argv])}`.", ""]
    stem = f"timescales_lr_choice_{config.task}"
    write_json(out / f"{stem}.json", dict(scores={f"{v:g}": score for v, score in scores.items()}, chosen=chosen,
                                          task=config.task, first_seed=config.first_seed, seeds=config.seeds,
                                          spans=list(config.span_list), ticks=config.ticks,
                                          processes=config.processes))
    write_text(out / f"{stem}.md", "\n".join(lines))
    log("\n".join(lines))
    return chosen


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    config = parse_config(TableConfig, argv, prog="python -m experiments.timescales_table",
                          description="The two-timescale table: backprop, DNI and two baselines at T = 2, 4, 8.")
    return grid_main(choose_lr if config.choose_lr else make_table, config, argv)


if __name__ == "__main__":
    main()
