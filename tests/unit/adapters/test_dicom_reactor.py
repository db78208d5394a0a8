"""The waits pynetdicom's association loops make once ``hie.adapters.dicom_reactor`` is in:
a tuned thread wakes for its event, any other thread sleeps as before."""

from __future__ import annotations

import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from pynetdicom import association, dul

from hie.adapters import dicom_reactor


@pytest.fixture
def installed() -> Iterator[None]:
    assert dicom_reactor.install()
    yield
    me = threading.current_thread()
    for name in ("_hie_wait_queue", "_hie_wait_socket"):
        if hasattr(me, name):
            delattr(me, name)


def later(seconds: float, action: Callable[[], object]) -> threading.Timer:
    timer = threading.Timer(seconds, action)
    timer.start()
    return timer


def test_both_pynetdicom_loops_see_the_waiting_clock(installed: None) -> None:
    for module in (association, dul):
        clock = module.time  # type: ignore[attr-defined]
        assert clock.sleep is dicom_reactor._sleep
        assert clock.monotonic is time.monotonic  # the rest of ``time`` as it is


def test_a_reactor_thread_wakes_when_its_message_arrives(installed: None) -> None:
    messages: queue.Queue[int] = queue.Queue()
    threading.current_thread()._hie_wait_queue = messages  # type: ignore[attr-defined]
    timer = later(0.05, lambda: messages.put(1))
    t0 = time.monotonic()
    association.time.sleep(10)  # type: ignore[attr-defined]
    assert time.monotonic() - t0 < 5
    timer.join()
    # a message already waiting: no wait at all
    t0 = time.monotonic()
    association.time.sleep(10)  # type: ignore[attr-defined]
    assert time.monotonic() - t0 < 5 and messages.get_nowait() == 1


def test_a_dul_thread_wakes_when_data_arrives(installed: None) -> None:
    ours, peer = socket.socketpair()
    with ours, peer:
        threading.current_thread()._hie_wait_socket = ours  # type: ignore[attr-defined]
        timer = later(0.05, lambda: peer.send(b"\x04"))
        t0 = time.monotonic()
        dul.time.sleep(10)  # type: ignore[attr-defined]
        assert time.monotonic() - t0 < 5
        timer.join()


def test_a_dul_thread_whose_socket_closed_sleeps_its_time(installed: None) -> None:
    ours, peer = socket.socketpair()
    peer.close()
    ours.close()
    threading.current_thread()._hie_wait_socket = ours  # type: ignore[attr-defined]
    t0 = time.monotonic()
    dul.time.sleep(0.2)  # type: ignore[attr-defined]
    assert time.monotonic() - t0 >= 0.2


def test_other_threads_sleep_as_before(installed: None) -> None:
    t0 = time.monotonic()
    association.time.sleep(0.2)  # type: ignore[attr-defined]
    assert time.monotonic() - t0 >= 0.2
