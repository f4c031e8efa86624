"""The pipeline's messages (dnilab/pipeline.py) under a transport that delays and reorders them.

K pipeline workers run as threads of one process and talk through `Transport`, which
delivers every message after a random delay and matches a receive to the message of its step
(the point-to-point tag). Random delays may or may not reorder messages, so the reordering a
test relies on is forced: a seeded schedule holds chosen messages back until the next one on
their channel is posted, then delivers the two in swapped order.
Every message carries its step; the worker checks it on receipt. What is checked:
- with 1, 2 and 4 batches in flight, every synthesizer on a worker boundary learns once from
  each batch, from the gradient sent for that batch;
- delays and reordering change nothing: the parameters equal those of instant, in-order
  delivery, and with 1 batch in flight those of sequential DNI (`dni_step`), bit for bit;
- a transport that hands over another batch's message is caught: one line naming the step;
- a non-finite value stops the worker where it appears, naming the worker, stage and step.
- a late peer stops training at the deadline, never evaluation, which has none.
"""
import copy
import random
import threading
import time

import pytest
import torch

from dnilab.config import Config
from dni.errors import DNIError
from dni.stages import dni_step
from dnilab.parts import Optimizers, build_net, step_schedules
from dnilab.transport import Peers
from dnilab.worker import PipelineWorker

IN_SHAPE, BATCH, STEPS = (1, 8, 8), 16, 12
# 4 stages on 3 workers: two boundaries between workers and one inside worker 1.
PARTS = [range(0, 1), range(1, 3), range(3, 4)]
CONFIG = Config(model_type="mlp", depth=3, hidden=24, conditioned=True, synth_layers=1, synth_width=16,
                sg_lr=1e-2, lr=1e-2, batch_size=BATCH)


class Work:
    """A torch.distributed-like handle. `ready()` says whether the message is there; like gloo on
    CPU, `is_completed` reports nothing until waited on unless `eager` (as NCCL would)."""

    def __init__(self, ready, eager):
        self.ready, self.eager = ready, eager

    def is_completed(self):
        return self.eager and self.ready()

    def wait(self, timeout):
        deadline = time.monotonic() + timeout.total_seconds()
        while not self.ready():
            if time.monotonic() > deadline:
                raise RuntimeError("timed out")
            time.sleep(1e-4)


class Transport:
    """Mailboxes keyed by (sender, receiver, step), each message delivered after a random delay."""

    def __init__(self, *, max_delay_s=0.0, eager=False, swap=None, hold=(), seed=0, timeout_s=30.0):
        self.box, self.lock, self.rng = {}, threading.Lock(), random.Random(seed)
        self.hold, self.held = set(hold), {}  # (sender, receiver, step) delivered after step + 1
        self.timeout_s = timeout_s  # the workers' deadline on every wait
        self.max_delay_s, self.eager = max_delay_s, eager
        self.swap = swap  # step: the gradients of this step and the next are delivered as each other's
        self.delivered = []  # (sender, receiver, step), in arrival order

    def post(self, src, dst, step, payload):
        if self.swap is not None and src > dst and step in (self.swap, self.swap + 1):  # a gradient
            step = self.swap + 1 if step == self.swap else self.swap

        def deliver(key=(src, dst, step), payload=payload.clone()):
            with self.lock:
                self.box[key] = payload
                self.delivered.append(key)
        with self.lock:
            if (src, dst, step) in self.hold:  # wait for the next message of this channel
                self.held[(src, dst, step)] = deliver
                return
            earlier = self.held.pop((src, dst, step - 1), None)
            delay = self.rng.uniform(0, self.max_delay_s)
        if earlier:  # the forced swap: this message first, then the one held back for it
            deliver()
            earlier()
            return
        threading.Timer(delay, deliver).start() if delay else deliver()

    def peers(self, rank):
        return FakePeers(rank, self)


class FakePeers(Peers):
    """`Peers` over the transport above instead of torch.distributed: the tagging, the waiting
    with its deadline and the check on receipt are Peers' own."""

    def __init__(self, rank, transport):
        super().__init__(rank, timeout_s=transport.timeout_s, device="cpu")
        self.transport = transport

    def start_send(self, payload, peer, step):
        self.transport.post(self.rank, peer, step, payload)
        return Work(lambda: True, eager=True)

    def start_recv(self, payload, peer, step):
        key, box = (peer, self.rank, step), self.transport.box
        work = Work(lambda: key in box, self.transport.eager)
        wait = work.wait

        def wait_and_copy(timeout):  # the delivered message lands in the posted buffer
            wait(timeout)
            payload.copy_(box.pop(key))
        work.wait = wait_and_copy
        return work


def make_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(BATCH, *IN_SHAPE, generator=g), torch.randint(0, 10, (BATCH,), generator=g))
            for _ in range(STEPS)]


def fresh_net():
    torch.manual_seed(0)
    net = build_net(CONFIG, IN_SHAPE, 10)
    return net, Optimizers(net, CONFIG, STEPS)


