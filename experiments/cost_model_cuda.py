"""Stages on one GPU each: experiments.cost_model's compute terms and host-device copies timed on CUDA.

    python -m experiments.cost_model --measure_cuda --results results/cost_model  # -> cuda.json (needs a GPU)
    python -m experiments.cost_model --table_only --results results/cost_model    # cost_model.md gains its section

What is measured, on one GPU, each cost the median of --repeats calls after warm-up, each call timed
by a pair of torch.cuda.Event around it with the device synchronised before the start and after
the end (CudaClock; the host's launch time counts, as it does for a worker):
- the bench's networks ("wide" and "mlp"): per stage F, B at the batch and each micro-batch, O, and
  S of each DNI and cDNI synthesizer (experiments.cost_model.network_costs, as on the CPU);
- the extrapolation's deep stages, 1024 and 256 units, and their synthesizers (cost_model.deep_costs);
- one copy of n bytes host-to-device (H2D) and device-to-host (D2H), from and into pinned and
  pageable host memory, at sizes from 4 KB to 4 MB and at the bench's cuts; per kind, c(n) =
  alpha + n / beta is fitted by least squares, as the network link is.
What is predicted: cost_model.predict's formulas unchanged, with the GPU's compute terms, for
workers that each hold one GPU and are linked either
(a) host-staged: D2H into pinned memory, the network message (the measured loopback, 10 GbE,
    InfiniBand), H2D, one after the other: alpha = alpha_D2H + alpha_net + alpha_H2D and
    1 / beta = 1 / beta_D2H + 1 / beta_net + 1 / beta_H2D; or
(b) GPU to GPU by NCCL over NVLink: cost_model.LINKS["NVLink"], modelled, not measured (NCCL
    needs two GPUs; a lent machine has one).
"""
import sys
from pathlib import Path

import torch

from dni.errors import DNIError
from dnilab.runs import environment, write_json
from experiments.cost_model import (BATCH, DEEP, LINKS, MICROBATCHES, _median_time, deep_costs,
                                    deep_rows, fit_line, network_costs, predict)

COPY_SIZES = [4 * 4 ** k for k in range(5, 11)]  # 4 KB to 4 MB
NETWORKS = {"loopback (measured)": None, "10 GbE": LINKS["10 GbE"],
            "100 Gb/s InfiniBand": LINKS["100 Gb/s InfiniBand"]}  # None: cost_model.json's measured link


class CudaClock:
    """Seconds one call of fn takes on `device`'s stream, by CUDA events; five calls of warm-up
    (cuBLAS's handles, the caching allocator's first blocks)."""
    warmup = 5

    def __init__(self, device):
        self.device = device

    def __call__(self, fn):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(self.device)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3  # ms -> s


