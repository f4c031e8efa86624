"""The report of `python -m experiments.bench`: its goals, where the DNI pipeline wins and
loses, and results/bench.md, all read off a result dict (bench.json)."""
import statistics

from experiments.bench_accuracy import ACCURACY_LR
from experiments.bench_pipelining import PIPELINING, pipelining_rows
from experiments.bench_workloads import BENCH_MODELS


def _median(result, key):
    return result["throughput"][key]["median"]


def goals(result, models, args):
    """The pipeline's targets, each with the measured value and whether it is met."""
    out = []
    K = args.workers
    if "wide" in models:
        pipe = _median(result, "wide/dni_pipeline_K")
        out.append({"goal": f"DNI pipeline >= 1.9x locked model-parallel backprop (wide, K={K})",
                    "value": pipe / _median(result, "wide/locked_backprop_K"), "target": 1.9})
        out.append({"goal": f"DNI pipeline >= 0.95 of its ceiling, {K} one-thread sequential DNI processes (wide)",
                    "value": pipe / (K * _median(result, "wide/dni_1thread")), "target": 0.95})
        out.append({"goal": "DNI pipeline >= 1.1x single-process backprop on all cores (wide)",
                    "value": pipe / _median(result, "wide/backprop_1proc"), "target": 1.1})
    for model in models:
        workers, single = (result.get("held_bytes", {}).get(f"{model}/{key}") for key in ("dni_pipeline_K", "dni_1thread"))
        if workers and single:
            total = sum(sum(h.values()) for h in workers) / sum(single[0].values())
            out.append({"goal": f"DNI pipeline workers hold one process's parameters, optimizer state and data between "
                                f"them, nothing twice ({model}: their sum over the single process's)",
                        "value": total, "target": 1.001, "lower_is_better": True, "unit": "x",
                        "digits": 4})
    for row in result["accuracy"]:
        diff = 100 * abs(row["pipeline"]["test_acc"] - row["sequential"]["test_acc"])
        out.append({"goal": f"pipeline test accuracy within 0.3 point of sequential DNI (mlp, seed {row['seed']}, "
                            f"{args.accuracy_epochs} epochs)", "value": diff, "target": 0.3, "lower_is_better": True})
    data = result["data_path"]
    out.append({"goal": "data path: tensor batches >= 4x torchvision DataLoader + ToTensor",
                "value": data["tensors"]["median"] / data["dataloader"]["median"], "target": 4.0})
    for model in models:
        match = equal_memory_1f1b(result, model, args)
        if match:
            key, n = match
            out.append({"goal": f"DNI pipeline vs 1F1B at equal memory ({model}, K={args.workers}; 1F1B with {n} "
                                f"micro-batches, the count whose peak RSS, {_total_rss(result, key):.0f} MB over its "
                                f"{args.workers} processes, is closest to the DNI pipeline's "
                                f"{_total_rss(result, f'{model}/dni_pipeline_K'):.0f} MB)",
                        "value": _median(result, f"{model}/dni_pipeline_K") / _median(result, key), "target": 1.0})
    for goal in out:
        lower = goal.get("lower_is_better")
        if goal["target"] is None:
            goal["met"] = None
        else:
            goal["met"] = goal["value"] <= goal["target"] if lower else goal["value"] >= goal["target"]
    return out


def _total_rss(result, key):
    return sum(result["peak_rss_mb"][key])


def equal_memory_1f1b(result, model, args):
    """(key, micro-batches) of the 1F1B row whose peak RSS summed over its processes is closest to
    the DNI pipeline's; None without 1F1B rows."""
    rows = [(f"{model}/{key}", n) for key, schedule, n in pipelining_rows(args) if schedule == "1f1b"]
    if not rows:
        return None
    dni = _total_rss(result, f"{model}/dni_pipeline_K")
    return min(rows, key=lambda row: abs(_total_rss(result, row[0]) - dni))


def _verdict(dni, other):
    """How the DNI pipeline's samples/s (a `spread`) compare with another row's: a win or a loss
    only when the min-max ranges of the rounds do not overlap."""
    if dni["min"] > other["max"]:
        return "wins"
    if dni["max"] < other["min"]:
        return "loses"
    return "level (ranges overlap)"


