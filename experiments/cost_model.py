"""Where would the DNI pipeline win? A cost model of pipelined training, checked against the bench.

    python -m experiments.cost_model                 # measure, predict, check -> results/cost_model.{json,md,png}
    python -m experiments.cost_model --table_only    # redraw from results/cost_model.json (no timing)
    python -m experiments.cost_model --measure_cuda  # on a GPU: cuda.json (experiments/cost_model_cuda.py)

What is measured here, in one process on one thread (median of --repeats):
- per stage i of the bench's networks (experiments.bench: "wide" and main.py's "mlp"), at the
  batch and at each micro-batch size: forward F_i(b), backward B_i(b), and its Adam step O_i;
- per synthesizer j (DNI and cDNI): S_j, its forward, loss, backward and Adam step;
- the link: one message of n bytes over torch.distributed (gloo, 127.0.0.1) costs
  c(n) = alpha + n / beta, fitted to a ping-pong between two processes.

What is predicted, for a batch of N cut at the bench's partition into K workers (worker k runs the
stages of part k, one core each), as samples per second = N / T:
- locked model-parallel backprop: nothing overlaps,
  T = sum_k sum_{i in k} (F_i + B_i + O_i) + 2 (K - 1) c(n_cut);
- GPipe and 1F1B over m micro-batches of b = N / m: the pipeline fills and drains, so each
  worker's slot is taken m + K - 1 times (Huang et al. 2019; 1F1B changes the memory, not the
  bubble), T = (m + K - 1) max_k t_k(b) + max_k sum O_i + 2 (K - 1) c(n_cut / m),
  with t_k(b) = sum_{i in k} (F_i(b) + B_i(b));
- the DNI pipeline (section 3.3 of the paper: update decoupling): a worker waits for nobody once
  the pipeline is full, so the slowest worker sets the pace,
  T = max_k [sum_{i in k} (F_i + B_i + O_i) + sum_{j in k} S_j + m_k n_cut / beta],
  where m_k counts the messages worker k sends or receives a step (the copy of each costs its core
  time; the link's latency is hidden behind the compute).
The prediction for K = 2 is set against `python -m experiments.bench`'s measured samples per
second (results/bench.json); the goal is within 15%. Then the model extrapolates: K = 2 to 16
equal stages of a deeper FCN (the wide model's 1024-unit layers, or main.py's 256-unit layers
with its synthesizer), each on its own core, over links from this machine's loopback to NVLink.
Compute times are this CPU's: the links change, the cores do not.
"""
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from dni.errors import DNIError
from dni.synthesizers import make_synthesizer, synthesizer_loss
from dnilab.cli import OneLineParser, main_guard
from dnilab.partition import balanced_partition, stage_costs
from dnilab.runs import environment, write_json, write_text

BATCH = 256
MICROBATCHES = (2, 4, 8)
# (latency s, bandwidth bytes/s) of links the model extrapolates to; "loopback" is measured.
LINKS = {"10 GbE": (20e-6, 1.25e9), "100 Gb/s InfiniBand": (3e-6, 12.5e9), "NVLink": (2e-6, 150e9)}
DEPTHS = (2, 4, 8, 16)


class WallClock:
    """Seconds one call of fn takes by the host's clock; one call of warm-up. (The CUDA clock,
    experiments.cost_model_cuda.CudaClock, has the same shape: `warmup` and `clock(fn)`.)"""
    warmup = 1

    def __call__(self, fn):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start


def _median_time(fn, repeats, clock=WallClock()):
    for _ in range(clock.warmup):
        fn()
    return statistics.median(clock(fn) for _ in range(repeats))


def stage_times(stage, x, *, last, repeats, y=None, clock=WallClock()):
    """F, B and O of one stage on input x (the stage's own Adam), by `clock`: seconds."""
    optimizer = torch.optim.Adam(stage.parameters(), lr=1e-4)
    x = x.detach().requires_grad_(x.is_floating_point())
    out = {}

    def forward():
        return stage(x)

    def loss_of(h):
        return F.cross_entropy(h, y) if last else h.sum()

    out["F"] = _median_time(forward, repeats, clock)
    h = forward()

    def backward():
        optimizer.zero_grad(set_to_none=True)
        loss_of(stage(x)).backward()
    out["B"] = max(_median_time(backward, repeats, clock) - out["F"], 0.0)
    out["O"] = _median_time(optimizer.step, repeats, clock)
    return out, h.detach()


