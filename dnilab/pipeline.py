"""Pipelined DNI: every group of stages trains in its own worker process (paper, section 2:
update unlocking; shared DNI.md, "Pipelined").

    torchrun --nproc_per_node 2 main.py --model_type mlp --pipeline True                     # DNI
    torchrun --nproc_per_node 2 main.py --model_type mlp --pipeline True --method backprop   # locked

Worker r owns the consecutive stages f_s..f_{e-1} and their synthesizers, and loops over
batches t:

    receive h_{s-1}(t) from worker r-1           (worker 0 reads the images itself)
    for each local stage i: stage_update (or loss_update for the last stage of the net);
        an internal boundary trains M_{i-1} at once (synthesizer_update), as dni_step does;
        the first local stage sends its input gradient back to worker r-1 instead
    send h_{e-1}(t) to worker r+1, keep (trigger, context, g_hat_{e-1}(t)), post a receive
        for its true gradient
    train M_{e-1} on every true gradient that has arrived: synthesizer_update(g_hat(t'), grad(t'))
        (gloo reports a receive complete only once it is waited on, so on CPU M_{e-1} learns
        exactly k-1 batches late, deterministically; k = --max_in_flight)

A worker goes on to batch t+1 without waiting for worker r+1: that is update unlocking.
At most `max_in_flight` batches wait for their true gradient; after that the worker blocks
on the oldest one, so memory stays flat. With max_in_flight=1 the maths is exactly
sequential `dni_step` (tests/test_pipeline.py checks the parameters).

When the true gradient of batch t arrives, M_{e-1} may have been stepped since it made
g_hat(t). Then it is asked again, on the kept trigger and context (BatchNorm statistics
frozen, so they still move once per batch), and trained on that fresh prediction: the
synthesizer's update (paper, section 2) is the gradient of its loss at its current
parameters, which the old g_hat(t), made by earlier ones, is not (docs/pipeline.md).

The locked baseline (`--method backprop`) is model-parallel backprop on the same workers
and partition: worker r forwards, sends h on, and waits for the gradient of batch t to come
back before it can backward, step and take batch t+1.

Design choices, written once:
- Labels are never sent: every worker draws the same batch order from the same seeded
  generator (`dnilab.data.batches`). Every worker builds the whole net from the same seed, so
  the initial weights equal a sequential run's, then keeps only its share: its stages and
  synthesizers (the others move to the meta device: shapes without storage), their
  optimizer states, and the data it reads (worker 0 the images; the last worker, and every
  worker under cDNI, the labels; `share_of_data`).
- A DNI sits after every stage, as in sequential DNI, so the model, its state_dict and its
  maths do not depend on the number of workers; the partition only says who computes what.
  The partition is balanced by multiply-adds per example of each stage plus its
  synthesizer (`stage_costs`), or given by `--partition 2,2` (stages per worker).
- torch.distributed carries activations and gradients (isend/irecv, so they overlap with
  compute): gloo on CPU, NCCL on CUDA (one GPU per worker).
- Rank 0 writes the run folder of a sequential run. After every epoch the workers evaluate
  the net together, pipelined as in training (`PipelineWorker.evaluate`); rank 0 gathers the
  step statistics, the accuracies and the workers' state_dicts (parameters and optimizer
  states: CPU copies, held only to write them) and writes metrics.jsonl and checkpoint.pt;
  summary.json and plots at the end.
- Messages: every activation and gradient carries the step of its batch, is matched by it
  (gloo's point-to-point tag) and is checked against it on receipt (`Peers`), so pairing a
  true gradient with its own batch's trigger never rests on the order of delivery.
- Faults: every step checks what it computed (stage outputs, synthetic gradients, losses,
  gradients) and stops at the first non-finite one, naming the worker, the stage and the
  step. Every wait on another worker has a deadline (--worker_timeout, also the process
  group's timeout); a dead peer is seen at once by its closed connection. Either way the
  worker stops with one line, `error: worker 0: ...`, and exit code 2 (at once, by os._exit:
  see `run_pipeline`); files already written stay as they were. Workers started with
  different settings refuse to start.
"""
import contextlib
import hashlib
import json
import math
import os
import re
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from dnilab.data import Data, batches, held_bytes, load_data, num_batches, placeholder
from dni.errors import DNIError
from dni.interface import loss_update, stage_update, synthesize, synthesizer_update
from dni.unlock import frozen_statistics
from dnilab.models import stage_shapes
from dnilab.runs import git_commit, prepare_run_dir, record_environment, save_checkpoint, write_json
from dnilab.parts import Optimizers, build_net, check_finite, load_run_data, pick_device, set_seed, step_schedules


# ---------------------------------------------------------------- partition

