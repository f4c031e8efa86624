"""Table 1's tables (`python -m experiments.table1`): the table dict collected from the run
folders, its markdown with the paper's goals, and the files written from it."""
import json
import platform
import statistics
import sys

import torch

from dnilab.config import Config, label_map_acts, saved_settings
from dnilab.data import TRAIN_SIZES
from dnilab.runs import write_text
from experiments.grid import CPU_SETTINGS, mean_std, typed_command
from experiments.provenance import modified_tree_line
from experiments.table1_grid import (DATASET_TITLES, METHOD_LABEL, MODEL_LABEL, PAPER_TABLE1, STAGE_KEYS,
                                     SYNTH_KEYS, budget, output_base, run_name, run_root, stage_lr_line,
                                     table_scope)


def collect(args, failures=None):
    """The table dict from the finished run folders of the grid (missing runs leave cells partial)."""
    failures = failures or {}
    cells, methods = table_scope(args)
    rows, envs, hyper, commands, seconds, done, total = [], set(), set(), set(), 0.0, 0, 0
    held_out, run_dirs = set(), []  # --val_size of each finished run: 0 for runs made before the split
    rates = {}  # model -> the stage lrs of its finished runs
    for model, layers in cells:
        row = dict(model=model, layers=layers, depth=layers - 1, label=f"{MODEL_LABEL[model]} {layers}",
                   cells={}, paper={m: PAPER_TABLE1.get((args.dataset, model, layers, m)) for m in methods})
        for method in methods:
            cell = dict(seeds=[], test_error=[], val_error=[], seconds=[], epochs=None, steps=None, failed={})
            for seed in args.seeds:
                total += 1
                name = run_name(model, layers, method, seed)
                run_dir = run_root(args) / name
                if name in failures:
                    cell["failed"][seed] = failures[name]
                if not (run_dir / "summary.json").exists():
                    continue
                summary = json.loads((run_dir / "summary.json").read_text())
                config = saved_settings(json.loads((run_dir / "config.json").read_text()))
                env = json.loads((run_dir / "env.json").read_text()) if (run_dir / "env.json").exists() else {}
                cell["seeds"].append(seed)
                cell["test_error"].append(round(100 * (1 - summary["test_acc"]), 4))
                if summary.get("val_acc") is not None:  # what a later choice may read; the table shows test
                    cell["val_error"].append(round(100 * (1 - summary["val_acc"]), 4))
                cell["seconds"].append(summary["seconds"])
                cell["epochs"], cell["steps"] = summary["epochs"], summary["steps"]
                seconds += summary["seconds"]
                done += 1
                run_dirs.append(run_dir)
                envs.add((env.get("device"), env.get("gpu") or env.get("cpu"), env.get("threads"), env.get("torch")))
                hyper.add((False,) + tuple((k, config.get(k)) for k in STAGE_KEYS[model]))
                rates.setdefault(model, set()).add(config["lr"])
                if config["method"] == "dni":
                    hyper.add((True,) + tuple((k, config.get(k)) for k in SYNTH_KEYS[model]
                                               if k != "synth_label_map" or label_map_acts(config)))
                held_out.add(config["val_size"])
                if (run_dir / "command.txt").exists():
                    commands.add(typed_command((run_dir / "command.txt").read_text().splitlines()[0]))
            if cell["test_error"]:
                cell["mean"], cell["std"] = mean_std(cell["test_error"])
            row["cells"][method] = cell
        rows.append(row)
    meta = dict(dataset=args.dataset, budget=budget(args) or "cpu", preset=args.preset, seeds=list(args.seeds),
                methods=methods, stage_rates={model: sorted(lrs) for model, lrs in rates.items()},
                runs_done=done, runs_total=total, partial=done < total, val_sizes=sorted(held_out),
                train_seconds_total=round(seconds, 1), modified_tree=modified_tree_line(run_dirs),
                hyperparameters=[dict(h[1:]) for h in sorted(hyper, key=str) if not h[0]],
                synthesizer_hyperparameters=[dict(h[1:]) for h in sorted(hyper, key=str) if h[0]],
                hardware=[dict(device=d, processor=p, threads=t, torch=v) for d, p, t, v in sorted(envs, key=str)],
                machine=platform.machine(), torch=torch.__version__, python=platform.python_version(),
                command="python -m experiments.table1 " + " ".join(sys.argv[1:]), trained_by=sorted(commands),
                layers_note="layers = weight layers incl. the classifier: FCN n = mlp --depth n-1 "
                            "(n-1 hidden + classifier); CNN n = cnn --depth n-1 (n-1 conv + classifier)",
                paper_note="the paper's Table 1 values could not be confirmed here; none is quoted")
    return dict(meta=meta, rows=rows)


