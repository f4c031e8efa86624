"""Pipelined DNI: every group of stages trains in its own worker process (paper, section 2:
update unlocking).

    torchrun --nproc_per_node 2 main.py --model_type mlp --pipeline True                     # DNI
    torchrun --nproc_per_node 2 main.py --model_type mlp --pipeline True --method backprop   # locked
    torchrun --nproc_per_node 2 main.py --model_type mlp --pipeline True --method local      # local losses

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

The pipeline is four modules: dnilab.partition (who trains which stages), dnilab.transport
(messages between workers), dnilab.worker (`PipelineWorker`, one worker's loop, and its share of
the net and data) and this one: joining the workers, and `Pipelined`, the step function that
the one training loop (`dnilab.train.loop`) runs in place of the sequential one.

A worker goes on to batch t+1 without waiting for worker r+1: that is update unlocking.
At most `max_in_flight` batches wait for their true gradient; after that the worker blocks
on the oldest one, so memory stays flat. With max_in_flight=1 the maths is exactly
sequential `dni_step` (tests/test_pipeline.py checks the parameters).

When the true gradient of batch t arrives, M_{e-1} may have been stepped since it made
g_hat(t). Then it is asked again, on the kept trigger and context (BatchNorm statistics
frozen, so they still move once per batch), and trained on that fresh prediction: the
synthesizer's update (paper, section 2) is the gradient of its loss at its current
parameters, which the old g_hat(t), made by earlier ones, is not (docs/pipeline.md).

Local losses (`--method local`, dni.local) run on the same workers and partition with no
backward message at all: each stage learns from its own auxiliary head (the last from the real
loss), so a worker forwards, updates and sends its activation on; every worker reads the labels.
With no gradient to wait for, the maths is sequential `local_step`'s whatever --max_in_flight.

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
  step. Every wait on another worker while training has a deadline (--worker_timeout, also the
  process group's timeout; evaluation's waits have none: EVALUATION_TIMEOUT); a dead peer is
  seen at once by its closed connection. Either way the
  worker stops with one line, `error: worker 0: ...`, and exit code 2 (at once, by os._exit:
  see `worker_process`); files already written stay as they were. Workers started with
  different settings refuse to start.
"""
import contextlib
import hashlib
import json
import os
import signal
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from dni.errors import DNIError
from dnilab.data import batches, load_data, num_batches
from dnilab.parts import Optimizers, build_net, load_run_data, pick_device, set_seed
from dnilab.partition import balanced_partition, describe_partition, parse_partition, stage_costs
from dnilab.runs import announce, check_batches, git_commit, prepare_run_dir, record_environment, step_record
from dnilab.transport import NO_DEADLINE, _reason, collective
from dnilab.worker import PipelineWorker, assemble, share_of_data


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
# here, nor in the evaluation's own messages (Peers.without_deadline). A worker that dies
# meanwhile is still seen at once: its connection closes.
EVALUATION_TIMEOUT = NO_DEADLINE


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


@contextlib.contextmanager
def worker_process(config):
    """Join the workers torchrun started; yields (rank, world size, device of this worker).

    Once the workers are joined, a DNIError ends this process: one line on stderr, exit code 2."""
    if config.method not in ("dni", "backprop", "local"):
        raise DNIError(f"--pipeline True trains --method dni, local or backprop, not {config.method}")
    if config.resume:
        raise DNIError("--resume is not available with --pipeline True (its checkpoints hold no resume state); "
                       "start the run again with --overwrite True")
    device = pick_device(config.device)
    rank, world, device = init_workers(device, config.worker_timeout)
    _stop_on_sigterm(rank)
    try:
        yield rank, world, device
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


def start_workers_run_dir(config, rank, device):
    """Rank 0 claims the run folder while the others wait (`agree`); returns it and the process
    group of rank 0's end-of-epoch work, which has no deadline (see EVALUATION_TIMEOUT)."""
    def start():
        run_dir = prepare_run_dir(config)
        record_environment(run_dir, config, device)
        return run_dir

    run_dir = agree(rank, config.worker_timeout, "preparing the run folder", start)
    return run_dir, dist.new_group(timeout=EVALUATION_TIMEOUT)


