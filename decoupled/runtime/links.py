"""Links: bounded point-to-point channels between stage processes over torch.distributed.

One link moves messages one way between two ranks. The sender's main loop hands a
message to a background thread (``send`` returns at once unless ``max_in_flight``
messages are already queued: that is what throttles a fast stage); the receiver's
background thread posts ``recv`` calls (gloo's ``irecv`` cannot be polled) and queues
what arrives, again at most ``max_in_flight``. Every wait has a timeout whose error
names the link, the peer and the step.

How far can a sender run ahead of its receiver? ``in_flight_bound(max_in_flight)``
messages: ``max_in_flight`` in the send queue, one in the sender thread's ``send``, one
in the transport (gloo completes a send once the peer's socket has the bytes), one in
the receiver thread waiting for room, and ``max_in_flight`` in the receive queue.

Wire format of one message: a header ``int64[3] = (kind, step, batch)``, then, for
data, the labels ``int64[batch]`` (if the link carries labels) and the tensor
``[batch, *shape]``. The header always goes over a gloo group of its own and the data over
the run's backend, so on GPUs an NCCL receive is posted only once its message is known
to be coming (a receive left posted would hold up the device's stream). Each link has its
own groups, so links between the same
pair of ranks (activations forward, gradients backward) never mix their messages.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# Message kinds. DATA and EVAL carry tensors; the others are markers.
DATA, STOP, EPOCH_END, EVAL, EVAL_END = 0, 1, 2, 3, 4


def in_flight_bound(max_in_flight: int) -> int:
    """Most messages a sender can be ahead of what its receiver has taken (see the module docstring)."""
    return 2 * max_in_flight + 3


class LinkTimeout(TimeoutError):
    """A peer did not send or receive within the configured time; ``peer`` is its rank (the one to blame)."""

    def __init__(self, message: str, peer: int | None = None) -> None:
        super().__init__(message)
        self.peer = peer

    def __reduce__(self):  # keeps ``peer`` when Ray carries the error to the driver
        return type(self), (str(self), self.peer)


class LinkClosed(RuntimeError):
    """The link's background thread died (peer gone, process group destroyed); ``peer`` is the other end."""

    def __init__(self, message: str, peer: int | None = None) -> None:
        super().__init__(message)
        self.peer = peer

    def __reduce__(self):
        return type(self), (str(self), self.peer)


class LinkAborted(RuntimeError):
    """``abort_waits`` was called: the worker is being stopped (a peer failed), so nothing waits on."""


# One stage worker per process: setting this ends every wait on every link of the process.
_abort = threading.Event()
_SLICE_S = 0.1  # waits wake this often to notice an abort or a failed link thread


def abort_waits() -> None:
    _abort.set()


def allow_waits() -> None:
    _abort.clear()


def aborted() -> bool:
    return _abort.is_set()


@dataclass
class Message:
    kind: int
    step: int
    tensor: torch.Tensor | None = None
    labels: torch.Tensor | None = None


class _Link:
    def __init__(self, name: str, peer: int, group: "LinkGroup", max_in_flight: int, timeout_s: float) -> None:
        self.name, self.peer, self.group, self.timeout_s = name, peer, group, timeout_s
        self.queue: queue.Queue = queue.Queue(maxsize=max_in_flight)
        self.error: BaseException | None = None
        self.last_step = -1

    @property
    def depth(self) -> int:
        """Messages queued on this side now."""
        return self.queue.qsize()

    def _check(self) -> None:
        if self.error is not None:
            raise LinkClosed(f"link {self.name} (peer rank {self.peer}) failed: {self.error!r}",
                             self.peer) from self.error

    def _wait(self, op, timeout: float, what: str):
        """``op(seconds)`` (a queue get/put) in short slices: a failed link thread or an abort ends the wait
        at once instead of after ``timeout``; raises LinkTimeout(``what``) when the time is up."""
        deadline = time.monotonic() + timeout
        while True:
            if _abort.is_set():
                raise LinkAborted(f"link {self.name}: stopped while waiting")
            self._check()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LinkTimeout(what, self.peer)
            try:
                return op(min(_SLICE_S, remaining))
            except (queue.Empty, queue.Full):
                continue


