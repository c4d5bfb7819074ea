"""Link waits end on time, on an abort and on a failed link thread (no process group needed)."""

from __future__ import annotations

import threading
import time

import pytest

from decoupled.runtime import links
from decoupled.runtime.links import LinkAborted, LinkClosed, LinkTimeout, RecvLink, SendLink


class IdleRecv(RecvLink):
    """A receive end whose background thread receives nothing."""

    def _run(self) -> None:
        return


class IdleSend(SendLink):
    """A send end whose background thread never takes a message off the queue."""

    def _run(self) -> None:
        return


def recv_link(timeout_s: float) -> IdleRecv:
    return IdleRecv("stage0->stage1", 0, None, 2, timeout_s, (3,))


def test_a_receive_times_out_naming_link_step_and_peer():
    link = recv_link(0.3)
    start = time.monotonic()
    with pytest.raises(LinkTimeout, match=r"link stage0->stage1, step 7: nothing from rank 0 within 0.3 s") as err:
        link.recv(step=7)
    assert 0.25 < time.monotonic() - start < 1.0
    assert err.value.peer == 0


def test_a_send_times_out_when_the_peer_takes_nothing():
    link = IdleSend("stage1->stage2", 2, None, 1, 0.3)
    link.send(0, __import__("torch").zeros(1))  # fills the queue
    start = time.monotonic()
    with pytest.raises(LinkTimeout, match="rank 2 took nothing") as err:
        link.send(1, __import__("torch").zeros(1))
    assert 0.25 < time.monotonic() - start < 1.0 and err.value.peer == 2


def test_abort_ends_a_long_wait_at_once():
    link = recv_link(60)
    threading.Timer(0.2, links.abort_waits).start()
    start = time.monotonic()
    try:
        with pytest.raises(LinkAborted):
            link.recv(step=1)
    finally:
        links.allow_waits()
    assert time.monotonic() - start < 1.0


def test_a_failed_link_thread_ends_a_long_wait_at_once():
    link = recv_link(60)
    threading.Timer(0.2, lambda: setattr(link, "error", ConnectionResetError("peer gone"))).start()
    start = time.monotonic()
    with pytest.raises(LinkClosed, match="peer rank 0") as err:
        link.recv(step=1)
    assert time.monotonic() - start < 1.0 and err.value.peer == 0


def test_what_arrived_before_the_thread_ended_is_still_delivered():
    link = recv_link(60)
    link.queue.put(links.Message(links.STOP, 5))
    link.error = ConnectionResetError("peer gone after its STOP")
    assert link.recv().kind == links.STOP