class Pipelined:
    """The pipelined step function: this worker trains its share of the stages over a whole epoch,
    feeding and fed by the other workers (`PipelineWorker`), then rank 0 gathers what every
    worker measured. The same methods as `dnilab.train.Sequential`, run by the same
    `dnilab.train.loop`; only rank 0 writes the run folder."""

    resumable = False  # a checkpoint holds no resume state (--resume refuses a pipelined run)

    def __init__(self, config, *, rank, world, device, build=build_net):
        self.config, self.rank, self.world, self.device = config, rank, world, device
        self.lead, timeout_s = rank == 0, config.worker_timeout
        check_same_settings(config, rank, world, timeout_s)
        set_seed(config.seed)  # the same seed everywhere: the same initial net on every worker
        # Only worker 0 reads the images: the others load the labels and the images' shapes.
        data = load_run_data(config, device, load=lambda *where: load_data(*where, images=self.lead))
        self.net = net = build(config, data.in_shape, data.num_classes).to(device)
        self.costs = stage_costs(net, data.in_shape)
        self.parts = (parse_partition(config.partition, len(net.stages), world) if config.partition
                      else balanced_partition(self.costs, world))
        self.steps_per_epoch = num_batches(len(data.train_x), config.batch_size)
        check_batches(self.steps_per_epoch, config, len(data.train_x))
        # Each worker keeps its share: its stages, synthesizers and optimizer states, and the data it reads.
        self.data = share_of_data(data, rank=rank, world=world,
                                  conditioned=config.conditioned and config.method == "dni",
                                  local=config.method == "local")
        self.optimizers = Optimizers(net, config, config.num_epochs * self.steps_per_epoch, owned=self.parts[rank])
        self.worker = PipelineWorker(net=net, optimizers=self.optimizers, parts=self.parts, rank=rank,
                                     method=config.method, in_shape=data.in_shape, batch_size=config.batch_size,
                                     max_in_flight=config.max_in_flight, timeout_s=timeout_s, device=device,
                                     release_others=True)
        self.backend = dist.get_backend()
        self.unbounded = None  # for rank 0's end of an epoch: see EVALUATION_TIMEOUT
        self.logs = self.states = None  # rank 0's: every worker's measurements and state of the last epoch

    def start_run_dir(self):
        run_dir, self.unbounded = start_workers_run_dir(self.config, self.rank, self.device)
        return run_dir

    def announce(self, run_dir):
        announce(self.config, self.net, self.device, run_dir,
                 workers=f" on {self.world} workers ({describe_partition(self.parts, self.costs)})",
                 backend=f" ({self.backend})")

    def batches(self, order):
        # Only worker 0 needs the images: the others draw the same permutation over the labels.
        data = self.data
        return batches(data.train_x if self.lead else data.train_y, data.train_y, self.config.batch_size, order)

    def train_epoch(self, epoch, source, step):
        """Train this worker's stages on every batch of `source`, evaluate the net together and
        gather every worker's measurements and state on rank 0. Returns the epoch's step records
        on rank 0 (none elsewhere)."""
        data, worker, world = self.data, self.worker, self.world
        log = worker.train_epoch(source, self.steps_per_epoch)
        log["accs"] = {}  # set on the last worker, which sees the labels
        if len(data.val_y):
            log["accs"]["val_acc"] = worker.evaluate(data.val_x, data.val_y, len(data.val_y))
        log["accs"]["test_acc"] = worker.evaluate(data.test_x, data.test_y, len(data.test_y))
        log["held_bytes"] = worker.held_bytes(data)
        self.logs = [None] * world if self.lead else None
        self.states = [None] * world if self.lead else None
        # Unbounded: the last worker ends its evaluation after worker 0 (see EVALUATION_TIMEOUT).
        with collective(self.rank, f"gathering statistics of epoch {epoch}", self.config.worker_timeout):
            dist.gather_object(log, self.logs, dst=0, group=self.unbounded)
            dist.gather_object(worker.local_state(), self.states, dst=0, group=self.unbounded)
        return self._records(epoch, step) if self.lead else ()

    def _records(self, epoch, first_step):
        logs, num_synths = self.logs, len(self.net.stages) - 1
        last = logs[-1]
        sg_loss = {i: v for entry in logs for i, v in entry["sg_loss"].items()}
        sg_cos = {i: v for entry in logs for i, v in entry["sg_cos"].items()}
        aux_loss = {i: v for entry in logs for i, v in entry["aux_loss"].items()}
        synthesized = num_synths and self.config.method == "dni"
        for t in range(self.steps_per_epoch):
            yield step_record(epoch, first_step + t + 1, last["loss"][t],
                              [sg_loss[i][t] for i in range(num_synths)] if synthesized else None,
                              [sg_cos[i][t] for i in range(num_synths)] if synthesized else None,
                              [aux_loss[i][t] for i in sorted(aux_loss)])

    def epoch_seconds(self, start):
        return max(entry["seconds"] for entry in self.logs)  # the slowest worker's training; no evaluation

    def accuracies(self):
        return self.logs[-1]["accs"]

    def together(self, what, fn):
        """Rank 0 runs fn(); the others wait for it, unbounded, and stop on its DNIError (`agree`)."""
        return agree(self.rank, self.config.worker_timeout, what, fn, group=self.unbounded)

    def checkpointed(self):
        return assemble(self.net, self.states)

    def summary_extra(self):
        return {"pipeline": {"workers": self.world, "backend": self.backend, "max_in_flight": self.config.max_in_flight,
                             "partition": [[p.start, p.stop] for p in self.parts],
                             "stage_macs": self.costs, "held_bytes": [entry["held_bytes"] for entry in self.logs]}}