def synthesizer_time(synthesizer, h, context, repeats, clock=WallClock()):
    """S: one synthesizer's forward, loss against a target, backward and Adam step."""
    optimizer = torch.optim.Adam(synthesizer.parameters(), lr=1e-4)
    target = torch.randn_like(h)

    def update():
        optimizer.zero_grad(set_to_none=True)
        synthesizer_loss(synthesizer(h, context), target).backward()
        optimizer.step()
    return _median_time(update, repeats, clock)


def network_costs(model, repeats, device=torch.device("cpu"), clock=WallClock()):
    """Measured costs of the bench's network `model` on `device` by `clock`: per stage, F and B at N
    and at each micro-batch, O; per synthesizer, S for DNI and cDNI; the partition and the cut's
    size in bytes."""
    from experiments.bench_workloads import make_net
    torch.manual_seed(0)
    x = torch.randn(BATCH, 1, 28, 28).to(device)
    y = torch.randint(0, 10, (BATCH,)).to(device)
    net = make_net(model, "backprop", False)
    parts = balanced_partition(stage_costs(net, (1, 28, 28)), 2)
    net.to(device)
    stages, inputs = [], [x]
    for i, stage in enumerate(net.stages):
        last = i == len(net.stages) - 1
        costs, h = stage_times(stage, inputs[-1], last=last, repeats=repeats, y=y, clock=clock)
        for m in MICROBATCHES:
            small, _ = stage_times(stage, inputs[-1][:BATCH // m], last=last, repeats=repeats, y=y[:BATCH // m],
                                   clock=clock)
            costs[f"F/{m}"], costs[f"B/{m}"] = small["F"], small["B"]
        stages.append(costs)
        inputs.append(h)
    synths = {}
    for name, conditioned in (("dni", False), ("cdni", True)):
        dni_net = make_net(model, "dni", conditioned).to(device)
        context = F.one_hot(y, 10).float() if conditioned else None
        synths[name] = [synthesizer_time(s, inputs[j + 1], context, repeats, clock)
                        for j, s in enumerate(dni_net.synthesizers)]
    cut = parts[0].stop  # the activation between worker 0 and worker 1
    return {"stages": stages, "synthesizers": synths, "partition": [[p.start, p.stop] for p in parts],
            "cut_bytes": inputs[cut].numel() * inputs[cut].element_size()}


def _pingpong(rank, port, sizes, repeats, queue):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    out = {}
    for n in sizes:
        buf = torch.zeros(n // 4)
        times = []
        for r in range(repeats + 2):
            dist.barrier()
            start = time.perf_counter()
            if rank == 0:
                dist.send(buf, 1)
                dist.recv(buf, 1)
            else:
                dist.recv(buf, 0)
                dist.send(buf, 0)
            if r >= 2:
                times.append((time.perf_counter() - start) / 2)  # one way
        out[n] = statistics.median(times)
    dist.destroy_process_group()
    if rank == 0:
        queue.put(out)


def measure_link(repeats):
    """alpha (s) and beta (bytes/s) of one gloo message over 127.0.0.1, by least squares over sizes."""
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sizes = [4 * 2 ** k for k in range(6, 21, 2)]  # 256 B to 4 MB
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_pingpong, args=(rank, port, sizes, repeats, queue)) for rank in range(2)]
    for p in procs:
        p.start()
    times = queue.get(timeout=300)
    for p in procs:
        p.join()
    alpha, beta = fit_line(sizes, [times[s] for s in sizes])
    return {"alpha": alpha, "beta": beta, "one_way_s": {str(k): v for k, v in times.items()}}


def fit_line(sizes, times):
    """(alpha, beta) of t(n) = alpha + n / beta, least squares over the sizes n (bytes) and times t (s)."""
    n = torch.tensor(sizes, dtype=torch.float64)
    t = torch.tensor(times, dtype=torch.float64)
    slope, intercept = torch.linalg.lstsq(torch.stack([n, torch.ones_like(n)], 1), t[:, None]).solution.flatten()
    return max(float(intercept), 0.0), 1.0 / float(slope)


def message(link, n):
    alpha, beta = link
    return alpha + n / beta


