"""One pipeline worker (dnilab.pipeline): the stages it owns and their synthesizers (or, under
local losses, their auxiliary heads), trained batch after batch without waiting for the workers
above (update unlocking, paper section 2); its share of the net, optimizers and data; rank 0's
assembly of every worker's state."""
import time
from collections import deque

import torch
import torch.nn.functional as F

from dni.errors import DNIError
from dni.interface import synthesize
from dni.local import local_update
from dni.stages import loss_update, stage_update, synthesizer_update
from dni.unlock import frozen_statistics
from dnilab.data import Data, held_bytes, placeholder
from dnilab.models import stage_shapes
from dnilab.parts import step_schedules
from dnilab.transport import Peers


class PipelineWorker:
    """The stages `part` of `net` (and their synthesizers), trained in this process.

    `net` is the whole DNINet, built from the same seed on every worker; only the stages in
    `part` are trained here, and with `release_others` only they (and their synthesizers) keep
    their storage. `optimizers` is a dnilab.parts.Optimizers of the net (at least of `part`).
    `train_epoch` runs DNI (method 'dni'), local losses ('local': stage i's head goes with it, and
    only activations travel) or locked model-parallel backprop ('backprop').
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
        self.heads = [i for i in self.part if i < len(optimizers.heads)]  # local losses (dni.local)
        first_head = self.num_stages + len(optimizers.synthesizers) + len(optimizers.inputs)
        self.schedules.update({("heads", i): optimizers.schedules[first_head + i] for i in self.heads})
        self.step = 0  # batches trained so far, over all epochs
        self.boundary_updates = 0  # steps of this worker's last synthesizer so far
        if release_others:
            release_others_of(net, self.part)

    def owns(self, key):
        """Whether a state_dict key of the net (stages.3.0.weight, synthesizers.2.net.0.bias) is trained here."""
        kind, index = key.split(".")[:2]
        return kind in ("stages", "synthesizers", "heads") and int(index) in self.part

    def local_state(self):
        """This worker's share of the net and of the optimizers, on the CPU, for rank 0 to assemble."""
        return {"net": {k: v.cpu() for k, v in self.net.state_dict().items() if self.owns(k)},
                "stages": {i: _to_cpu(self.optimizers.stages[i].state_dict()) for i in self.part},
                "synthesizers": {i: _to_cpu(self.optimizers.synthesizers[i].state_dict()) for i in self.synths},
                "heads": {i: _to_cpu(self.optimizers.heads[i].state_dict()) for i in self.heads},
                "schedules": {key: s.state_dict() for key, s in self.schedules.items()}}

    def held_bytes(self, data):
        """`held_by` this worker: its share of the net and optimizer states, and `data`."""
        opt = self.optimizers
        optimizers = [opt.stages[i] for i in self.part] + [opt.synthesizers[i] for i in self.synths] \
            + [opt.heads[i] for i in self.heads]
        return held_by(self.net, optimizers, data)

    @torch.no_grad()
    def evaluate(self, x, y, n, batch_size=1000):
        """Accuracy of the net on n examples, forward through the workers in eval mode, as
        `dnilab.parts.evaluate` does in one process: worker 0 reads the images `x`, the last worker
        the labels `y`. Returns the fraction on the last worker, None on the others."""
        stages = [self.net.stages[i] for i in self.part]
        modes = [stage.training for stage in stages]
        correct, outbox = torch.zeros((), dtype=torch.long), deque()
        with self.peers.without_deadline():  # see Peers.without_deadline
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
        "loss", "correct" (last worker), "sg_loss", "sg_cos" ({synthesizer index: per step}),
        "aux_loss" ({head index: per step})}, as Python numbers."""
        log = {"seconds": 0.0, "loss": [None] * steps, "correct": [None] * steps, "sg_loss": {}, "sg_cos": {},
               "aux_loss": {}}
        start, waited = time.perf_counter(), self.peers.waited_s
        if self.method == "dni":
            self._train_dni(source, steps, log)
        elif self.method == "local":
            self._train_local(source, steps, log)
        else:
            self._train_locked(source, steps, log)
        if self.peers.device.type == "cuda":
            torch.cuda.synchronize()
        log["seconds"] = time.perf_counter() - start
        log["waited_s"] = self.peers.waited_s - waited
        for key in ("loss", "correct"):
            log[key] = torch.stack(log[key]).tolist() if self.last else None
        for key in ("sg_loss", "sg_cos", "aux_loss"):
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

    def _inputs(self, source, steps):
        """(t, step, h, y, checks) for each of `steps` batches of `source`: h is the images (worker 0)
        or the activation from worker r-1, received up to k = max_in_flight batches ahead; checks
        holds the check of a received one. The caller steps `self.step` between two batches."""
        k, inbox = self.max_in_flight, deque()  # Messages: h_{s-1} of the coming batches, received ahead
        if not self.first:
            for t in range(min(k, steps)):
                inbox.append(self.peers.recv(self.in_shape, self.rank - 1, "activation", self.step + t + 1))
        for t, (x, y) in zip(range(steps), source):
            step, checks = self.step + 1, []
            if self.first:
                h = x
            else:
                h = self.peers.wait(inbox.popleft())
                checks.append(self._received(h))
                if t + k < steps:
                    inbox.append(self.peers.recv(self.in_shape, self.rank - 1, "activation", step + k))
            yield t, step, h, y, checks

    def _train_dni(self, source, steps, log):
        net, opt, k = self.net, self.optimizers, self.max_in_flight
        s, e, last_stage = self.part.start, self.part.stop, self.num_stages - 1
        up, down = self.rank - 1, self.rank + 1
        waiting = deque()  # (t, step, g_hat, trigger, context, updates, Message): awaiting the true gradient
        outbox = deque()  # Messages: sends under way
        for t, step, h, y, checks in self._inputs(source, steps):
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

    def _train_local(self, source, steps, log):
        """Local losses (dni.local): each stage but the net's last learns from its own head, the last
        from the real loss, on each batch as it arrives. No gradient travels between workers, so a
        worker waits for nothing but its input; `local_step`'s updates, stage by stage."""
        net, opt, last_stage, outbox = self.net, self.optimizers, self.num_stages - 1, deque()
        for t, step, h, y, checks in self._inputs(source, steps):
            for i in self.part:
                if i < last_stage:
                    h, aux_loss = local_update(net.stages[i], opt.stages[i], net.heads[i], opt.heads[i], h, y)
                    log["aux_loss"].setdefault(i, [None] * steps)[t] = aux_loss
                    checks += [(f"the output of stage {i + 1}", "lower --lr", h),
                               (f"the auxiliary loss of stage {i + 1}", "lower --lr", aux_loss)]
                else:
                    logits, loss, _ = loss_update(net.stages[i], opt.stages[i], h, y, needs_input_grad=False)
                    log["loss"][t], log["correct"][t] = loss, (logits.argmax(1) == y).sum()
                    checks.append((f"the loss of stage {i + 1} (the classifier)", "lower --lr", loss))
            self._check_finite(checks, step)
            if not self.last:
                self._send(outbox, h, self.rank + 1, "activation")
            self._flush(outbox, keep=2 * self.max_in_flight)
            self._step_schedules()
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
    num_stages, num_synths, num_heads = len(net.stages), len(net.synthesizers or []), len(net.heads or [])

    def pick(kind, count):
        return [next(state[kind][i] for state in states if i in state[kind]) for i in range(count)]

    def schedule(kind, i):
        return next(state["schedules"][(kind, i)] for state in states if (kind, i) in state["schedules"])
    heads = {"heads": pick("heads", num_heads)} if num_heads else {}  # as Optimizers.state_dict
    optimizers = {"stages": pick("stages", num_stages), "synthesizers": pick("synthesizers", num_synths),
                  "inputs": [], **heads, "schedules": [schedule("stages", i) for i in range(num_stages)]
                  + [schedule("synthesizers", i) for i in range(num_synths)]
                  + [schedule("heads", i) for i in range(num_heads)]}
    return _Assembled({key: owned[key] for key in net.state_dict()}), _Assembled(optimizers)


def release_others_of(net, part):
    """Free the stages, synthesizers and heads of `net` outside `part` (stage indices): they move to
    the meta device, keeping their shapes and names but no storage."""
    for kind in ("stages", "synthesizers", "heads"):
        for i, module in enumerate(getattr(net, kind) or []):
            if i not in part:
                module.to("meta")


def share_of_data(data, *, rank, world, conditioned, local=False):
    """The part of `data` worker `rank` of `world` reads: the images (worker 0) and the labels (the
    last worker, and every worker when the synthesizers are `conditioned` or each stage has a
    `local` auxiliary loss). The rest become
    placeholders of their shape, which hold no data but keep the batch order (every worker draws
    it for itself) and the shapes."""
    images, labels = rank == 0, rank == world - 1 or conditioned or local

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
