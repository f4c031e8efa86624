"""Step time of the drop-in `dni.DNI` on the paper's FCN: eager against torch.compile, float32
against autocast bf16, and the same FCN under plain backprop beside it.

    python -m experiments.api_speed            # 1 thread, 30 timed steps -> results/api_speed.md, .json

The network is section 3.1's FCN (784-256-256-256-10, Linear-BatchNorm-ReLU) with a cDNI interface
after each hidden layer (dense synthesizers, one hidden layer of 1024), batch 256, Adam; one
optimizer over the model and its synthesizers, the user's own loop. Each variant warms up (the
first step, which holds torch.compile's compilation, is reported apart), then the median of the
timed steps is reported. Ratios are measured in the same invocation.
"""
import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import dni
from dnilab.runs import write_text


class FCN(nn.Module):
    """The paper's FCN; with `interfaces`, a cDNI interface after every hidden layer."""

    def __init__(self, *, interfaces):
        super().__init__()
        self.hidden = nn.ModuleList(nn.Sequential(nn.Linear(n, 256), nn.BatchNorm1d(256), nn.ReLU())
                                    for n in (784, 256, 256))
        self.out = nn.Linear(256, 10)
        self.interfaces = nn.ModuleList(dni.DNI(shape=(256,), context_features=10) for _ in range(3)) \
            if interfaces else None

    def forward(self, x, context):
        h = x.flatten(1)  # (B, 784)
        for i, layer in enumerate(self.hidden):
            h = layer(h)  # (B, 256)
            if self.interfaces is not None:
                h = self.interfaces[i](h, context=context)
        return self.out(h)


def time_steps(*, interfaces, compiled, dtype, steps, warmup=3):
    """(first step's seconds, median seconds of `steps` timed steps) of one variant."""
    torch.manual_seed(0)
    model = FCN(interfaces=interfaces)
    forward = torch.compile(model) if compiled else model
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    x, y = torch.rand(256, 1, 28, 28), torch.randint(0, 10, (256,))
    context = F.one_hot(y, 10)

    def step():
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(forward(x, context), y)
        loss.backward()
        optimizer.step()

    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--results", default="results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for method in ("backprop", "cdni"):
        for compiled in (False, True):
            for dtype in (None, torch.bfloat16):
                first, median = time_steps(interfaces=method == "cdni", compiled=compiled, dtype=dtype,
                                           steps=args.steps)
                rows.append(dict(method=method, compiled=compiled, dtype="bf16" if dtype else "fp32",
                                 first_s=round(first, 2), median_ms=round(1e3 * median, 1)))
                print(rows[-1], flush=True)
    base = {(r["compiled"], r["dtype"]): r["median_ms"] for r in rows if r["method"] == "backprop"}
    eager = {r["method"]: r["median_ms"] for r in rows if not r["compiled"] and r["dtype"] == "fp32"}
    lines = ["# dni.DNI step time: eager, torch.compile, autocast bf16", "",
             f"The paper's FCN, cDNI interface after each hidden layer, batch 256, Adam; median of {args.steps} "
             f"timed steps after warm-up; {args.threads} CPU thread(s) on {platform.machine()} "
             f"({platform.processor() or 'cpu'}), torch {torch.__version__}. The machine may be shared: compare "
             "within a row.", "",
             "| method | mode | dtype | first step (s) | median step (ms) | vs eager fp32 | vs backprop, same mode |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {'torch.compile' if r['compiled'] else 'eager'} | {r['dtype']} | "
                     f"{r['first_s']:.2f} | {r['median_ms']:.1f} | {r['median_ms'] / eager[r['method']]:.2f}x | "
                     f"{r['median_ms'] / base[(r['compiled'], r['dtype'])]:.2f}x |")
    lines += ["", "Made by `python -m experiments.api_speed" + (f" --threads {args.threads}" if args.threads != 1 else "")
              + "`.", ""]
    out = Path(args.results)
    write_text(out / "api_speed.md", "\n".join(lines))
    write_text(out / "api_speed.json", json.dumps(dict(rows=rows, threads=args.threads, steps=args.steps,
                                                       torch=torch.__version__, machine=platform.machine()), indent=2)
               + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