def predict(costs, link, method, microbatches=1):
    """Samples per second of one workload, from measured costs; see the module docstring."""
    stages, parts, n_cut = costs["stages"], [range(*p) for p in costs["partition"]], costs["cut_bytes"]
    K = len(parts)
    if method == "locked":
        T = sum(s["F"] + s["B"] + s["O"] for s in stages) + 2 * (K - 1) * message(link, n_cut)
    elif method in ("gpipe", "1f1b"):
        m = microbatches
        slot = max(sum(stages[i][f"F/{m}"] + stages[i][f"B/{m}"] for i in part) for part in parts)
        T = (m + K - 1) * slot + max(sum(stages[i]["O"] for i in part) for part in parts) \
            + 2 * (K - 1) * message(link, n_cut / m)
    else:  # "dni" or "cdni": each worker at its own pace; its synthesizers are those of its stages but the last
        synths = costs["synthesizers"][method]
        last = len(stages) - 1
        work = []
        for k, part in enumerate(parts):
            messages = (k > 0) * 2 + (k < K - 1) * 2  # activation in/out, gradient out/in
            work.append(sum(stages[i]["F"] + stages[i]["B"] + stages[i]["O"] for i in part)
                        + sum(synths[i] for i in part if i < last) + messages * n_cut / link[1])
        T = max(work)
    return BATCH / T


BENCH_KEYS = {"locked": ("locked_backprop_K", "locked", 1), "dni": ("dni_pipeline_K", "dni", 1),
              "cdni": ("cdni_pipeline_K", "cdni", 1),
              **{f"{s}_m{m}": (f"{s}_m{m}_K", s, m) for s in ("gpipe", "1f1b") for m in MICROBATCHES}}


def check(costs_by_model, link, bench):
    """Predicted against measured samples per second at K = 2, per model and workload."""
    rows = []
    for model, costs in costs_by_model.items():
        for name, (key, method, m) in BENCH_KEYS.items():
            measured = bench["throughput"].get(f"{model}/{key}", {}).get("median")
            predicted = predict(costs, link, method, m)
            rows.append(dict(model=model, workload=name, predicted=predicted, measured=measured,
                             error=None if not measured else predicted / measured - 1))
    return rows