def copy_times(n_bytes, device, *, pinned, repeats, clock):
    """One H2D and one D2H copy of n_bytes (float32) between host memory, pinned or pageable, and
    `device`: seconds. A pinned copy is asynchronous, so it is timed to its end by the clock."""
    host = torch.zeros(n_bytes // 4, pin_memory=pinned)
    on_device = torch.zeros(n_bytes // 4, device=device)
    back = torch.zeros(n_bytes // 4, pin_memory=pinned)
    return {"h2d": _median_time(lambda: on_device.copy_(host, non_blocking=pinned), repeats, clock),
            "d2h": _median_time(lambda: back.copy_(on_device, non_blocking=pinned), repeats, clock)}


def measure_copies(device, sizes, repeats, clock, pinned_kinds=(True, False)):
    """Per kind ("h2d_pinned", "d2h_pageable", ...): the time of each size and the fitted alpha, beta."""
    out = {}
    for pinned in pinned_kinds:
        times = {n: copy_times(n, device, pinned=pinned, repeats=repeats, clock=clock) for n in sizes}
        for direction in ("h2d", "d2h"):
            by_size = {n: t[direction] for n, t in times.items()}
            alpha, beta = fit_line(list(by_size), list(by_size.values()))
            out[f"{direction}_{'pinned' if pinned else 'pageable'}"] = {
                "alpha": alpha, "beta": beta, "seconds": {str(n): t for n, t in by_size.items()}}
    return out


def measure(device, repeats, clock, *, pinned_kinds=(True, False), models=("wide", "mlp"), deep_models=DEEP):
    """Everything cuda.json holds but its provenance, on any device (CPU in the tests)."""
    costs = {model: network_costs(model, repeats, device, clock) for model in models}
    deep = {name: deep_costs(unit, 2, hidden, repeats, device, clock) for name, unit, hidden in deep_models}
    sizes = sorted(set(COPY_SIZES) | {c["cut_bytes"] for c in costs.values()})
    return dict(batch=BATCH, costs=costs, deep=deep, copies=measure_copies(device, sizes, repeats, clock, pinned_kinds))


def measure_cuda(args):
    """`--measure_cuda`: time the GPU's costs into <results>/cuda.json; refused without CUDA."""
    if not torch.cuda.is_available():
        raise DNIError("--measure_cuda needs a CUDA device and torch.cuda.is_available() is False here")
    device = torch.device("cuda")
    result = dict(command="python -m experiments.cost_model " + " ".join(sys.argv[1:]),
                  gpu=torch.cuda.get_device_name(device), torch=torch.__version__, cuda=torch.version.cuda,
                  cudnn=torch.backends.cudnn.version(), env=environment(device),
                  repeats=args.repeats, **measure(device, args.repeats, CudaClock(device)))
    write_json(Path(args.results) / "cuda.json", result)
    print(f"wrote {Path(args.results) / 'cuda.json'}: {result['gpu']}, torch {result['torch']}, CUDA {result['cuda']}")
    return result


def staged_link(copies, network):
    """(alpha, beta) of a message that goes D2H (pinned), over `network`, then H2D (pinned)."""
    legs = [(copies["d2h_pinned"]["alpha"], copies["d2h_pinned"]["beta"]), tuple(network),
            (copies["h2d_pinned"]["alpha"], copies["h2d_pinned"]["beta"])]
    return sum(a for a, _ in legs), 1.0 / sum(1.0 / b for _, b in legs)


def links(cuda, measured):
    """The GPU workers' links by name: host-staged over each network, then NVLink (modelled)."""
    out = {f"host-staged, {name}": staged_link(cuda["copies"], measured if net is None else net)
           for name, net in NETWORKS.items()}
    out["NVLink by NCCL (modelled)"] = LINKS["NVLink"]
    return out


def predictions(cuda, measured):
    """Samples/s with every stage on a GPU of its own: the bench's networks at K = 2 (locked, the
    best 1F1B, DNI, cDNI) and the deep models' K = 2 to 16, per link."""
    bench = []
    for model, costs in cuda["costs"].items():
        for name, link in links(cuda, measured).items():
            pipe = {m: predict(costs, link, "1f1b", m) for m in MICROBATCHES}
            best = max(pipe, key=pipe.get)
            bench.append(dict(model=model, link=name, locked=predict(costs, link, "locked"), one_f_one_b=pipe[best],
                              microbatches=best, dni=predict(costs, link, "dni"), cdni=predict(costs, link, "cdni")))
    deep = [row for name, base in cuda["deep"].items() for row in deep_rows(name, base, links(cuda, measured))]
    return {"bench": bench, "deep": deep}


def _us(seconds):
    return f"{seconds * 1e6:.1f} us"


def markdown_section(cuda, measured):
    """cost_model.md's lines for cuda.json: what was measured, then the predictions."""
    copies = cuda["copies"]
    made = (f"Made by `{cuda['command']}` at commit {(cuda['env'].get('git_commit') or 'unknown')[:7]}"
            f"{' (modified tree)' if cuda['env'].get('git_dirty') else ''}")
    lines = ["", "## Stages on one GPU each", "",
             f"{made} on {cuda['gpu']}, torch {cuda['torch']}, CUDA {cuda['cuda']} (results/cost_model/cuda.json): "
             "every stage, synthesizer and host-device copy timed by CUDA events, median of "
             f"{cuda['repeats']} after warm-up; experiments/cost_model_cuda.py's docstring gives the model. "
             "The networks' links are not measured here: host-staged links add the measured copies to the "
             "loopback above or to a modelled network; NVLink by NCCL is modelled, not measured (it needs two GPUs).",
             "", "| copy | alpha | beta |", "|---|---|---|"]
    for kind, fit in copies.items():
        lines.append(f"| {kind.replace('_', ', ')} | {_us(fit['alpha'])} | {fit['beta'] / 1e9:.2f} GB/s |")
    lines += ["", "| model | stage | F | B | O | S (DNI) | S (cDNI) |", "|---|---|---|---|---|---|---|"]
    for model, costs in cuda["costs"].items():
        synths = costs["synthesizers"]
        for i, st in enumerate(costs["stages"]):
            s_dni, s_cdni = (_us(synths[k][i]) if i < len(synths[k]) and i < len(costs["stages"]) - 1 else "—"
                             for k in ("dni", "cdni"))
            lines.append(f"| {model} | {i} | {_us(st['F'])} | {_us(st['B'])} | {_us(st['O'])} | {s_dni} | {s_cdni} |")
    rows = predictions(cuda, measured)
    lines += ["", "Predicted samples/s, the bench's networks at K = 2, a GPU per worker:", "",
              "| model | link | locked | 1F1B (best m) | DNI pipeline | cDNI pipeline | DNI / 1F1B |",
              "|---|---|---|---|---|---|---|"]
    for r in rows["bench"]:
        lines.append(f"| {r['model']} | {r['link']} | {r['locked']:.0f} | {r['one_f_one_b']:.0f} (m={r['microbatches']}) "
                     f"| {r['dni']:.0f} | {r['cdni']:.0f} | {r['dni'] / r['one_f_one_b']:.2f}x |")
    lines += ["", "Predicted samples/s, K equal stages, a GPU per worker:", "",
              "| stages | K | link | locked | 1F1B (best m) | DNI pipeline | DNI / 1F1B |", "|---|---|---|---|---|---|---|"]
    for r in rows["deep"]:
        lines.append(f"| {r['model']} | {r['K']} | {r['link']} | {r['locked']:.0f} | {r['one_f_one_b']:.0f} "
                     f"(m={r['microbatches']}) | {r['dni']:.0f} | {r['dni'] / r['one_f_one_b']:.2f}x |")
    lines.append("")
    return lines