def wins_and_losses(result, models, args, names):
    """Markdown lines: every comparison of the DNI pipeline with a baseline, with its verdict read off
    the measured numbers, then one sentence listing the wins and the losses."""
    lines = ["## where the DNI pipeline wins and where it loses", "",
             "| model | DNI pipeline against | measured | DNI |", "|---|---|---|---|"]
    verdicts = {}  # "wins" | "loses" | "level": {against: [models]}

    def add(model, against, measured, verdict, why=""):
        shown = f"**{verdict}**" if verdict in ("wins", "loses") else verdict
        lines.append(f"| {model} | {against}{f' ({why})' if why else ''} | {measured} | {shown} |")
        verdicts.setdefault(verdict.split(" ")[0], {}).setdefault(against, []).append(model)

    for model in models:
        dni = result["throughput"][f"{model}/dni_pipeline_K"]
        against = {"locked_backprop_K": "", "backprop_1proc": ""}  # row -> why it is compared
        torch_rows = [key for key, _, _ in pipelining_rows(args)]
        if torch_rows:
            fastest = max(torch_rows, key=lambda key: _median(result, f"{model}/{key}"))
            against[fastest] = "the fastest torch.distributed.pipelining row"
        match = equal_memory_1f1b(result, model, args)
        if match:
            key = match[0].split("/", 1)[1]
            against[key] = ", ".join(filter(None, [against.get(key), "1F1B at equal memory"]))
        for key, why in against.items():
            other = result["throughput"][f"{model}/{key}"]
            add(model, names[key], f"{dni['median'] / other['median']:.2f}x the samples/s", _verdict(dni, other), why)
    by_key = {}
    for row in result["accuracy"]:
        for key, run in row.get("pipelining", {}).items():
            by_key.setdefault(key, []).append(100 * (row["pipeline"]["test_acc"] - run["test_acc"]))
    for key, diffs in by_key.items():
        schedule, n = key.split("_m")
        diff = statistics.mean(diffs)
        add("mlp", f"backprop under {PIPELINING[schedule]}, {n} micro-batches: test accuracy after the same "
                   f"{args.accuracy_epochs} epochs", f"{diff:+.2f} points", "wins" if diff > 0 else "loses"
            if diff < 0 else "level", f"mean of {len(diffs)} seed{'s' if len(diffs) > 1 else ''}")
    lines.append("")
    said = {"wins": "The DNI pipeline wins against", "loses": "It loses against",
            "level": "It is level, within the spread of the rounds, with"}
    sentences = []
    for verdict, opening in said.items():
        items = verdicts.get(verdict, {})
        if items:
            sentences.append(f"{opening} " + "; ".join(f"{against} ({', '.join(models)})"
                                                       for against, models in items.items()) + ".")
    lines += [" ".join(sentences), ""]
    return lines


