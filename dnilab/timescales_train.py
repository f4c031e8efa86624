"""The trainers of the two-timescale system (dnilab.timescales): in one process, or as two
processes, A and B on one core each, and the run folder of `python timescales.py`."""

import dataclasses
import json
import queue as queue_module
import time
from pathlib import Path

import torch

from dni.errors import DNIError
from dnilab.data import load_data
from dnilab.runs import claim_run_dir, environment, record_environment, write_json
from dnilab.timescales import (TRAINS_A_FROM_B, DigitStream, NetA, a_backward, a_span_graph, a_ticks, accuracy,
                               b_tick, build, correct_spans, fixed_streams, load_digits, span_step,
                               synthesizer_step, targets_of)


# ---------------------------------------------------------------- one process

def train(config, data, *, log=print, metrics=None):
    """Train the system in one process for config.spans spans; returns (system, summary).
    `metrics` receives one dict per evaluation (kind "eval")."""
    torch.set_num_threads(1)
    (train_x, train_y), (val_x, val_y), _ = data
    val = fixed_streams(val_x, val_y, config.val_streams, config.span)
    system = build(config)
    stream = DigitStream(train_x, train_y, config.streams, config.seed)
    a_state = torch.zeros(config.streams, config.hidden_a)
    b_state = torch.zeros(config.streams, config.hidden_b)
    counts = dict(a_steps=0, b_steps=0, m_steps=0)
    count_steps(system, counts)
    since, spent = _fresh(), 0.0
    rows = []
    for k in range(1, config.spans + 1):
        start = time.perf_counter()
        xs, digits = stream.read(config.span)
        a_state, b_state, stats = span_step(system, config, xs, digits, a_state, b_state)
        spent += time.perf_counter() - start
        _accumulate(since, stats)
        if k % config.eval_spans == 0 or k == config.spans:
            row = _row(config, k, since, spent, counts, accuracy(system.a, system.b, *val, config.span, config.task))
            rows.append(row)
            _log_row(log, row)
            if metrics is not None:
                metrics(row)
            since = _fresh()
    return system, _summary(config, rows, counts, spent)


def count_steps(system, counts):
    """Count every optimizer step of A, B and the synthesizer into `counts` (the two clocks)."""
    for key, opt in (("a_steps", system.opt_a), ("b_steps", system.opt_b), ("m_steps", system.opt_m)):
        if opt is not None:
            opt.register_step_post_hook(lambda *_, key=key: counts.__setitem__(key, counts[key] + 1))


def _fresh():
    """Sums since the last evaluation: spans, B's loss and right answers, the synthesizer's loss and cosine."""
    return dict(spans=0, loss=0.0, correct=0, sg_loss=0.0, sg_cos=0.0, sg_n=0)


def _accumulate(since, stats):
    """Add one span's stats to `since`."""
    since["spans"] += 1
    since["loss"] += stats["loss"]
    since["correct"] += stats["correct"]
    if "sg_loss" in stats:
        since["sg_loss"] += stats["sg_loss"]
        since["sg_cos"] += stats["sg_cos"]
        since["sg_n"] += 1


def _row(config, k, since, seconds, counts, val_acc):
    """One metrics.jsonl row: the evaluation after span k, averages since the previous one."""
    n = max(since["spans"], 1)
    row = dict(kind="eval", tick=k * config.span, span=k, val_acc=val_acc, loss=since["loss"] / n,
               train_acc=since["correct"] / (n * config.streams), time=round(seconds, 3), **counts)
    if since["sg_n"]:
        row.update(sg_loss=since["sg_loss"] / since["sg_n"], sg_cos=since["sg_cos"] / since["sg_n"])
    return row


def _log_row(log, row):
    """The row as one fixed-format log line."""
    sg = f" sg_loss {row['sg_loss']:.2e} sg_cos {row['sg_cos']:.3f}" if "sg_loss" in row else ""
    log(f"tick {row['tick']} span {row['span']} loss {row['loss']:.4f} train_acc {row['train_acc']:.4f} "
        f"val_acc {row['val_acc']:.4f}{sg} {row['time']:.1f}s")


