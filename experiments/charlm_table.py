"""The character-level language-modelling table (paper, section 3.2, its Penn Treebank column,
here on Debian's fortunes): test bits per character of truncated BPTT, DNI and DNI + Aux at
T = 2, 3, 4, 5, 8, each read once at its best validation within the same cap on characters seen.

    python -m experiments.charlm_table --jobs 2          # train what is missing, then the table
    python -m experiments.charlm_table --table_only      # the table from the finished run folders
    python -m experiments.charlm_table --choose_aux 0.01,0.1,1 --jobs 2   # DNI + Aux's weight, first

The weight of DNI + Aux is chosen before the grid, on a seed no table reports (100), at T = 3:
each candidate trains once and the lowest best-validation bits per character wins (ties: the
smaller weight); <out>/charlm_aux_choice.md says which. The grid then runs with
`--aux_weight <chosen>`.

References beside the grid: truncated BPTT with a long window (T = 128), to show how much of
truncation's loss DNI recovers; and, for equal compute, the BPTT run whose seconds per character
are nearest DNI's at T = 3. Writes <out>/charlm_table.{json,md} and <out>/charlm_curves.png
(validation bits per character against characters seen at T = 3, one line per method). Each run
is a dnilab.charlm run folder under <out>/charlm/; a finished run of the same settings is reused.
Budgets, seeds and settings are read from the run folders, never from this command's flags.
"""
import json
import shlex
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from dnilab.charlm import LM_METHODS, CharLMConfig, run
from dni.errors import DNIError
from dnilab.cli import parse_config
from dnilab.runs import write_json, write_text
from experiments.grid import RECURRENT_NAMES, grid_main, mean_std, run_pool
from experiments.provenance import modified_tree_line

TRUNCATIONS = (2, 3, 4, 5, 8)
LONG_T = 128
PLACE = ("out", "overwrite")  # where a run was written, not what it computed


@dataclass
class TableConfig:
    """Every default of `python -m experiments.charlm_table`."""
    seeds: int = field(default=3, metadata=dict(help="seeds per cell", positive=True))
    chars: int = field(default=CharLMConfig.chars, metadata=dict(help="each run's --chars", positive=True))
    hidden: int = field(default=CharLMConfig.hidden, metadata=dict(help="each run's --hidden", positive=True))
    aux_weight: float = field(default=CharLMConfig.aux_weight, metadata=dict(help="each DNI + Aux run's --aux_weight",
                                                                             positive=True))
    jobs: int = field(default=1, metadata=dict(help="runs at once, one process each", positive=True))
    out: str = field(default="results", metadata=dict(help="writes <out>/charlm_table.* and <out>/charlm/<run>/"))
    table_only: bool = field(default=False, metadata=dict(help="train nothing: tabulate the finished runs"))
    choose_aux: str = field(default="", metadata=dict(help="comma-separated DNI + Aux weights (at most 4): train "
                                                           "each at T = 3 on seed 100, write "
                                                           "<out>/charlm_aux_choice.md; no table"))


def run_configs(table):
    """Every run of the table: the grid, then the long-window reference (one seed)."""
    common = dict(chars=table.chars, hidden=table.hidden)
    grid = [CharLMConfig(method=m, truncation=T, seed=s, aux_weight=table.aux_weight, **common,
                         out=f"{table.out}/charlm/{m}_T{T}_s{s}")
            for s in range(table.seeds) for T in TRUNCATIONS for m in LM_METHODS]
    return grid + [CharLMConfig(method="bptt", truncation=LONG_T, seed=0, **common,
                                out=f"{table.out}/charlm/bptt_T{LONG_T}_s0")]


def finished(config):
    """The summary of config's run folder if it holds a finished run of these settings, else None."""
    path = Path(config.out) / "summary.json"
    if not path.exists():
        return None
    summary = json.loads(path.read_text())
    wanted, had = asdict(config), summary["config"]
    ignored = set(PLACE) | ({"aux_weight", "sg_lr", "sg_factor"} if config.method == "bptt" else set()) \
        | ({"aux_weight"} if config.method == "dni" else set())
    return summary if {k: v for k, v in had.items() if k not in ignored} == \
        {k: v for k, v in wanted.items() if k not in ignored} else None


def _train(config):
    return run(replace(config, overwrite=True), log=lambda line: print(line, flush=True))


def train_missing(table, log=print):
    todo = [c for c in run_configs(table) if finished(c) is None]
    log(f"charlm_table: {len(todo)} run(s) to train, --jobs {table.jobs}")
    with run_pool(table.jobs) as pool:
        list(pool.map(_train, todo))