def markdown(result, models, args):
    hw = result["hardware"]
    lines = [f"# experiments.bench: update unlocking on {hw['cores']} CPU cores",
             "",
             f"`{result['command']}`: {hw['cpu']}, {hw['cores']} cores, torch {hw['torch']}, Python {hw['python']}; "
             f"load average {hw['load_average_before'][0]:.1f} before, {hw['load_average_after'][0]:.1f} after "
             f"(the machine is shared). Batch {args.batch_size}, {args.warmup} warm-up + {args.steps} timed steps, "
             f"median [min-max] of {args.rounds} interleaved rounds, each workload in fresh processes. "
             f"K = {args.workers} workers x {args.threads} thread each; data path on 1 thread.",
             ""]
    K = args.workers
    names = {"backprop_1proc": f"backprop, 1 process x {hw['cores']} threads",
             "backprop_1thread": "backprop, 1 process x 1 thread",
             "locked_backprop_K": f"locked model-parallel backprop, K={K}",
             "dni_pipeline_K": f"DNI pipeline, K={K}", "cdni_pipeline_K": f"cDNI pipeline, K={K}",
             "dni_1proc": f"DNI sequential, 1 process x {hw['cores']} threads",
             "dni_1thread": "DNI sequential, 1 process x 1 thread",
             "cdni_1proc": f"cDNI sequential, 1 process x {hw['cores']} threads"}
    names.update({key: f"torch.distributed.pipelining {PIPELINING[schedule]}, K={K}, {n} micro-batches of "
                       f"{args.batch_size // n}" for key, schedule, n in pipelining_rows(args)})
    for model in models:
        locked, single = _median(result, f"{model}/locked_backprop_K"), _median(result, f"{model}/backprop_1proc")
        part = result["partitions"].get(f"{model}/dni_pipeline_K")
        lines += [f"## {model}: {BENCH_MODELS[model][1]}" + (f"; partition {part}" if part else ""), "",
                  f"| workload | samples/s | vs locked | vs 1-proc backprop ({hw['cores']} threads) | "
                  "peak RSS MB (per process) | held MB: parameters + optimizer + data (per process) | "
                  "time blocked (per worker) |",
                  "|---|---|---|---|---|---|---|"]
        for suffix, name in names.items():
            t = result["throughput"][f"{model}/{suffix}"]
            rss = ", ".join(f"{v:.0f}" for v in result["peak_rss_mb"][f"{model}/{suffix}"])
            blocked = ", ".join(f"{100 * v:.0f}%" for v in result["waiting"].get(f"{model}/{suffix}", []))
            holds = ", ".join(" + ".join(f"{h[kind] / 2**20:.1f}" for kind in ("parameters", "optimizer", "data"))
                              for h in result.get("held_bytes", {}).get(f"{model}/{suffix}") or [])
            lines.append(f"| {name} | {t['median']:.0f} [{t['min']:.0f}-{t['max']:.0f}] | "
                         f"{t['median'] / locked:.2f}x | {t['median'] / single:.2f}x | {rss} | {holds or '-'} | "
                         f"{blocked or '-'} |")
        lines.append("")
    if pipelining_rows(args):
        skipped = [n for n in args.microbatches if n < K]
        lines += ["The torch.distributed.pipelining rows run PyTorch's own pipeline schedules (PipelineStage, "
                  "ScheduleGPipe, Schedule1F1B) on the locked rows' stages and partition, with their Adam per "
                  f"stage and the mean cross-entropy on the last stage: each batch of {args.batch_size} is cut "
                  "into n micro-batches, whose gradients are accumulated and averaged before one step. Unlike "
                  "every other row, BatchNorm there normalises each micro-batch by its own statistics (and "
                  f"updates its running statistics once per micro-batch), not the whole batch of {args.batch_size}. "
                  "Their time blocked is the time spent in the schedule's waits for sends and receives."
                  + (f" 1F1B needs at least K = {K} micro-batches, so it has no row for "
                     f"{', '.join(map(str, skipped))}." if skipped else ""), ""]
    data = result["data_path"]
    lines += ["## data path (MNIST, batches of %d)" % args.batch_size, "",
              "| way | samples/s | ratio |", "|---|---|---|",
              f"| dnilab.data.batches (tensor indexing) | {data['tensors']['median']:.0f} | "
              f"{data['tensors']['median'] / data['dataloader']['median']:.1f}x |",
              f"| DataLoader(MNIST, ToTensor), per sample | {data['dataloader']['median']:.0f} | 1.0x |", ""]
    if result["accuracy"]:
        torch_runs = list(result["accuracy"][0].get("pipelining", {}))
        torch_names = [f"backprop, {PIPELINING[key.split('_m')[0]]} K={K}, {key.split('_m')[1]} micro-batches"
                       for key in torch_runs]
        lines += [f"## accuracy after the same number of samples: main.py --model_type mlp --lr {ACCURACY_LR}, "
                  f"{args.accuracy_epochs} epochs", "",
                  "| seed | sequential DNI | DNI pipeline K=%d | difference (points) |" % K
                  + "".join(f" {name} |" for name in torch_names),
                  "|---|---|---|---|" + "---|" * len(torch_runs)]
        for row in result["accuracy"]:
            s, p = row["sequential"]["test_acc"], row["pipeline"]["test_acc"]
            lines.append(f"| {row['seed']} | {100 * s:.2f}% ({row['sequential']['seconds']:.0f}s) | "
                         f"{100 * p:.2f}% ({row['pipeline']['seconds']:.0f}s) | {100 * (p - s):+.2f} |"
                         + "".join(f" {100 * row['pipelining'][key]['test_acc']:.2f}% "
                                   f"({row['pipelining'][key]['seconds']:.0f}s) |" for key in torch_runs))
        kept = [r["run"] for row in result["accuracy"] for r in (row["sequential"], row["pipeline"],
                                                                   *row["pipelining"].values()) if "run" in r]
        lines += ["", ("Run folders behind these accuracies: " + ", ".join(kept) + ".") if kept else
                  "The run folders behind these accuracies were not kept (made before the benchmark kept them)."]
        lines.append("")
        if torch_runs:
            counts = {}  # schedule -> micro-batch counts run
            for key in torch_runs:
                schedule, n = key.split("_m")
                counts.setdefault(schedule, []).append(n)
            runs = "; ".join(f"{PIPELINING[schedule]} at {', '.join(ns)} micro-batches"
                             for schedule, ns in counts.items())
            lines += ["Every column: the test accuracy after the same samples (the same validation split, seed, "
                      "batch order and epochs, the same stages' learning rate and schedule) and the seconds of "
                      "training, 1 thread per process. The torch.distributed.pipelining columns are backprop "
                      f"under {runs}."
                      + ("" if "gpipe" in counts or "1f1b" not in counts else
                         " GPipe is not run for accuracy: it accumulates the same micro-batch gradients as 1F1B, "
                         "in the same order, so it trains the same net (tests/test_bench_pipelining.py checks both "
                         "against one oracle).")
                      + " The micro-batch count changes the maths only through BatchNorm, which normalises each "
                      "micro-batch by its own statistics.", ""]
    lines += wins_and_losses(result, models, args, names)
    lines += ["## goals", "", "| goal | measured | met |", "|---|---|---|"]
    for goal in result["goals"]:
        unit = goal.get("unit", " points" if goal.get("lower_is_better") else "x")
        met = "-" if goal["met"] is None else "yes" if goal["met"] else "**no**"
        lines.append(f"| {goal['goal']} | {goal['value']:.{goal.get('digits', 2)}f}{unit} | {met} |")
    if "wide" in models:
        pipe, one = _median(result, "wide/dni_pipeline_K"), _median(result, "wide/backprop_1thread")
        ceiling = K * _median(result, "wide/dni_1thread")  # K workers, each as fast as DNI alone on one thread
        lines += ["", f"For reference (wide): DNI pipeline / single-process backprop on 1 thread = {pipe / one:.2f}x. "
                  f"The pipeline's ceiling, K x sequential DNI on 1 thread, is {ceiling / one:.2f}x one-thread "
                  f"and {ceiling / _median(result, 'wide/backprop_1proc'):.2f}x {hw['cores']}-thread backprop; "
                  f"the pipeline reached {100 * pipe / ceiling:.0f}% of it. "
                  "Multi-threaded runs slow down sharply when other jobs hold the cores (threads wait for "
                  "each other at every operation), so read the all-cores rows with the load average above."]
    for model in models:
        match = equal_memory_1f1b(result, model, args)
        if match:
            ratio = _median(result, f"{model}/dni_pipeline_K") / _median(result, match[0])
            totals = [_total_rss(result, f"{model}/{key}") for key, schedule, _ in pipelining_rows(args)
                      if schedule == "1f1b"]
            lines += ["", f"DNI pipeline vs 1F1B at equal memory: {ratio:.2f}x ({model}; 1F1B with {match[1]} "
                          "micro-batches, the count whose peak RSS summed over its processes is closest to the "
                          f"DNI pipeline's {_total_rss(result, f'{model}/dni_pipeline_K'):.0f} MB; the 1F1B rows "
                          f"span {min(totals):.0f}-{max(totals):.0f} MB)."]
    return "\n".join(lines) + "\n"