def _training_set(val_sizes, dataset):
    """The table's training-set line, from what its runs held out (`--val_size`)."""
    total = TRAIN_SIZES[dataset]
    if val_sizes == [0]:
        return (f"- Training set: all {total:,} training images: these runs were made before the validation split "
                "(their defaults were ranked on test error); nothing may be chosen from them.")
    if len(val_sizes) > 1:
        return (f"- Training set: MIXED, runs held out {' and '.join(map(str, val_sizes))} training images "
                "(0: made before the validation split).")
    held = val_sizes[0] if val_sizes else Config.val_size
    return (f"- Training set: the first {total - held:,} training images; the last {held:,} are the validation "
            "split, read by no number here (`--val_size`).")


def _cell_text(cell, seeds):
    if not cell["test_error"]:
        return "failed" if cell["failed"] else "—"
    text = f"{cell['mean']:.2f}" + (f" ± {cell['std']:.2f}" if cell["std"] is not None else "")
    return text + (f" ({len(cell['test_error'])}/{len(seeds)} seeds)" if len(cell["test_error"]) < len(seeds) else "")


def _settings(sets):
    """'lr 0.001, ...' for one set of settings; several sets (runs made with other defaults) are flagged."""
    text = " | ".join(", ".join(f"{k} {v}" for k, v in s.items()) for s in sets) or "no finished run yet"
    return f"MIXED, {len(sets)} sets: {text}" if len(sets) > 1 else text


def _gap_table(table):
    """Markdown lines: each decoupled column's (DNI, cDNI, local losses) mean test error minus Bprop's,
    in points (none without Bprop)."""
    methods = [m for m in table["meta"]["methods"] if m in ("dni", "cdni", "local")]
    if "backprop" not in table["meta"]["methods"] or not methods:
        return []

    def gap(row, method):
        cell, base = row["cells"][method], row["cells"]["backprop"]
        return f"{cell['mean'] - base['mean']:+.2f}" if cell["test_error"] and base["test_error"] else "—"

    return ["", "Points of test error above Bprop (mean minus mean; negative: below it):", "",
            "| network | layers | " + " | ".join(METHOD_LABEL[m] for m in methods) + " |",
            "|---|---|" + "---|" * len(methods)] + [
        f"| {MODEL_LABEL[row['model']]} | {row['layers']} | " + " | ".join(gap(row, m) for m in methods) + " |"
        for row in table["rows"]]


# The goals the table is checked against, read off the gap rows: (method, model, layers, most points above Bprop).
GOALS = (("cdni", "mlp", (3, 4, 5, 6), 0.2), ("dni", "mlp", (3, 4), 1.0), ("cdni", "cnn", (3, 4), 0.15))


def _goal_lines(table):
    """Markdown lines: each goal held, missed or not measured, with the gaps it rests on. The goals are
    set on MNIST at the grid's CPU budget with every run under the validation split: other tables
    (Fashion-MNIST, longer budgets, runs made before the split) are judged by none."""
    meta = table["meta"]
    grid_epochs = {settings["num_epochs"] for settings in CPU_SETTINGS.values()}
    if ("backprop" not in meta["methods"] or meta["dataset"] != "mnist" or meta["budget"] != "cpu"
            or 0 in meta["val_sizes"] or any(s["num_epochs"] not in grid_epochs for s in meta["hyperparameters"])):
        return []
    lines = ["", "Goals (mean test error over the seeds, points above Bprop):", ""]
    for method, model, layers, limit in GOALS:
        gaps = {}
        for row in table["rows"]:
            cell, base = row["cells"].get(method), row["cells"]["backprop"]
            if row["model"] == model and row["layers"] in layers and cell and cell["test_error"] and base["test_error"]:
                gaps[row["layers"]] = cell["mean"] - base["mean"]
        name = f"{METHOD_LABEL[method]} within {limit} point of Bprop at {MODEL_LABEL[model]} " + \
            ", ".join(map(str, layers))
        if len(gaps) < len(layers):
            verdict = "not measured" + (f" at every depth (have {', '.join(map(str, sorted(gaps)))})" if gaps else "")
        else:
            verdict = "holds" if all(g <= limit for g in gaps.values()) else "missed"
        lines.append(f"- {name}: {verdict}" + (" (" + ", ".join(f"{MODEL_LABEL[model]} {k}: {v:+.2f}"
                                                                 for k, v in sorted(gaps.items())) + ")" if gaps else "") + ".")
    return lines


