"""How pipeline workers (dnilab.pipeline) talk: activations and gradients as tagged
point-to-point messages over torch.distributed, each checked on receipt against the step of its
batch; collectives with a deadline and one-line errors."""
import contextlib
import math
import re
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from dni.errors import DNIError


def _reason(error):
    """The first sentence of a torch.distributed error, without gloo's source location."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)  # "[.../pair.cc:561] Connection closed..."
    return text.split(". ")[0].rstrip(".")


# Every message carries the step of the batch it belongs to as one extra element, checked on
# receipt; a float32 counts integers exactly up to 2**24, so the tag is the step modulo that.
TAG_MODULUS = 2 ** 24
NO_DEADLINE = timedelta(days=7)  # "no deadline" for waits that torch.distributed must bound


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

    @contextlib.contextmanager
    def without_deadline(self):
        """Waits inside have no deadline: evaluation is not training, and a slow one (a loaded
        machine, a large split) must not stop a healthy run. A dead peer is still seen at once, by
        its closed connection."""
        timeout, self.timeout = self.timeout, NO_DEADLINE
        try:
            yield
        finally:
            self.timeout = timeout

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
