"""The recurrent table's markdown and figure (experiments.recurrent_table): longest length solved
per task and T, BPTT against DNI (and DNI + Aux where the table has it), with the paper's
column beside."""
from pathlib import Path

from dnilab.runs import write_text
from experiments.grid import RECURRENT_NAMES, mean_std

TASK_NAMES = {"copy": "Copy", "repeat_copy": "Repeat Copy"}
AUX = "dni_aux"  # DNI + Aux: a column only where the table has an --aux_weight > 0
RECURRENT_METHODS = {"bptt": False, "dni": True, AUX: True}  # method -> RecurrentConfig.dni


def columns(aux_weight):
    """The table's methods, in column order: BPTT, DNI, and DNI + Aux where `aux_weight` > 0."""
    return [m for m in RECURRENT_METHODS if m != AUX or aux_weight]


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
    aux = (f" DNI + Aux: a linear head on the LSTM's output predicts, at each step, the synthetic gradient of the "
           f"window's end; {meta['aux_weight']:g} x its mean squared error trains the core." if meta.get("aux_weight")
           else "")
    return (f"LSTM {meta['hidden']} units, {meta['symbols']} symbols (Repeat Copy: R in 1..{meta['max_repeats']}), "
            f"batch {meta['batch_size']}, Adam lr {meta['lr']} (synthesizer {meta['sg_lr']}), "
            f"linear synthesizer, synthetic gradient x {meta['sg_factor']}, "
            + (f"streams staggered by 0..{meta['stagger'] - 1} steps." if meta["stagger"]
               else "streams in step (every window at the same phase of the episodes).") + aux)


def _header(names):
    """A markdown table's header and rule, its columns task, T and `names`."""
    return ["| " + " | ".join(["task", "T", *names]) + " |", "| --- " * (2 + len(names)) + "|"]


def _fixed_length_lines(table):
    """The table of a fixed-length grid: the error at N where training stopped."""
    meta = table["meta"]
    methods = columns(meta.get("aux_weight"))
    lines = [
        f"# Recurrent DNI: error at length N = {meta['length']}, {' vs '.join(RECURRENT_NAMES[m] for m in methods)}",
        "",
        f"Every run trains at episode length N = {meta['length']} only (no curriculum) for {meta['steps']} "
        f"windows; error in bits per scored step at the last decision ({meta['threshold']} counts as solved), "
        f"mean ± std over {meta['seeds']} seed(s), per-seed values in brackets. " + _settings(meta),
        "",
        *_header([RECURRENT_NAMES[m] for m in methods]),
    ]
    for row in table["rows"]:
        cells = [_cell(row, f"{m}_next", lambda pairs: _format([bits for _, bits in pairs], digits=2))
                 for m in methods]
        lines.append(" | ".join([f"| {TASK_NAMES[row['task']]}", str(row["T"]), *cells]) + " |")
    return lines + [""]


def _curriculum_lines(table):
    """The table of the curriculum grid: longest length solved, and where each run stopped."""
    meta = table["meta"]
    methods = columns(meta.get("aux_weight"))
    names = [RECURRENT_NAMES[m] for m in methods]
    lines = [
        "# Recurrent DNI: longest sequence length solved (paper section 3.2, Table 2)",
        "",
        f"Longest length N solved (error < {meta['threshold']} bits per scored step) in {meta['steps']} "
        f"training windows per run; mean ± std over {meta['seeds']} seed(s), per-seed values in brackets. "
        + _settings(meta),
        "",
        *_header(names + [f"paper {name}" for name in names]),
    ]
    for row in table["rows"]:
        paper = [("n/c" if row["paper"][m] is None else str(row["paper"][m])) for m in methods]
        lines.append(" | ".join([f"| {TASK_NAMES[row['task']]}", str(row["T"]),
                                 *(_cell(row, m, _format) for m in methods), *paper]) + " |")
    lines += [
        "",
        "Where training stopped: the length N each run was still learning and its error there "
        "(bits per scored step, last curriculum decision; solved below the threshold).",
        "",
        *_header(names),
    ]
    for row in table["rows"]:
        lines.append(" | ".join([f"| {TASK_NAMES[row['task']]}", str(row["T"]),
                                 *(_cell(row, f"{m}_next", _format_next) for m in methods)]) + " |")
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
    BPTT vs DNI (vs DNI + Aux), one dot per seed."""
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
        for method, color in zip(RECURRENT_METHODS, ("tab:gray", "tab:blue", "tab:orange")):
            if method not in rows[0]:
                continue
            Ts = [r["T"] for r in rows]
            ax.plot(Ts, [mean_std(values(r, method))[0] for r in rows], "-o", color=color,
                    label=RECURRENT_NAMES[method])
            for r in rows:
                ax.scatter([r["T"]] * len(values(r, method)), values(r, method), color=color, alpha=0.3, s=12)
        ax.set(title=TASK_NAMES[task], xlabel="truncation T", ylabel=ylabel)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