def markdown(table):
    """The table as the README shows it: test error (%) mean ± std over seeds."""
    meta, methods = table["meta"], table["meta"]["methods"]
    title = DATASET_TITLES[meta["dataset"]][0]
    status = (f"**PARTIAL**: {meta['runs_done']} of {meta['runs_total']} runs finished; '—' cells have none yet."
              if meta["partial"] else f"Complete: {meta['runs_done']} runs.")
    lines = [f"# Table 1 on {title}: test error (%) with DNIs between every layer", "", status, "",
             "| network | layers | " + " | ".join(METHOD_LABEL[m] for m in methods) + " | paper |",
             "|---|---|" + "---|" * len(methods) + "---|"]
    for row in table["rows"]:
        paper = ", ".join(f"{METHOD_LABEL[m]} {v}" for m, v in row["paper"].items() if v is not None)
        lines.append(f"| {MODEL_LABEL[row['model']]} | {row['layers']} | "
                     + " | ".join(_cell_text(row["cells"][m], meta["seeds"]) for m in methods)
                     + f" | {paper or 'not confirmed'} |")
    lines += _gap_table(table)
    lines += _goal_lines(table)
    lines += ["", "Train seconds per run (mean over seeds; the training loop's wall time, evaluation excluded; "
              "on a shared machine it includes waiting for the CPU):", "",
              "| network | layers | " + " | ".join(METHOD_LABEL[m] for m in methods) + " |",
              "|---|---|" + "---|" * len(methods)]
    for row in table["rows"]:
        times = [row["cells"][m]["seconds"] for m in methods]
        lines.append(f"| {MODEL_LABEL[row['model']]} | {row['layers']} | "
                     + " | ".join(f"{statistics.mean(t):.0f}" if t else "—" for t in times) + " |")
    failed = [(row["label"], m, s, e) for row in table["rows"] for m in methods
              for s, e in row["cells"][m]["failed"].items()]
    lines += [""] + [f"- failed: {label} {METHOD_LABEL[m]} seed {s}: {e}" for label, m, s, e in failed]
    lines += [
        f"- Mean ± sample std over seeds {meta['seeds']}, test error after the last epoch (no early stopping).",
        "- Layers count every layer with weights, the classifier included: FCN n = `--model_type mlp "
        "--depth n-1` (n-1 hidden layers + classifier), CNN n = `--model_type cnn --depth n-1`.",
        "- No Bprop: only the classifier learns; the layers below keep their random weights "
        "(`--method nobprop`).",
        ("- Model: the paper's networks and synthesizers (section 3.1, `--preset paper`: nothing of ours)"
         + ("" if meta["budget"] == "paper" else ", trained at this table's budget and stage learning rate with "
            "sg_lr = lr and a cosine schedule, not the paper's 500k iterations at 3e-5")
         if meta.get("preset") == "paper" else
         "- Model: our networks and synthesizers (`--preset ours`, dnilab/presets.py; docs/deviations.md lists how they "
         "differ from the paper's)") + ".",
        _training_set(meta.get("val_sizes", []), meta["dataset"]),
        *([f"- {stage_lr_line(meta['stage_rates'])}"]
          if meta["budget"] == "cpu" and meta.get("preset") != "paper" and meta.get("stage_rates") else []),
        *([f"- {meta['modified_tree']}"] if meta.get("modified_tree") else []),
        "- Paper: its Table 1 values could not be confirmed where this table was made, so none is quoted.",
        "- Settings (" + ("the paper's budget" if meta["budget"] == "paper" else
                           f"{meta['budget']} budget, far below the paper's 500k iterations") + "): "
        + _settings(meta["hyperparameters"]) + "; DNI and cDNI runs: " + _settings(meta["synthesizer_hyperparameters"])
        + ". Unset settings are dnilab/config.py's defaults when the run was made.",
        "- Hardware: " + ("; ".join(f"{h['device']} ({h['processor']}, {h['threads']} thread(s)), torch {h['torch']}"
                                    for h in meta["hardware"]) or "no finished run yet")
        + f"; {meta['train_seconds_total'] / 60:.1f} min of training in all.",
        "- Runs trained by " + (", ".join(f"`{c.strip()}`" for c in meta["trained_by"]) or "none yet")
        + f"; table made by `{meta['command'].strip()}`; figures: "
        f"{table['base']}_curves.png (test error against iterations), {table['base']}_sg.png "
        "(synthetic-gradient loss and cosine to the target, per layer).",
        ""]
    return "\n".join(lines)


def write_tables(args, table):
    base = output_base(args)
    base.parent.mkdir(parents=True, exist_ok=True)
    table["base"] = base.name
    for suffix, text in ((".json", json.dumps(table, indent=2) + "\n"), (".md", markdown(table))):
        write_text(base.with_name(base.name + suffix), text)