def _summary(config, rows, counts, seconds):
    """summary.json's numbers (the test accuracy and settings are added by `run`)."""
    return dict(val_acc=rows[-1]["val_acc"], best_val_acc=max(r["val_acc"] for r in rows), ticks=config.spans * config.span,
                spans=config.spans, train_s=round(seconds, 2), spans_per_s=round(config.spans / max(seconds, 1e-9), 1),
                **counts)


# ---------------------------------------------------------------- two processes

def _b_worker(config, spans_q, grads_q, results_q):
    """Process B (one core): tick on each span A sends, in order; under DNI and backprop send back
    the gradient on the span (under backprop before stepping, so A waits as little as it can).
    Keeps its weights and the time after each evaluated span; sends them and its counts at the end."""
    torch.set_num_threads(1)
    system = build(config)   # the same initial weights as A's process builds
    counts = dict(a_steps=0, b_steps=0, m_steps=0)
    count_steps(system, counts)
    b_state = torch.zeros(config.streams, config.hidden_b)
    sends = config.method in TRAINS_A_FROM_B
    results_q.put("ready")
    snapshots, since = [], _fresh()
    while True:
        message = spans_q.get()
        if message is None:
            break
        k, outputs, targets = message
        outputs, targets = torch.from_numpy(outputs), torch.from_numpy(targets)
        logits, loss, grad, b_state = b_tick(system, outputs, targets, b_state, input_grad=sends, task=config.task,
                                             step=False)
        if sends:
            grads_q.put((k, grad.numpy()))
        system.opt_b.step()
        _accumulate(since, dict(loss=float(loss), correct=correct_spans(config.task, logits, targets)))
        if k % config.eval_spans == 0 or k == config.spans:
            weights = {name: value.numpy() for name, value in _cpu_state(system.b).items()}
            snapshots.append((k, time.monotonic(), weights, dict(since), counts["b_steps"]))
            since = _fresh()
    results_q.put(snapshots)


def _cpu_state(module):
    """A copy of a module's weights."""
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def _alive(worker, call, *args):
    """queue.get / put through `call`, waiting as long as it takes while process B lives; one line
    if B has died (it cannot answer any more)."""
    while True:
        try:
            return call(*args, timeout=1.0)
        except (queue_module.Empty, queue_module.Full):
            if not worker.is_alive():
                raise DNIError(f"process B exited (code {worker.exitcode}) before the run ended; "
                               f"its error is above") from None