@torch.no_grad()
def stage_costs(net, in_shape):
    """Multiply-adds per example of each stage plus its synthesizer (forward pass): the work
    a worker does for that stage, up to a common factor for backward and update."""
    macs, current = [0] * len(net.stages), [0]

    def count(module, inputs, output):
        per_example = output[0].numel()
        if isinstance(module, nn.Linear):
            macs[current[0]] += per_example * module.in_features
        else:  # Conv2d
            kh, kw = module.kernel_size
            macs[current[0]] += per_example * module.in_channels // module.groups * kh * kw

    hooks = [m.register_forward_hook(count) for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    was_training = net.training
    net.eval()
    try:
        h = torch.zeros(1, *in_shape, device=next(net.parameters()).device)
        for i, stage in enumerate(net.stages):
            current[0] = i
            h = stage(h)
            if net.synthesizers is not None and i < len(net.synthesizers):
                synthesize(net.synthesizers[i], h, net.context(torch.zeros(1, dtype=torch.long, device=h.device)))
    finally:
        for hook in hooks:
            hook.remove()
        net.train(was_training)
    return macs


def balanced_partition(costs, workers):
    """Cut stages into `workers` consecutive groups so the busiest worker has the least work.

    Returns a list of ranges of stage indices, one per worker (exact, by dynamic programming)."""
    n = len(costs)
    if workers > n:
        raise DNIError(f"{workers} workers but the network has only {n} stages; "
                       "use fewer workers (--nproc_per_node) or a deeper net (--depth)")
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    @lru_cache(maxsize=None)
    def best(start, w):  # stages start.. shared by w workers -> (max load, stops)
        if w == 1:
            return prefix[n] - prefix[start], (n,)
        return min((max(prefix[stop] - prefix[start], best(stop, w - 1)[0]), (stop,) + best(stop, w - 1)[1])
                   for stop in range(start + 1, n - w + 2))

    stops = best(0, workers)[1]
    return [range(a, b) for a, b in zip((0,) + stops[:-1], stops)]


def parse_partition(text, num_stages, workers):
    """'2,2' (stages per worker, in order) -> [range(0, 2), range(2, 4)]; anything else is refused."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise DNIError(f"--partition {text!r}: expected stages per worker as positive integers, e.g. 2,2")
    if len(counts) != workers or sum(counts) != num_stages:
        raise DNIError(f"--partition {text!r} gives {len(counts)} workers {sum(counts)} stages, but there are "
                       f"{workers} workers and {num_stages} stages")
    stops = [sum(counts[:i + 1]) for i in range(workers)]
    return [range(a, b) for a, b in zip([0] + stops[:-1], stops)]


def describe_partition(parts, costs=None):
    """'worker 0: stages 1-2 (0.7M MACs) | worker 1: stages 3-4 (...)', stages counted from 1."""
    out = []
    for r, part in enumerate(parts):
        stages = f"stage {part.start + 1}" if len(part) == 1 else f"stages {part.start + 1}-{part.stop}"
        load = f" ({sum(costs[i] for i in part) / 1e6:.2f}M MACs)" if costs else ""
        out.append(f"worker {r}: {stages}{load}")
    return " | ".join(out)


# ---------------------------------------------------------------- talking to other workers

def _reason(error):
    """The first sentence of a torch.distributed error, without gloo's source location."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)  # "[.../pair.cc:561] Connection closed..."
    return text.split(". ")[0].rstrip(".")


# Every message carries the step of the batch it belongs to as one extra element, checked on
# receipt; a float32 counts integers exactly up to 2**24, so the tag is the step modulo that.
TAG_MODULUS = 2 ** 24


@dataclass
class Message:
    """A send or a receive under way between two workers: `payload` is the flat tensor with the
    step tag appended, `work` torch.distributed's handle; `shape` is the tensor's shape (receives)."""
    payload: torch.Tensor
    work: object
    peer: int
    what: str
    step: int
    shape: tuple = None

    def done(self):
        return self.work.is_completed()


class Peers:
    """Point-to-point messages to the neighbouring workers, tagged by step, with a deadline on every wait.

    A message is matched by its peer and its step (the point-to-point tag, on backends that
    have tags), and the step it carries is checked when it is read, so an activation or a
    gradient can never be paired with another batch's. Every failure (a peer that died: its
    connection closes; one that stalls: the deadline passes; a message of another step)
    becomes a one-line DNIError naming the peer, the message and the step."""

    def __init__(self, rank, timeout_s, device, tagged=True):
        self.rank, self.timeout_s, self.device = rank, timeout_s, torch.device(device)
        self.timeout = timedelta(seconds=timeout_s)
        self.tagged = tagged  # NCCL has no point-to-point tags: it delivers in order, and the check stays
        self.waited_s = 0.0  # time spent blocked on other workers: the pipeline's bubbles

    def lost(self, peer, what, step, error):
        return DNIError(f"worker {self.rank}: lost worker {peer} ({what}, step {step}): {_reason(error)}; "
                        f"it crashed, was stopped or stalled past --worker_timeout {self.timeout_s:g}s; "
                        f"see its log")

    def _tag(self, step):
        return step % TAG_MODULUS if self.tagged else 0

    def send(self, tensor, peer, what, step):
        """Start sending `tensor` of batch `step`; the Message keeps the buffer alive until waited on."""
        payload = torch.cat([tensor.detach().reshape(-1), tensor.new_full((1,), step % TAG_MODULUS)])
        try:
            return Message(payload, self.start_send(payload, peer, step), peer, what, step)
        except RuntimeError as e:  # DistBackendError is a RuntimeError
            raise self.lost(peer, what, step, e) from None

    def recv(self, shape, peer, what, step):
        """Post the receive of the (B, ...) tensor `shape` of batch `step`."""
        payload = torch.empty(math.prod(shape) + 1, device=self.device)
        try:
            return Message(payload, self.start_recv(payload, peer, step), peer, what, step, tuple(shape))
        except RuntimeError as e:
            raise self.lost(peer, what, step, e) from None

    def start_send(self, payload, peer, step):
        """The transport: torch.distributed, matching by step where the backend has tags."""
        return dist.isend(payload, peer, tag=self._tag(step))

    def start_recv(self, payload, peer, step):
        return dist.irecv(payload, peer, tag=self._tag(step))

    def wait(self, message):
        """Block until `message` is through; a receive returns its tensor, checked to be of its step."""
        start = time.perf_counter()
        try:
            message.work.wait(self.timeout)
        except RuntimeError as e:
            raise self.lost(message.peer, message.what, message.step, e) from None
        finally:
            self.waited_s += time.perf_counter() - start
        return None if message.shape is None else open_message(message, self.rank)


def open_message(message, rank):
    """The tensor a received Message carries, after checking the step it was sent for."""
    sent_for = int(message.payload[-1].item())
    if sent_for != message.step % TAG_MODULUS:
        raise DNIError(f"worker {rank}: the {message.what} from worker {message.peer} received as step "
                       f"{message.step} was sent for step {sent_for}; messages were paired across batches")
    return message.payload[:-1].view(message.shape)


@contextlib.contextmanager
def collective(rank, what, timeout_s):
    """A collective call (gather, broadcast): failures become one line too, worded like Peers.lost."""
    try:
        yield
    except RuntimeError as e:
        raise DNIError(f"worker {rank}: lost a worker ({what}): {_reason(e)}; it crashed, was stopped "
                       f"or stalled past --worker_timeout {timeout_s:g}s; see the other logs") from None


# ---------------------------------------------------------------- one worker

class PipelineWorker:
    """The stages `part` of `net` (and their synthesizers), trained in this process.

    `net` is the whole DNINet, built from the same seed on every worker; only the stages in
    `part` are trained here, and with `release_others` only they (and their synthesizers) keep
    their storage. `optimizers` is a dnilab.parts.Optimizers of the net (at least of `part`).
    `train_epoch` runs DNI (method 'dni') or locked model-parallel backprop ('backprop').
    `peers` carries the messages (default: `Peers` over torch.distributed; tests inject others).
    """

    def __init__(self, *, net, optimizers, parts, rank, method, in_shape, batch_size, max_in_flight,
                 timeout_s=60.0, device="cpu", peers=None, release_others=False):
        self.net, self.optimizers, self.parts, self.part = net, optimizers, parts, parts[rank]
        self.rank, self.world, self.method = rank, len(parts), method
        self.max_in_flight, self.batch_size = max_in_flight, batch_size
        self.peers = peers or Peers(rank, timeout_s, device, tagged=torch.device(device).type != "cuda")
        shapes = [tuple(in_shape)] + stage_shapes(net.stages, in_shape)  # shapes[i]: input of stage i
        self.in_shape = (batch_size, *shapes[self.part.start])  # (B, ...) received from worker r-1
        self.out_shape = (batch_size, *shapes[self.part.stop])  # (B, ...) sent to worker r+1
        self.first, self.last = rank == 0, rank == self.world - 1
        self.num_stages = len(net.stages)
        # Optimizers.schedules lists the stages' schedules, then the synthesizers'.
        self.synths = [i for i in self.part if i < len(optimizers.synthesizers)]
        self.schedules = {("stages", i): optimizers.schedules[i] for i in self.part}
        self.schedules.update({("synthesizers", i): optimizers.schedules[self.num_stages + i] for i in self.synths})
        self.step = 0  # batches trained so far, over all epochs
        self.boundary_updates = 0  # steps of this worker's last synthesizer so far
        if release_others:
            release_others_of(net, self.part)

    def owns(self, key):
        """Whether a state_dict key of the net (stages.3.0.weight, synthesizers.2.net.0.bias) is trained here."""
        kind, index = key.split(".")[:2]
        return kind in ("stages", "synthesizers") and int(index) in self.part

    def local_state(self):
        """This worker's share of the net and of the optimizers, on the CPU, for rank 0 to assemble."""
        return {"net": {k: v.cpu() for k, v in self.net.state_dict().items() if self.owns(k)},
                "stages": {i: _to_cpu(self.optimizers.stages[i].state_dict()) for i in self.part},
                "synthesizers": {i: _to_cpu(self.optimizers.synthesizers[i].state_dict()) for i in self.synths},
                "schedules": {key: s.state_dict() for key, s in self.schedules.items()}}

    def held_bytes(self, data):
        """`held_by` this worker: its share of the net and optimizer states, and `data`."""
        optimizers = [self.optimizers.stages[i] for i in self.part] + [self.optimizers.synthesizers[i] for i in self.synths]
        return held_by(self.net, optimizers, data)

    @torch.no_grad()
    def evaluate(self, x, y, n, batch_size=1000):
        """Accuracy of the net on n examples, forward through the workers in eval mode, as
        `dnilab.parts.evaluate` does in one process: worker 0 reads the images `x`, the last worker
        the labels `y`. Returns the fraction on the last worker, None on the others."""
        stages = [self.net.stages[i] for i in self.part]
        modes = [stage.training for stage in stages]
        correct, outbox = torch.zeros((), dtype=torch.long), deque()
        try:
            for stage in stages:
                stage.eval()
            for j, start in enumerate(range(0, n, batch_size), start=1):
                b = min(batch_size, n - start)
                if self.first:
                    h = x[start:start + b]
                else:
                    h = self.peers.wait(self.peers.recv((b, *self.in_shape[1:]), self.rank - 1, "evaluation", j))
                for stage in stages:
                    h = stage(h)
                if self.last:
                    correct += (h.argmax(1) == y[start:start + b]).sum().cpu()
                else:
                    outbox.append(self.peers.send(h, self.rank + 1, "evaluation", j))
                    self._flush(outbox, keep=2)
            self._flush(outbox, keep=0)
        finally:
            for stage, mode in zip(stages, modes):
                stage.train(mode)
        return correct.item() / n if self.last else None

    def train_epoch(self, source, steps):
        """Train on `steps` batches of `source` (an iterator of (x, y); x is used by worker 0 only).

        Returns what this worker measured: {"seconds", "waited_s" (blocked on other workers),
        "loss", "correct" (last worker), "sg_loss", "sg_cos" ({synthesizer index: per step})},
        as Python numbers."""
        log = {"seconds": 0.0, "loss": [None] * steps, "correct": [None] * steps, "sg_loss": {}, "sg_cos": {}}
        start, waited = time.perf_counter(), self.peers.waited_s
        if self.method == "dni":
            self._train_dni(source, steps, log)
        else:
            self._train_locked(source, steps, log)
        if self.peers.device.type == "cuda":
            torch.cuda.synchronize()
        log["seconds"] = time.perf_counter() - start
        log["waited_s"] = self.peers.waited_s - waited
        for key in ("loss", "correct"):
            log[key] = torch.stack(log[key]).tolist() if self.last else None
        for key in ("sg_loss", "sg_cos"):
            log[key] = {i: torch.stack(v).tolist() for i, v in log[key].items()}
        return log

    def _step_schedules(self):
        step_schedules(self.schedules.values())
        self.step += 1

    def _record(self, log, synth, t, result):
        sg_loss, cos = result
        log["sg_loss"].setdefault(synth, [None] * len(log["loss"]))[t] = sg_loss
        log["sg_cos"].setdefault(synth, [None] * len(log["loss"]))[t] = cos

    def _flush(self, outbox, keep):
        """Forget sends that are done; wait for the oldest while more than `keep` are under way."""
        while outbox and (len(outbox) > keep or outbox[0].done()):
            self.peers.wait(outbox.popleft())

    def _send(self, outbox, tensor, peer, what):
        outbox.append(self.peers.send(tensor, peer, what, self.step + 1))

    def _check_finite(self, checks, step):
        """Stop at the step where a non-finite value appears, naming this worker and the stage.

        `checks` lists (what, lever, tensor) in the order they were computed this step; one
        synchronisation a step. The other workers then lose this one at once (its connection
        closes) and stop too."""
        flags = torch.stack([torch.isfinite(v).all() for _, _, v in checks])
        if bool(flags.all()):
            return
        what, lever, _ = checks[int((~flags).nonzero()[0])]
        raise DNIError(f"worker {self.rank}: {what} is not finite at step {step}; {lever}")

    def _received(self, h):
        """The check of an activation from worker r-1 (a non-finite one is reported there too)."""
        return f"the activation from worker {self.rank - 1}", f"worker {self.rank - 1} stops with the cause", h

    def _train_dni(self, source, steps, log):
        net, opt, k = self.net, self.optimizers, self.max_in_flight
        s, e, last_stage = self.part.start, self.part.stop, self.num_stages - 1
        up, down = self.rank - 1, self.rank + 1
        inbox = deque()  # Messages: h_{s-1} of the coming batches, received ahead
        waiting = deque()  # (t, step, g_hat, trigger, context, updates, Message): awaiting the true gradient
        outbox = deque()  # Messages: sends under way
        if not self.first:
            for t in range(min(k, steps)):
                inbox.append(self.peers.recv(self.in_shape, up, "activation", self.step + t + 1))
        for t, (x, y) in zip(range(steps), source):
            step, checks = self.step + 1, []
            if self.first:
                h = x
            else:
                h = self.peers.wait(inbox.popleft())
                checks.append(self._received(h))
                if t + k < steps:
                    inbox.append(self.peers.recv(self.in_shape, up, "activation", step + k))
            context, g_prev = net.context(y), None
            for i in range(s, e):
                if i < last_stage:
                    h, g_hat, input_grad = stage_update(net.stages[i], opt.stages[i], net.synthesizers[i], h,
                                                        context, needs_input_grad=i > 0)
                    checks += [(f"the output of stage {i + 1}", "lower --lr", h),
                               (f"the synthetic gradient of stage {i + 1}", "lower --sg_lr", g_hat.detach())]
                else:
                    logits, loss, input_grad = loss_update(net.stages[i], opt.stages[i], h, y,
                                                           needs_input_grad=i > 0)
                    log["loss"][t], log["correct"][t] = loss, (logits.argmax(1) == y).sum()
                    checks.append((f"the loss of stage {i + 1} (the classifier)", "lower --lr", loss))
                if i > 0:
                    checks.append((f"the gradient into stage {i + 1}", "lower --lr", input_grad))
                if i > s:  # a boundary inside this worker: the true gradient is here at once
                    result = synthesizer_update(opt.synthesizers[i - 1], g_prev, input_grad)
                    self._record(log, i - 1, t, result)
                    checks.append((f"the synthesizer loss of stage {i}", "lower --sg_lr", result[0]))
                elif i > 0:  # the previous worker's synthesizer learns from this
                    self._send(outbox, input_grad, up, "gradient")
                g_prev = g_hat if i < last_stage else None
            self._check_finite(checks, step)
            if not self.last:
                self._send(outbox, h, down, "activation")
                waiting.append((t, step, g_prev, h, context, self.boundary_updates,
                                self.peers.recv(self.out_shape, down, "gradient", step)))
            # Train the boundary synthesizer on every true gradient that is here, and on the
            # oldest one (waiting for it) while k batches are in flight: the pipeline's bound.
            while waiting and (len(waiting) >= k or waiting[0][-1].done()):
                self._learn_boundary(waiting.popleft(), log)
            self._flush(outbox, keep=2 * k)
            self._step_schedules()
        while waiting:  # the end of the epoch: every synthesizer learns from every batch
            self._learn_boundary(waiting.popleft(), log)
        self._flush(outbox, keep=0)

    def _learn_boundary(self, entry, log):
        """Train this worker's last synthesizer on the true gradient of batch t from worker r+1
        (the message is checked to be batch t's)."""
        t, step, g_hat, trigger, context, updates, message = entry
        grad = self.peers.wait(message)
        i = self.part.stop - 1
        synthesizer = self.net.synthesizers[i]
        if updates != self.boundary_updates:  # stepped since it made g_hat(t): ask it again
            with frozen_statistics(synthesizer):
                g_hat = synthesize(synthesizer, trigger, context)
        result = synthesizer_update(self.optimizers.synthesizers[i], g_hat, grad)
        self._record(log, i, t, result)
        self.boundary_updates += 1
        self._check_finite([(f"the gradient from worker {self.rank + 1}", f"worker {self.rank + 1} stops with the "
                             "cause", grad), (f"the synthesizer loss of stage {i + 1}", "lower --sg_lr", result[0])],
                           step)

    def _train_locked(self, source, steps, log):
        """Model-parallel backprop: nothing overlaps, every worker waits for the gradient."""
        net, opt = self.net, self.optimizers
        up, down = self.rank - 1, self.rank + 1
        outbox = deque()
        for t, (x, y) in zip(range(steps), source):
            step, checks = self.step + 1, []
            if self.first:
                a = x
            else:
                a = self.peers.wait(self.peers.recv(self.in_shape, up, "activation", step))
                checks.append(self._received(a))
                a.requires_grad_()  # the received buffer is a leaf: its .grad goes back to worker r-1
            for i in self.part:
                opt.stages[i].zero_grad(set_to_none=True)
            h = a
            for i in self.part:
                h = net.stages[i](h)
                checks.append((f"the output of stage {i + 1}", "lower --lr", h.detach()))
            if self.last:
                loss = F.cross_entropy(h, y)
                checks.append((f"the loss of stage {self.part.stop} (the classifier)", "lower --lr", loss.detach()))
                self._check_finite(checks, step)
                loss.backward()
                log["loss"][t], log["correct"][t] = loss.detach(), (h.detach().argmax(1) == y).sum()
            else:
                self._check_finite(checks, step)
                self._send(outbox, h.detach(), down, "activation")
                grad = self.peers.wait(self.peers.recv(self.out_shape, down, "gradient", step))  # the lock
                h.backward(grad)
            if not self.first:
                self._send(outbox, a.grad, up, "gradient")
            for i in self.part:
                opt.stages[i].step()
            self._flush(outbox, keep=2)
            self._step_schedules()
        self._flush(outbox, keep=0)


class _Assembled:
    """The whole net's or optimizers' state, put together on rank 0 from every worker's share, in
    the shape `save_checkpoint` writes for a sequential run (it calls `state_dict()`)."""

    def __init__(self, state):
        self.state = state

    def state_dict(self):
        return self.state


def assemble(net, states):
    """Rank 0: every worker's `local_state` -> (net, optimizers) for `save_checkpoint`, the same dicts
    a sequential run's DNINet and dnilab.parts.Optimizers give. Only the CPU copies are held, for the write."""
    owned = {key: value for state in states for key, value in state["net"].items()}
    num_stages, num_synths = len(net.stages), len(net.synthesizers or [])

    def pick(kind, count):
        return [next(state[kind][i] for state in states if i in state[kind]) for i in range(count)]

    def schedule(kind, i):
        return next(state["schedules"][(kind, i)] for state in states if (kind, i) in state["schedules"])
    optimizers = {"stages": pick("stages", num_stages), "synthesizers": pick("synthesizers", num_synths),
                  "inputs": [], "schedules": [schedule("stages", i) for i in range(num_stages)]
                  + [schedule("synthesizers", i) for i in range(num_synths)]}
    return _Assembled({key: owned[key] for key in net.state_dict()}), _Assembled(optimizers)


def release_others_of(net, part):
    """Free the stages and synthesizers of `net` outside `part` (stage indices): they move to the
    meta device, keeping their shapes and names but no storage."""
    for kind in ("stages", "synthesizers"):
        for i, module in enumerate(getattr(net, kind) or []):
            if i not in part:
                module.to("meta")


def share_of_data(data, *, rank, world, conditioned):
    """The part of `data` worker `rank` of `world` reads: the images (worker 0) and the labels (the
    last worker, and every worker when the synthesizers are `conditioned`). The rest become
    placeholders of their shape, which hold no data but keep the batch order (every worker draws
    it for itself) and the shapes."""
    images, labels = rank == 0, rank == world - 1 or conditioned

    def keep(tensor, wanted):
        return tensor if wanted else placeholder(tensor.shape, tensor.dtype, tensor.device)
    return Data(train_x=keep(data.train_x, images), train_y=keep(data.train_y, labels),
                test_x=keep(data.test_x, images), test_y=keep(data.test_y, labels), num_classes=data.num_classes,
                val_x=keep(data.val_x, images), val_y=keep(data.val_y, labels))


def held_by(net, optimizers, data):
    """Bytes of parameters (and buffers) of `net`, of the state of `optimizers` and of `data` that a
    process holds; each storage counted once, released (meta) modules and placeholders not at all."""
    state = [v for o in optimizers for per_param in o.state.values() for v in per_param.values() if torch.is_tensor(v)]
    return {"parameters": held_bytes([*net.parameters(), *net.buffers()]), "optimizer": held_bytes(state),
            "data": held_bytes([data.train_x, data.train_y, data.val_x, data.val_y, data.test_x, data.test_y])}


def _to_cpu(obj):
    if torch.is_tensor(obj):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


# ---------------------------------------------------------------- the run

def config_digest(settings):
    """A short hash of a settings dict, the same on every host."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def check_same_settings(config, rank, world, timeout_s):
    """All-gather every worker's settings and git commit; refuse to start, on every worker, if any differ."""
    mine = config.to_dict()
    gathered = [None] * world
    with collective(rank, "comparing settings", timeout_s):
        dist.all_gather_object(gathered, (config_digest(mine), mine, git_commit()))
    for other, (digest, settings, commit) in enumerate(gathered):
        if None not in (commit, gathered[0][2]) and commit != gathered[0][2]:  # hosts on other checkouts
            raise DNIError(f"worker {rank}: workers run different code (worker {other} at commit {commit[:12]}, "
                           f"worker 0 at {gathered[0][2][:12]}); check out the same commit on every host")
        if digest != gathered[0][0]:
            fields = sorted(k for k in set(settings) | set(gathered[0][1])
                            if settings.get(k) != gathered[0][1].get(k))
            raise DNIError(f"worker {rank}: workers were started with different settings (worker {other} differs "
                           f"from worker 0 in {', '.join('--' + f for f in fields)}); "
                           f"launch every worker with the same flags")


# How long the other workers wait for rank 0 to finish an epoch (logs, evaluation, checkpoint):
# evaluation is not training, and a slow one must not stop a healthy run, so no --worker_timeout
# here. A worker that dies meanwhile is still seen at once: its connection closes.
EVALUATION_TIMEOUT = timedelta(days=7)


def agree(rank, timeout_s, what, fn, group=None):
    """Rank 0 runs fn(); its DNIError, if any, stops every worker with the same line. The others
    wait for it as long as `group`'s timeout says (the default group's: --worker_timeout)."""
    message, result = None, None
    if rank == 0:
        try:
            result = fn()
        except DNIError as e:
            message = str(e)
    box = [message]
    with collective(rank, what, timeout_s):
        dist.broadcast_object_list(box, src=0, group=group)
    if box[0] is not None:
        raise DNIError(box[0] if rank == 0 else f"worker {rank}: stopped because worker 0 did: {box[0]}")
    return result


def init_workers(device, timeout_s):
    """Join the process group torchrun set up (env://): gloo on CPU, NCCL on CUDA.

    Returns (rank, world size, device of this worker)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise DNIError("--pipeline True runs one worker per process: launch it with "
                       "`torchrun --nproc_per_node K main.py ... --pipeline True`")
    rank = int(os.environ["RANK"])
    if device.type == "cuda":
        local_rank, local_world = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        if torch.cuda.device_count() < local_world:
            raise DNIError(f"worker {rank}: {local_world} workers on this host but {torch.cuda.device_count()} "
                           "GPU(s); NCCL needs one GPU per worker: use --device cpu or fewer workers per host")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    except (RuntimeError, ValueError) as e:
        raise DNIError(f"worker {rank}: cannot join the other workers: {_reason(e)}") from None
    return rank, dist.get_world_size(), device


def _stop_on_sigterm(rank):
    """torchrun stops the other workers with SIGTERM when one fails: say so in one line."""
    def handler(signum, frame):
        raise DNIError(f"worker {rank}: stopped by the launcher (SIGTERM), as another worker failed; "
                       "its log says why")
    signal.signal(signal.SIGTERM, handler)


def run_pipeline(config):
    """Train as `config` says, this process being one of the workers torchrun started.

    Rank 0 writes the run folder and returns the summary dict; the other workers return None.
    Once the workers are joined, a DNIError ends this process: one line on stderr, exit code 2."""
    if config.method not in ("dni", "backprop"):
        raise DNIError(f"--pipeline True trains --method dni or backprop, not {config.method}")
    if config.resume:
        raise DNIError("--resume is not available with --pipeline True (its checkpoints hold no resume state); "
                       "start the run again with --overwrite True")
    device = pick_device(config.device)
    rank, world, device = init_workers(device, config.worker_timeout)
    _stop_on_sigterm(rank)
    try:
        summary = _train(config, rank, world, device)
    except DNIError as e:
        # One line, then out at once (files are closed by now): destroying the process group
        # could wait on a peer that is gone, and leaving it to the interpreter's exit can abort
        # in the communication threads ("terminate called without an active exception").
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(2)
    except BaseException:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a bug's traceback follows: a later SIGTERM just ends us
        raise
    dist.destroy_process_group()
    return summary


def _train(config, rank, world, device):
    timeout_s = config.worker_timeout
    check_same_settings(config, rank, world, timeout_s)
    set_seed(config.seed)  # the same seed everywhere: the same initial net on every worker
    first = rank == 0
    # Only worker 0 reads the images: the others load the labels and the images' shapes.
    data = load_run_data(config, device, load=lambda *where: load_data(*where, images=first))
    in_shape = data.in_shape
    net = build_net(config, in_shape, data.num_classes).to(device)
    costs = stage_costs(net, in_shape)
    parts = (parse_partition(config.partition, len(net.stages), world) if config.partition
             else balanced_partition(costs, world))
    steps_per_epoch = num_batches(len(data.train_x), config.batch_size)
    if steps_per_epoch == 0:
        raise DNIError(f"--batch_size {config.batch_size} is larger than the training set ({len(data.train_x)})")
    # Each worker keeps its share: its stages, synthesizers and optimizer states, and the data it reads.
    data = share_of_data(data, rank=rank, world=world, conditioned=config.conditioned and config.method == "dni")
    optimizers = Optimizers(net, config, config.num_epochs * steps_per_epoch, owned=parts[rank])
    worker = PipelineWorker(net=net, optimizers=optimizers, parts=parts, rank=rank, method=config.method,
                            in_shape=in_shape, batch_size=config.batch_size,
                            max_in_flight=config.max_in_flight, timeout_s=timeout_s, device=device,
                            release_others=True)
    order = torch.Generator().manual_seed(config.seed)
    backend = dist.get_backend()

    def start_run_dir():
        run_dir = prepare_run_dir(config)
        record_environment(run_dir, config, device)
        return run_dir

    run_dir = agree(rank, timeout_s, "preparing the run folder", start_run_dir)
    unbounded = dist.new_group(timeout=EVALUATION_TIMEOUT)  # for rank 0's evaluation: see agree
    if rank == 0:
        print(f"{config.name}: {sum(p.numel() for p in net.stages.parameters()):,} stage parameters, "
              f"{len(net.stages)} stages on {world} workers ({describe_partition(parts, costs)}), "
              f"{config.num_epochs} epochs on {device} ({backend}) -> {run_dir}", flush=True)

    seconds, accs, held, num_synths = 0.0, {}, None, len(net.stages) - 1
    with (open(run_dir / "metrics.jsonl", "a") if rank == 0 else contextlib.nullcontext()) as metrics:
        for epoch in range(1, config.num_epochs + 1):
            net.train()
            # Only worker 0 needs the images: the others draw the same permutation over the labels.
            source = batches(data.train_x if rank == 0 else data.train_y, data.train_y, config.batch_size, order)
            if rank == 0:
                source = tqdm(source, total=steps_per_epoch, desc=f"epoch {epoch}", leave=False, disable=None,
                              mininterval=1.0)
            first_step = worker.step
            log = worker.train_epoch(source, steps_per_epoch)
            log["accs"] = {}  # set on the last worker, which sees the labels
            if len(data.val_y):
                log["accs"]["val_acc"] = worker.evaluate(data.val_x, data.val_y, len(data.val_y))
            log["accs"]["test_acc"] = worker.evaluate(data.test_x, data.test_y, len(data.test_y))
            log["held_bytes"] = worker.held_bytes(data)
            logs = [None] * world if rank == 0 else None
            # Unbounded: the last worker ends its evaluation after worker 0 (see EVALUATION_TIMEOUT).
            with collective(rank, f"gathering statistics of epoch {epoch}", timeout_s):
                dist.gather_object(log, logs, dst=0, group=unbounded)
                states = [None] * world if rank == 0 else None
                dist.gather_object(worker.local_state(), states, dst=0, group=unbounded)

            def finish_epoch():
                nonlocal seconds, accs, held
                seconds += max(entry["seconds"] for entry in logs)  # training only: no evaluation
                last = logs[-1]
                sg_loss = {i: v for entry in logs for i, v in entry["sg_loss"].items()}
                sg_cos = {i: v for entry in logs for i, v in entry["sg_cos"].items()}
                total_loss = total_sg = 0.0
                for t in range(steps_per_epoch):
                    stats = {"kind": "step", "epoch": epoch, "step": first_step + t + 1, "loss": last["loss"][t]}
                    if num_synths and config.method == "dni":
                        stats["sg_loss"] = [sg_loss[i][t] for i in range(num_synths)]
                        stats["sg_cos"] = [sg_cos[i][t] for i in range(num_synths)]
                    check_finite(stats, stats["step"])
                    metrics.write(json.dumps(stats) + "\n")
                    total_loss += stats["loss"]
                    total_sg += sum(stats.get("sg_loss", [0.0])) / len(stats.get("sg_loss", [0.0]))
                accs, held = logs[-1]["accs"], [entry["held_bytes"] for entry in logs]
                line = {"kind": "epoch", "epoch": epoch, "step": worker.step,
                        "train_loss": total_loss / steps_per_epoch, "sg_loss": total_sg / steps_per_epoch,
                        **accs, "seconds": seconds}
                metrics.write(json.dumps(line) + "\n")
                metrics.flush()
                print(f"epoch {epoch} step {worker.step} loss {line['train_loss']:.4f} sg_loss {line['sg_loss']:.1e} "
                      + "".join(f"{k} {v:.4f} " for k, v in accs.items()) + f"{seconds:.1f}s", flush=True)
                save_checkpoint(run_dir / "checkpoint.pt", *assemble(net, states), config, epoch, worker.step)

            agree(rank, timeout_s, f"finishing epoch {epoch}", finish_epoch, group=unbounded)

    if rank != 0:
        return None
    summary = {"val_acc": accs.get("val_acc"), "test_acc": accs["test_acc"], "val_size": config.val_size,
               "epochs": config.num_epochs, "steps": worker.step,
               "seconds": round(seconds, 2), "method": config.method, "model_type": config.model_type,
               "conditioned": config.conditioned, "dataset": config.dataset, "seed": config.seed,
               "device": str(device),
               "pipeline": {"workers": world, "backend": backend, "max_in_flight": config.max_in_flight,
                            "partition": [[p.start, p.stop] for p in parts],
                            "stage_macs": costs, "held_bytes": held}}
    write_json(run_dir / "summary.json", summary)
    if config.plot:
        from dnilab.plots import plot_run
        plot_run(run_dir)
    return summary