def collect(out):
    """Every finished run under <out>/charlm, grouped: {(method, T): [summary, ...]} (seeds in order)."""
    runs = {}
    for path in sorted(Path(out, "charlm").glob("*/summary.json")):
        summary = json.loads(path.read_text())
        summary["folder"] = str(path.parent)
        c = summary["config"]
        runs.setdefault((c["method"], c["truncation"]), []).append(summary)
    for group in runs.values():
        group.sort(key=lambda s: s["config"]["seed"])
    return runs


def cell(group):
    """Mean ± std of test bits per character (and of validation), with the seeds it holds."""
    test, val = mean_std([s["test_bits"] for s in group]), mean_std([s["val_bits"] for s in group])
    return dict(test=test, val=val, seeds=[s["config"]["seed"] for s in group],
                seconds_per_mchar=sum(s["seconds_per_mchar"] for s in group) / len(group))


def table_dict(out, command):
    runs = collect(out)
    cells = {f"{m}/T{T}": cell(g) for (m, T), g in runs.items()}
    dni3 = cells.get("dni/T3")
    equal = None
    candidates = [(int(k.split("/T")[1]), v) for k, v in cells.items() if k.startswith("bptt/")]
    if dni3 and candidates:  # the BPTT run nearest DNI at T=3 in seconds per character
        T, c = min(candidates, key=lambda tc: abs(tc[1]["seconds_per_mchar"] - dni3["seconds_per_mchar"]))
        equal = dict(truncation=T, **c)
    folders = [s["folder"] for g in runs.values() for s in g]
    budgets = sorted({s["chars"] for g in runs.values() for s in g})
    configs = [s["config"] for g in runs.values() for s in g]
    return dict(cells=cells, equal_compute=equal, chars=budgets, hidden=sorted({c["hidden"] for c in configs}),
                aux_weight=sorted({c["aux_weight"] for c in configs if c["method"] == "dni_aux"}),
                curves={m: [json.loads(line) for line in Path(runs[(m, 3)][0]["folder"], "metrics.jsonl").read_text()
                            .splitlines() if line] for m in LM_METHODS if (m, 3) in runs},
                modified_tree=modified_tree_line([Path(f) for f in folders]), command=command)


def _fmt(stat):
    mean, std = stat
    return "—" if mean is None else f"{mean:.3f}" + ("" if std is None else f" ± {std:.3f}")


def markdown(table):
    cells = table["cells"]
    lines = ["# Character-level language modelling on fortunes: truncated BPTT, DNI, DNI + Aux", "",
             f"Test bits per character at the best validation, mean ± std over seeds (the seeds each cell holds "
             f"in brackets); every run saw {', '.join(f'{c:,}' for c in table['chars'])} training characters; "
             f"LSTM of {', '.join(map(str, table['hidden']))} units; DNI + Aux weight "
             f"{', '.join(f'{w:g}' for w in table['aux_weight']) or '—'}. Validation bits per character (the "
             "early-stopping criterion) beside each.", "",
             "| T | " + " | ".join(RECURRENT_NAMES[m] for m in LM_METHODS) + " | DNI ≤ BPTT | DNI + Aux ≤ DNI |",
             "|---|" + "---|" * (len(LM_METHODS) + 2)]
    for T in TRUNCATIONS:
        row = [f"| {T} "]
        means = {}
        for m in LM_METHODS:
            c = cells.get(f"{m}/T{T}")
            if c is None:
                row.append("| not run ")
                continue
            means[m] = c["test"][0]
            row.append(f"| {_fmt(c['test'])} (val {_fmt(c['val'])}; seeds {c['seeds']}) ")
        holds = lambda a, b: "—" if a not in means or b not in means else ("yes" if means[a] <= means[b] else "no")
        lines.append("".join(row) + f"| {holds('dni', 'bptt')} | {holds('dni_aux', 'dni')} |")
    long = cells.get(f"bptt/T{LONG_T}")
    lines += ["", "References:", "",
              f"- truncated BPTT at T = {LONG_T}: " + ("not run" if long is None else
                                                       f"{_fmt(long['test'])} test bits per character (seeds {long['seeds']})."),
              "- equal compute: " + ("not run" if table["equal_compute"] is None else
                                     f"BPTT at T = {table['equal_compute']['truncation']} runs nearest DNI at T = 3 "
                                     f"in seconds per character ({table['equal_compute']['seconds_per_mchar']:.1f} "
                                     f"against {cells['dni/T3']['seconds_per_mchar']:.1f} s per million): "
                                     f"{_fmt(table['equal_compute']['test'])} test bits per character."),
              "", f"Made by `{table['command']}`; validation curves at T = 3: charlm_curves.png.",
              *([table["modified_tree"]] if table["modified_tree"] else []), ""]
    return "\n".join(lines)