def deep_costs(unit, K, synth_hidden, repeats, device=torch.device("cpu"), clock=WallClock()):
    """Costs of K equal stages of `unit` features (Linear-BN-ReLU), one per worker, each but the
    last with a synthesizer of `synth_hidden` hidden layers (0: linear), on `device` by `clock`."""
    stage = nn.Sequential(nn.Linear(unit, unit), nn.BatchNorm1d(unit), nn.ReLU()).to(device)
    x = torch.randn(BATCH, unit).to(device)
    costs, _ = stage_times(stage, x, last=False, repeats=repeats, clock=clock)
    for m in MICROBATCHES + (16, 32):
        small, _ = stage_times(stage, x[:BATCH // m], last=False, repeats=repeats, clock=clock)
        costs[f"F/{m}"], costs[f"B/{m}"] = small["F"], small["B"]
    synth = make_synthesizer((unit,), hidden_layers=synth_hidden, width=2048).to(device)
    s = synthesizer_time(synth, x, None, repeats, clock)
    return {"stages": [costs] * K, "synthesizers": {"dni": [s] * K}, "partition": [[k, k + 1] for k in range(K)],
            "cut_bytes": BATCH * unit * 4}


DEEP = (("1024-unit stages, linear synthesizer", 1024, 0),
        ("256-unit stages, main.py's DNI synthesizer (2048 hidden)", 256, 1))  # name, unit, synthesizer's hidden layers


def extrapolate(link_measured, repeats):
    """Per deep model, link and K: samples/s of locked, the best of 1F1B's micro-batch counts, and DNI."""
    links = {"loopback (measured)": link_measured, **LINKS}
    return [row for name, unit, hidden in DEEP for row in deep_rows(name, deep_costs(unit, 2, hidden, repeats), links)]


def deep_rows(name, base, links):
    """Rows of `extrapolate` for one deep model whose stage and synthesizer costs are `base`'s."""
    rows = []
    for K in DEPTHS:
        costs = dict(base, stages=base["stages"][:1] * K, synthesizers={"dni": base["synthesizers"]["dni"][:1] * K},
                     partition=[[k, k + 1] for k in range(K)])
        for link_name, link in links.items():
            pipe = {m: predict(costs, link, "1f1b", m) for m in MICROBATCHES + (16, 32)}
            best = max(pipe, key=pipe.get)
            rows.append(dict(model=name, K=K, link=link_name, locked=predict(costs, link, "locked"),
                             one_f_one_b=pipe[best], microbatches=best, dni=predict(costs, link, "dni")))
    return rows


def markdown(result, cuda=None):
    """cost_model.md from cost_model.json's `result`, with a section for cuda.json's `cuda` if given."""
    link = result["link"]
    lines = ["# A cost model of pipelined training, checked against the bench", "",
             f"Made by `{result['command']}` at commit {(result.get('env', {}).get('git_commit') or 'unknown')[:7]}"
             f"{' (modified tree)' if result.get('env', {}).get('git_dirty') else ''}; torch {result['torch']}, one thread per process. The link: gloo "
             f"over 127.0.0.1, alpha {link['alpha'] * 1e6:.0f} us, beta {link['beta'] / 1e9:.2f} GB/s "
             f"(fitted to a ping-pong). Measured samples/s: {result.get('bench', 'results/bench.json')}, made just "
             "before on the same machine. experiments/cost_model.py's docstring gives the model.", "",
             "## Predicted against measured, K = 2", "",
             "| model | workload | predicted samples/s | measured samples/s | error |", "|---|---|---|---|---|"]
    for r in result["check"]:
        measured = "—" if r["measured"] is None else f"{r['measured']:.0f}"
        error = "—" if r["error"] is None else f"{100 * r['error']:+.0f}%"
        lines.append(f"| {r['model']} | {r['workload']} | {r['predicted']:.0f} | {measured} | {error} |")
    errors = [abs(r["error"]) for r in result["check"] if r["error"] is not None]
    within = sum(e <= 0.15 for e in errors)
    lines += ["", f"{within} of {len(errors)} predictions within 15% of the measurement; the largest error "
              f"{100 * max(errors):.0f}%.", "",
              "## Extrapolated: K equal stages, one core each, over faster links", "",
              "| stages | K | link | locked | 1F1B (best m) | DNI pipeline | DNI / 1F1B |", "|---|---|---|---|---|---|---|"]
    for r in result["extrapolated"]:
        lines.append(f"| {r['model']} | {r['K']} | {r['link']} | {r['locked']:.0f} | {r['one_f_one_b']:.0f} "
                     f"(m={r['microbatches']}) | {r['dni']:.0f} | {r['dni'] / r['one_f_one_b']:.2f}x |")
    lines += ["", "Samples per second predicted from this CPU's measured stage, synthesizer and link costs; "
              "a GPU's stages would change every compute term.", ""]
    if cuda is not None:
        from experiments.cost_model_cuda import markdown_section
        lines[-1:] = markdown_section(cuda, (link["alpha"], link["beta"]))
    return "\n".join(lines)


def parse_args(argv=None):
    parser = OneLineParser(prog="python -m experiments.cost_model", description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results", help="folder of bench.json and of the outputs")
    parser.add_argument("--repeats", type=int, default=30, help="timings per measured cost (median)")
    parser.add_argument("--table_only", action="store_true", help="time nothing: redraw from results/cost_model.json "
                        "(and cuda.json beside it, if there)")
    parser.add_argument("--measure_cuda", action="store_true", help="time the stages, synthesizers and host-device "
                        "copies on the GPU into <results>/cuda.json, nothing else (needs CUDA)")
    return parser.parse_args(argv)


def _read(path, made_by):
    """A JSON file this model reads, or a one-line error naming the command that makes it."""
    if not path.exists():
        raise DNIError(f"{path} is missing: make it with {made_by}")
    return json.loads(path.read_text())


def cost_model(args):
    results = Path(args.results)
    if args.measure_cuda:
        from experiments.cost_model_cuda import measure_cuda
        return measure_cuda(args)
    if args.table_only:
        result = _read(results / "cost_model.json", f"python -m experiments.cost_model --results {results}")
    else:
        torch.set_num_threads(1)
        bench = _read(results / "bench.json", f"python -m experiments.bench --out {results}")
        link = measure_link(args.repeats)
        costs = {model: network_costs(model, args.repeats) for model in ("wide", "mlp")}
        pair = (link["alpha"], link["beta"])
        result = dict(command="python -m experiments.cost_model " + " ".join(sys.argv[1:]), torch=torch.__version__,
                      env=environment(torch.device("cpu")), bench=(results / "bench.json").as_posix(), link=link, costs=costs, check=check(costs, pair, bench),
                      extrapolated=extrapolate(pair, args.repeats))
        write_json(results / "cost_model.json", result)
    cuda = json.loads((results / "cuda.json").read_text()) if (results / "cuda.json").exists() else None
    write_text(results / "cost_model.md", markdown(result, cuda))
    print(markdown(result, cuda))
    return result


def main(argv=None):
    return main_guard(cost_model, parse_args(argv))


if __name__ == "__main__":
    main()