def train_two_processes(config, data, *, log=print, metrics=None):
    """Train with A in this process and B in another, one core each (torch.multiprocessing): A sends
    each span of outputs to B; under DNI A trains its synthesizer on the gradients B sends back
    whenever they arrive, and never waits for them; under backprop A waits for each. Seconds are
    from both processes being ready to B finishing each evaluated span. Returns (system, summary)."""
    import torch.multiprocessing as mp

    torch.set_num_threads(1)
    (train_x, train_y), (val_x, val_y), _ = data
    val = fixed_streams(val_x, val_y, config.val_streams, config.span)
    # fork where there is one: B starts in a moment, with torch already imported (A and B run on the
    # CPU, one thread each, so nothing forked is in use); spawn elsewhere
    context = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    spans_q, grads_q, results_q = context.Queue(maxsize=config.in_flight), context.Queue(), context.Queue()
    worker = context.Process(target=_b_worker, args=(config, spans_q, grads_q, results_q), daemon=True)
    worker.start()
    system = build(config)
    counts = dict(a_steps=0, b_steps=0, m_steps=0)
    count_steps(system, counts)
    stream = DigitStream(train_x, train_y, config.streams, config.seed)
    a_state = torch.zeros(config.streams, config.hidden_a)
    pending, a_snapshots, sg = {}, {}, _fresh()    # pending: span -> (triggers, contexts) awaiting B's gradient
    waited = 0.0

    def learn(k, grad):
        triggers, contexts = pending.pop(k)
        loss, cos = synthesizer_step(system, triggers, contexts, torch.from_numpy(grad))
        sg["sg_loss"] += float(loss)
        sg["sg_cos"] += float(cos)
        sg["sg_n"] += 1

    if _alive(worker, results_q.get) != "ready":
        raise DNIError("process B did not start")
    t0 = time.monotonic()
    for k in range(1, config.spans + 1):
        xs, digits = stream.read(config.span)
        targets = targets_of(config.task, digits.T).numpy()
        if config.method == "backprop":
            outputs = a_span_graph(system, xs, a_state)
            _alive(worker, spans_q.put, (k, outputs.detach().numpy(), targets))
            start = time.monotonic()
            got, grad = _alive(worker, grads_q.get)                       # A is locked until B's gradient
            waited += time.monotonic() - start
            assert got == k, f"B answered span {got} for span {k}"
            a_backward(system, outputs, torch.from_numpy(grad))
            a_state = outputs[:, -1].detach()
        else:
            a_state, outputs, contexts = a_ticks(system, config, xs, digits, a_state)
            if config.method == "dni":
                pending[k] = (outputs, contexts)
            _alive(worker, spans_q.put, (k, outputs.numpy(), targets))
            while config.method == "dni":                                 # whatever has arrived; never wait
                try:
                    learn(*grads_q.get_nowait())
                except queue_module.Empty:
                    break
        if k % config.eval_spans == 0 or k == config.spans:
            a_snapshots[k] = (_cpu_state(system.a), dict(counts), dict(sg))
            sg = _fresh()
    _alive(worker, spans_q.put, None)
    b_snapshots = _alive(worker, results_q.get)
    a_done = time.monotonic() - t0
    while config.method == "dni":        # gradients of the last spans: A has finished; drained so B can exit
        try:
            grads_q.get(timeout=0.5)
        except queue_module.Empty:
            break
    worker.join()
    rows = []
    a_eval, b_eval = NetA(encoder=config.encoder, hidden=config.hidden_a), build(config).b
    for k, when, b_weights, since, b_steps in b_snapshots:                # evaluated after training: untimed
        a_weights, a_counts, sg_since = a_snapshots[k]
        a_eval.load_state_dict(a_weights)
        b_eval.load_state_dict({name: torch.from_numpy(value) for name, value in b_weights.items()})
        since.update({key: sg_since[key] for key in ("sg_loss", "sg_cos", "sg_n")})
        row = _row(config, k, since, when - t0, dict(a_counts, b_steps=b_steps), accuracy(a_eval, b_eval, *val, config.span, config.task))
        rows.append(row)
        _log_row(log, row)
        if metrics is not None:
            metrics(row)
    a_eval.load_state_dict(a_snapshots[config.spans][0])
    system.a.load_state_dict(a_eval.state_dict())
    system.b.load_state_dict(b_eval.state_dict())
    counts["b_steps"] = rows[-1]["b_steps"]
    summary = _summary(config, rows, counts, rows[-1]["time"])
    summary.update(a_wait_s=round(waited, 2), a_done_s=round(a_done, 2))
    return system, summary


# ---------------------------------------------------------------- the run folder

def run(config, *, log=print, load=load_data):
    """Train as `config` says in the run folder <out>/<name>/: config.json, command.txt, env.json,
    metrics.jsonl, summary.json (written last; its presence marks a finished run). The test set
    is read once, at the end. Returns the summary dict."""
    folder = Path(config.out) / config.name
    if (folder / "summary.json").exists() and not config.overwrite:   # before the data: bad input writes nothing
        raise DNIError(f"{folder} already holds a finished run; pass --overwrite True or another --name")
    data = load_digits(config, load)
    fixed_streams(*data[1], config.val_streams, config.span)          # refuse an impossible split before training
    folder = claim_run_dir(folder, overwrite=config.overwrite)
    device = torch.device("cpu")
    record_environment(folder, config, device)
    trainer = train_two_processes if config.processes == 2 else train
    with open(folder / "metrics.jsonl", "w") as f:
        system, summary = trainer(config, data, log=log, metrics=lambda row: f.write(json.dumps(row) + "\n"))
    summary["test_acc"] = accuracy(system.a, system.b, *fixed_streams(*data[2], config.val_streams, config.span),
                                   config.span, config.task)
    summary.update(config=dataclasses.asdict(config), env=environment(device, folder))
    write_json(folder / "summary.json", summary)
    log(f"T={config.span} {config.method} ({config.processes} process{'es' if config.processes == 2 else ''}): "
        f"val_acc {summary['val_acc']:.4f} test_acc {summary['test_acc']:.4f} ({summary['train_s']:.0f}s) -> {folder}")
    return summary