def plot(table, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for m, rows in table["curves"].items():
        ax.plot([r["chars"] for r in rows], [r["val_bits"] for r in rows], label=RECURRENT_NAMES[m])
    ax.set(xlabel="training characters seen", ylabel="validation bits per character", title="fortunes, T = 3, seed 0")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table_command(argv):
    kept, argv = [], list(argv)
    while argv:
        arg = argv.pop(0)
        if arg.partition("=")[0] in ("--table_only", "--jobs"):
            if "=" not in arg and argv and not argv[0].startswith("--"):
                argv.pop(0)
            continue
        kept.append(arg)
    return shlex.join(["python", "-m", "experiments.charlm_table", "--table_only", *kept])


def main_table(table, argv, log=print):
    if not table.table_only:
        train_missing(table, log)
    result = table_dict(table.out, table_command(argv))
    write_json(Path(table.out, "charlm_table.json"), result)
    write_text(Path(table.out, "charlm_table.md"), markdown(result))
    if result["curves"]:
        plot(result, Path(table.out, "charlm_curves.png"))
    log(markdown(result))
    return result


CHOICE_SEED, CHOICE_T, MAX_CANDIDATES = 100, 3, 4


def choice_configs(table):
    """The runs of the weight choice: DNI + Aux at T = 3, seed 100 (no table reports it), one per weight."""
    try:
        weights = sorted({float(w) for w in table.choose_aux.split(",")})
    except ValueError:
        raise DNIError(f"--choose_aux takes comma-separated weights, e.g. 0.01,0.1,1; got {table.choose_aux!r}") from None
    if not 0 < len(weights) <= MAX_CANDIDATES or min(weights) <= 0:
        raise DNIError(f"--choose_aux takes 1 to {MAX_CANDIDATES} weights above 0; got {table.choose_aux!r}")
    return [CharLMConfig(method="dni_aux", truncation=CHOICE_T, seed=CHOICE_SEED, aux_weight=w, chars=table.chars,
                         hidden=table.hidden, out=f"{table.out}/charlm_choice/dni_aux_T{CHOICE_T}_w{w:g}_s{CHOICE_SEED}")
            for w in weights]


def choose_aux(table, argv, log=print):
    """Train (or reuse) the choice's runs and pick the weight with the lowest best validation bits
    per character; writes <out>/charlm_aux_choice.{md,json}. Reads no test figure."""
    configs = choice_configs(table)
    if not table.table_only:
        todo = [c for c in configs if finished(c) is None]
        with run_pool(table.jobs) as pool:
            list(pool.map(_train, todo))
    scores = {}
    for c in configs:
        summary = finished(c)
        if summary is None:
            raise DNIError(f"{c.out} is not finished: train it with python -m experiments.charlm_table "
                           f"--choose_aux {table.choose_aux}")
        scores[c.aux_weight] = summary["val_bits"]
    chosen = min(scores, key=lambda w: (scores[w], w))
    command = shlex.join(["python", "-m", "experiments.charlm_table", *argv])
    lines = ["# DNI + Aux's weight on the character-level LSTM, chosen on a seed no table reports", "",
             f"Best validation bits per character of DNI + Aux at T = {CHOICE_T}, seed {CHOICE_SEED}, each run "
             f"{configs[0].chars:,} training characters (the test split is read by these runs but not here):", "",
             "| weight | validation bits per character |", "|---|---|",
             *[f"| {w:g} | {v:.4f} |" for w, v in sorted(scores.items())], "",
             f"Chosen: {chosen:g}. Made by `{command}`.", ""]
    write_json(Path(table.out, "charlm_aux_choice.json"), dict(scores={f"{w:g}": v for w, v in scores.items()},
                                                               chosen=chosen, seed=CHOICE_SEED, truncation=CHOICE_T))
    write_text(Path(table.out, "charlm_aux_choice.md"), "\n".join(lines))
    log("\n".join(lines))
    return chosen


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    table = parse_config(TableConfig, argv, prog="python -m experiments.charlm_table", description=__doc__.splitlines()[0])
    return grid_main(choose_aux if table.choose_aux else main_table, table, argv)


if __name__ == "__main__":
    main()