class SendLink(_Link):
    def __init__(self, name: str, peer: int, group: "LinkGroup", max_in_flight: int, timeout_s: float) -> None:
        super().__init__(name, peer, group, max_in_flight, timeout_s)
        self._thread = threading.Thread(target=self._run, name=f"send-{name}", daemon=True)
        self._thread.start()

    def send(self, step: int, tensor: torch.Tensor, labels: torch.Tensor | None = None, kind: int = DATA) -> float:
        """Queue a message; returns the seconds spent waiting for room (0 unless ``max_in_flight`` are queued)."""
        return self._put(Message(kind, step, tensor.detach(), None if labels is None else labels.detach()))

    def mark(self, kind: int, step: int) -> float:
        """Queue a marker (EPOCH_END, EVAL_END) after the messages already queued."""
        return self._put(Message(kind, step))

    def close(self, step: int = -1) -> None:
        """Send STOP after everything queued, and wait until it is out."""
        self._put(Message(STOP, step))
        self._thread.join(self.timeout_s)
        if self._thread.is_alive():
            raise LinkTimeout(f"link {self.name}: rank {self.peer} did not take the stop message within "
                              f"{self.timeout_s:.0f} s", self.peer)
        self._check()

    def _put(self, message: Message) -> float:
        start = time.perf_counter()
        self._wait(lambda t: self.queue.put(message, timeout=t), self.timeout_s,
                   f"link {self.name}, step {message.step}: rank {self.peer} took nothing for {self.timeout_s:g} s "
                   f"({self.depth} messages waiting)")
        return time.perf_counter() - start

    def _run(self) -> None:
        try:
            while True:
                m = self.queue.get()
                batch = 0 if m.tensor is None else m.tensor.shape[0]
                dist.send(torch.tensor([m.kind, m.step, batch], dtype=torch.int64), self.peer, group=self.group.header)
                if m.kind == STOP:
                    return
                if m.tensor is None:
                    continue
                if m.labels is not None:
                    dist.send(m.labels.contiguous(), self.peer, group=self.group.data)
                dist.send(m.tensor.contiguous(), self.peer, group=self.group.data)
                self.last_step = m.step
        except BaseException as err:  # reported to the main loop at its next send
            self.error = err


class RecvLink(_Link):
    def __init__(
        self,
        name: str,
        peer: int,
        group: "LinkGroup",
        max_in_flight: int,
        timeout_s: float,
        shape: tuple[int, ...],
        dtype: torch.dtype = torch.float32,
        labels: bool = False,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(name, peer, group, max_in_flight, timeout_s)
        self.shape, self.dtype, self.labels, self.device = tuple(shape), dtype, labels, torch.device(device)
        self._thread = threading.Thread(target=self._run, name=f"recv-{name}", daemon=True)
        self._thread.start()

    def recv(self, step: int | None = None, timeout_s: float | None = None) -> Message:
        """The next message; waits at most the link's timeout. ``step`` only names the wait in errors."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        try:  # what is already here is delivered even after the link thread ended (its STOP, say)
            return self.queue.get_nowait()
        except queue.Empty:
            pass
        at = f", step {step}" if step is not None else ""
        return self._wait(lambda t: self.queue.get(timeout=t), timeout, f"link {self.name}{at}: nothing from "
                          f"rank {self.peer} within {timeout:g} s (last message: step {self.last_step})")

    def poll(self) -> Message | None:
        """The next message if one is already here, else None."""
        self._check()
        try:
            return self.queue.get_nowait()
        except queue.Empty:
            return None

    def _run(self) -> None:
        try:
            while True:
                header = torch.empty(3, dtype=torch.int64)
                dist.recv(header, self.peer, group=self.group.header)
                kind, step, batch = (int(v) for v in header.tolist())
                if batch == 0:  # a marker
                    self.queue.put(Message(kind, step))
                    if kind == STOP:
                        return
                    continue
                labels = None
                if self.labels:
                    labels = torch.empty(batch, dtype=torch.int64, device=self.device)
                    dist.recv(labels, self.peer, group=self.group.data)
                tensor = torch.empty(batch, *self.shape, dtype=self.dtype, device=self.device)
                dist.recv(tensor, self.peer, group=self.group.data)
                self.last_step = step
                self.queue.put(Message(kind, step, tensor, labels))  # blocks when full: back-pressure to the sender
        except BaseException as err:
            self.error = err


@dataclass
class LinkGroup:
    """The two process groups of one link: gloo for headers, the run's backend for data."""

    header: object
    data: object


def link_groups(world_size: int) -> dict[tuple[str, int], LinkGroup]:
    """One process group per link, created in the same order on every rank (torch requires that).

    ``("fwd", k)``: activations k -> k+1; ``("bwd", k)``: gradients k+1 -> k;
    ``("err", k)``: the output error from the last stage to stage k (dfa);
    ``("labels", 0)``: labels from stage 0 to the last stage (pipelined E2EBP schedules).
    """
    # A link may sit idle for a long time (gpipe's forward links carry only evaluation), so the
    # groups' own timeout is long: the waits in the links enforce links.timeout_s instead.
    idle = timedelta(days=7)

    def pair(ranks: list[int]) -> LinkGroup:
        return LinkGroup(dist.new_group(ranks, backend="gloo", timeout=idle), dist.new_group(ranks, timeout=idle))

    groups = {}
    last = world_size - 1
    for k in range(last):
        groups[("fwd", k)] = pair([k, k + 1])
        groups[("bwd", k)] = pair([k, k + 1])
        groups[("err", k)] = pair([k, last])
    if last > 0:
        groups[("labels", 0)] = pair([0, last])
    return groups
