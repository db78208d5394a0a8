"""Shorter waits in pynetdicom's association loops (about 1.7x the C-STORE rate it can take).

pynetdicom runs two polling loops per association: the DUL thread checks the socket and its
queue, sleeping 1 ms whenever nothing was there, and the acceptor's reactor thread checks
for a complete DIMSE message, sleeping 1 ms every turn. A C-STORE exchange waits in both
(its last PDU, then its response), so with ``storescu`` — one instance at a time — the
sleeps alone cap an SCP that keeps nothing at about 310–330 instances/s on our 2-core
machine (``bench/pacs.py`` measures it beside the hub).

:func:`install` replaces the ``time`` module those two pynetdicom modules see by one whose
``sleep`` waits for the event the loop is polling for, with the same timeout:

- the acceptor's reactor waits on its DIMSE message queue (woken by the message);
- the DUL thread waits in ``select`` on its socket for at most ``DUL_DELAY`` (woken by data;
  a response the reactor queued is picked up within ``DUL_DELAY``).

:func:`tune` marks one association's threads (the listeners call it on ``EVT_CONN_OPEN``).
Unmarked threads sleep as before. That SCP then takes about 525–530 instances/s. Requestor
associations keep the stock reactor wait: their message queue has another reader
(``send_c_*`` waiting for a response), which a second waiter on the queue's condition could
rob of its wake-up.

pynetdicom's loops are internal: :func:`install` checks the release it was written against
(3.0.x) and leaves any other alone, with a log line.
"""

from __future__ import annotations

import select
import threading
import time
from types import ModuleType
from typing import Any

import pynetdicom
from pynetdicom import association as _association
from pynetdicom import dul as _dul

from hie.hub.logging import get_logger

log = get_logger("hie.adapters.dicom")

DUL_DELAY = 0.0005  # seconds a DUL thread waits for socket data before polling its queue
_WAIT_QUEUE = "_hie_wait_queue"  # thread attribute: queue.Queue whose arrival ends a sleep
_WAIT_SOCKET = "_hie_wait_socket"  # thread attribute: socket whose data ends a sleep
_installed = False
_lock = threading.Lock()


def _sleep(seconds: float) -> None:
    thread = threading.current_thread()
    queue: Any = getattr(thread, _WAIT_QUEUE, None)
    if queue is not None:
        with queue.not_empty:
            if not queue.queue:
                queue.not_empty.wait(seconds)
        return
    sock = getattr(thread, _WAIT_SOCKET, None)
    if sock is not None:
        try:
            select.select([sock], [], [], seconds)
            return
        except (OSError, ValueError):  # closed under us: the loop notices on its next turn
            pass
    time.sleep(seconds)


class _Clock(ModuleType):
    """``time`` as pynetdicom's loops see it: everything as is, but :func:`_sleep`."""

    sleep = staticmethod(_sleep)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def install() -> bool:
    """Patch the two pynetdicom modules once per process; False when the release is not
    the one this was written for (then nothing changes)."""
    global _installed
    with _lock:
        if _installed:
            return True
        if not pynetdicom.__version__.startswith("3.0."):
            log.warning("dicom.reactor_stock", pynetdicom=pynetdicom.__version__)
            return False
        clock = _Clock("time")
        _association.time = clock  # type: ignore[attr-defined]
        _dul.time = clock  # type: ignore[attr-defined]
        _installed = True
        return True


def tune(assoc: Any) -> None:
    """Mark ``assoc``'s threads to wait for their events (see module docstring)."""
    if not _installed:
        return
    dul = assoc.dul
    sock = getattr(dul.socket, "socket", None)
    if sock is not None:
        setattr(dul, _WAIT_SOCKET, sock)
        dul._run_loop_delay = DUL_DELAY
    if assoc.is_acceptor:
        setattr(assoc, _WAIT_QUEUE, assoc.dimse.msg_queue)