def on_threads(work):
    """work(rank) for every worker, each on a thread of its own, until all are done."""
    threads = [threading.Thread(target=work, args=(r,)) for r in range(len(PARTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)


def run_pipeline(transport, k, data, method="dni"):
    """Train STEPS steps on len(PARTS) threads; returns (net state per worker, pairings, errors)."""
    torch.set_num_threads(1)
    template, _ = fresh_net()
    results, errors, pairs = {}, {}, []

    def work(rank):
        net = copy.deepcopy(template)
        optimizers = Optimizers(net, CONFIG, STEPS)
        worker = PipelineWorker(net=net, optimizers=optimizers, parts=PARTS, rank=rank, method=method,
                                in_shape=IN_SHAPE, batch_size=BATCH, max_in_flight=k,
                                peers=transport.peers(rank))
        learn = worker._learn_boundary

        def learn_and_record(entry, log):  # which batch's trigger meets which batch's gradient
            learn(entry, log)
            pairs.append((rank, entry[1], int(entry[-1].payload[-1])))
        worker._learn_boundary = learn_and_record
        try:
            worker.train_epoch(iter(data), STEPS)
            results[rank] = {key: value for key, value in net.state_dict().items() if worker.owns(key)}
        except DNIError as e:
            errors[rank] = str(e)

    on_threads(work)
    return results, sorted(pairs), errors


# Activations of worker 0 held back for the next one: with two or more batches in flight worker 0
# sends batch s + 1 before batch s reaches worker 1 (it waits only for batch s - 1's gradient).
HOLD = {(0, 1, 3), (0, 1, 8)}


@pytest.mark.parametrize("k", [1, 2, 4])
def test_every_synthesizer_learns_from_its_own_batch_under_delays_and_reordering(k):
    data = make_data()
    # With one batch in flight nothing can overtake (worker 0 waits for each batch's gradient).
    shaken = Transport(max_delay_s=0.03, seed=k, hold=HOLD if k > 1 else ())
    results, pairs, errors = run_pipeline(shaken, k, data)
    assert not errors, errors
    # Workers 0 and 1 each end on a boundary: one update per batch, trigger and target of the same step.
    assert pairs == [(rank, step, step) for rank in (0, 1) for step in range(1, STEPS + 1)]
    for src, dst, step in (HOLD if k > 1 else ()):  # the schedule did reorder: s + 1 arrived before s
        assert shaken.delivered.index((src, dst, step + 1)) < shaken.delivered.index((src, dst, step))
    in_order, _, errors = run_pipeline(Transport(), k, data)
    assert not errors, errors
    for rank in results:
        torch.testing.assert_close(results[rank], in_order[rank], rtol=0, atol=0)


def test_one_in_flight_under_reordering_is_exactly_sequential_dni():
    data = make_data()
    results, _, errors = run_pipeline(Transport(max_delay_s=0.03, seed=7), 1, data)
    assert not errors, errors
    torch.set_num_threads(1)
    net, optimizers = fresh_net()
    for x, y in data:
        dni_step(net, optimizers.stages, optimizers.synthesizers, x, y)
        step_schedules(optimizers.schedules)
    merged = {key: value for part in results.values() for key, value in part.items()}
    expected = {key: value for key, value in net.state_dict().items() if key in merged}
    assert len(merged) == len(expected) > 0
    torch.testing.assert_close(merged, expected, rtol=0, atol=0)


def test_eager_completion_still_pairs_every_batch():
    """With receives that report completion as soon as they arrive (NCCL's way), the boundary
    synthesizer learns in arrival order, but still each from its own batch."""
    _, pairs, errors = run_pipeline(Transport(max_delay_s=0.03, eager=True, seed=3), 4, make_data())
    assert not errors, errors
    assert pairs == [(rank, step, step) for rank in (0, 1) for step in range(1, STEPS + 1)]


def test_a_message_of_another_batch_is_refused():
    _, _, errors = run_pipeline(Transport(swap=5, timeout_s=3.0), 2, make_data())
    assert any("received as step 5 was sent for step 6" in e or "received as step 6 was sent for step 5" in e
               for e in errors.values()), errors
    assert all("\n" not in e for e in errors.values())


def test_a_non_finite_value_stops_the_worker_at_its_step():
    data = make_data()
    x, y = data[6]
    data[6] = (x * float("inf"), y)  # step 7's images overflow the first stage
    _, _, errors = run_pipeline(Transport(timeout_s=3.0), 2, data)
    assert errors[0].startswith("worker 0: the output of stage 1 is not finite at step 7; lower --lr"), errors


class Late(random.Random):
    """Every message takes the longest delay: past the deadline whenever max_delay_s > timeout_s."""

    def uniform(self, a, b):
        return b


def run_evaluation(transport, n=3 * BATCH):
    """Evaluate a fresh net on n examples across len(PARTS) threads; returns (accuracy, errors)."""
    torch.set_num_threads(1)
    template, _ = fresh_net()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, *IN_SHAPE, generator=g), torch.randint(0, 10, (n,), generator=g)
    accuracy, errors = [], {}

    def work(rank):
        net = copy.deepcopy(template)
        worker = PipelineWorker(net=net, optimizers=Optimizers(net, CONFIG, STEPS), parts=PARTS, rank=rank,
                                method="dni", in_shape=IN_SHAPE, batch_size=BATCH, max_in_flight=1,
                                peers=transport.peers(rank))
        try:
            accuracy.append(worker.evaluate(x, y, n, batch_size=BATCH))
        except DNIError as e:
            errors[rank] = str(e)

    on_threads(work)
    return [a for a in accuracy if a is not None], errors


def test_evaluation_has_no_deadline_where_training_has_one():
    """Every message arrives 0.1 s late against a 0.02 s --worker_timeout, as on a loaded machine:
    training stops with one line, while evaluation (Peers.without_deadline) gives the accuracy of
    instant delivery. A slow evaluation must not stop a healthy run."""
    def late():
        transport = Transport(max_delay_s=0.1, timeout_s=0.02)
        transport.rng = Late()
        return transport
    _, _, errors = run_pipeline(late(), 1, make_data())
    assert errors and all("stalled past --worker_timeout 0.02s" in e and "\n" not in e for e in errors.values())
    accuracy, errors = run_evaluation(late())
    assert not errors, errors
    assert accuracy == run_evaluation(Transport())[0] and len(accuracy) == 1
