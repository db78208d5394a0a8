"""The MLLP listener: HL7 v2 messages over TCP or TLS, framed per HL7 MLLP release 2.

A frame is ``<SB> content <EB><CR>`` with SB = 0x0B and EB CR = 0x1C 0x0D (HL7 v2.5.1
Appendix C.4.3, "MLLP release 2"). This module only frames: it hands each complete message to a
:class:`MllpHandler` and frames the replies the handler returns. Parsing, acknowledging and
keeping rejected input belong to the handler (the intake), so this file knows nothing of HL7
beyond the three framing bytes.

What a sender may do, and what the server does:

- frames split over many reads or many frames in one read: each message is handed over whole,
  in the order sent. Messages of one connection are handled strictly one after another (HL7
  original-mode acknowledgement assumes it), connections run concurrently;
- CR, LF, tab and space between frames are ignored (many senders end a frame with an extra
  newline);
- anything else outside a frame is *garbage*: skipped up to the next start block and reported
  once per run (:meth:`MllpHandler.reject` with kind ``"garbage"``);
- a frame longer than ``max_message_bytes`` is *too large*: its first 64 KiB are kept, the rest
  is read and dropped up to the end block (the buffer never grows past the limit plus one read),
  it is reported as ``"too-large"`` and the connection carries on with the next frame;
- a frame that never ends — the peer closes, the connection stays silent for
  ``idle_timeout_seconds``, or a new start block arrives inside it (the sender gave up on it) —
  is reported as ``"truncated"``; replies to it are never sent;
- an end block without the CR after it is accepted (the missing CR is only whitespace).

A handler that raises is logged (its exception type only: messages hold patient data, so no
content, and no exception text, is ever logged) and that connection is closed; the server keeps
serving the others.

Framing costs one ``bytes.find`` for the end block and one for a stray start block per frame
(both ``memchr``): a few microseconds a message, far below what parsing costs.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import traceback
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, cast

from prometheus_client import Counter, Gauge, Histogram

from hie.adapters.tls import PeerCertificate, peer_certificate, server_ssl_context
from hie.hub.logging import get_logger

if TYPE_CHECKING:
    from hie.hub.settings import Settings

log = get_logger("hie.mllp")

START_BLOCK = b"\x0b"  # <SB> (MLLP release 2)
END_BLOCK = b"\x1c"  # <EB>
TRAILER = b"\x1c\r"  # <EB><CR> ends every frame the server sends
HEAD_BYTES = 64 * 1024  # what a rejected frame keeps, enough for MSH and an ACK's control id
_WHITESPACE = b" \t\r\n"

MESSAGE, TOO_LARGE, GARBAGE, TRUNCATED = "message", "too-large", "garbage", "truncated"
FRAME_KINDS = (MESSAGE, TOO_LARGE, GARBAGE, TRUNCATED)

# A connection stops reading while this much received input waits for its handler (a sender
# that pipelines without waiting for ACKs), and resumes when the backlog is handled.
_PAUSE_FRAMES = 64
_PAUSE_BYTES = 4 << 20

CONNECTIONS = Gauge("hie_mllp_connections_open", "MLLP connections open")
ACCEPTED = Counter("hie_mllp_connections_total", "MLLP connections accepted")
FRAMES = Counter("hie_mllp_frames_total", "MLLP frames received, by outcome", ["kind"])
HANDLER_ERRORS = Counter(
    "hie_mllp_handler_errors_total", "MLLP handler calls that raised (connection closed)"
)
HANDLE_SECONDS = Histogram(
    "hie_mllp_handle_seconds",
    "Time the handler took for one MLLP message",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
)
_FRAME_COUNT = {k: FRAMES.labels(kind=k) for k in FRAME_KINDS}  # bound once: hot path


# --- what the handler sees -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Peer:
    """Who sent a frame: address, whether over TLS, and the client certificate if one was
    presented and verified."""

    host: str
    port: int
    tls: bool = False
    certificate: PeerCertificate | None = None


class MllpHandler(Protocol):
    """What the server calls; the intake implements it. Both methods run on the server's
    event loop, one call at a time per connection; a slow (blocking) call stalls every
    connection, so blocking work belongs in a thread (``asyncio.to_thread``)."""

    async def handle(self, raw: bytes, peer: Peer) -> list[bytes]:
        """Handle one complete message (``raw``: the frame's content, without framing) and
        return the messages to send back, in order (each is framed by the server; an empty
        list sends nothing). Must not raise for anything a sender can send; if it does, the
        server logs it and closes this connection."""
        ...

    async def reject(self, kind: str, head: bytes, peer: Peer, *, size: int) -> list[bytes]:
        """A frame that never became a message: ``kind`` is ``"too-large"``, ``"garbage"`` or
        ``"truncated"`` (see the module docstring); ``head`` is its first bytes (at most
        64 KiB) and ``size`` how many bytes it had in all. Returns replies as :meth:`handle`
        does; replies to ``"truncated"`` are never sent (the frame has no sender waiting)."""
        ...


# --- framing -------------------------------------------------------------------------------------


@dataclass(slots=True)
class Frame:
    """One unit of input: a message (``data`` is its content) or a rejected frame (``data`` is
    its head); ``size`` is the original length in bytes."""

    kind: str
    data: bytes
    size: int


_OUTSIDE, _INSIDE, _DISCARD = 0, 1, 2


class MllpFramer:
    """Splits a byte stream into :class:`Frame` s (pure: no I/O, usable by any transport).

    Only the bytes of an unfinished frame are kept between reads, and never more than
    ``max_message_bytes`` plus one read of them.
    """

    __slots__ = (
        "_buf",
        "_garbage",
        "_garbage_size",
        "_head",
        "_max",
        "_scan",
        "_size",
        "_start",
        "_state",
    )

    def __init__(self, max_message_bytes: int) -> None:
        self._max = max_message_bytes
        self._state = _OUTSIDE
        self._buf = bytearray()  # an unfinished frame's bytes, from its start block on
        self._start = 0  # where the unfinished frame's content starts in the buffer
        self._scan = 0  # where to look for its end block next (nothing before it has one)
        self._head = b""  # a too-large frame's first bytes
        self._size = 0  # a too-large frame's length so far
        self._garbage = bytearray()  # the current garbage run's first bytes
        self._garbage_size = 0

    @property
    def buffered(self) -> int:
        """Bytes held for an unfinished frame."""
        return len(self._buf) + len(self._garbage) + len(self._head)

    @property
    def in_frame(self) -> bool:
        """Whether a frame has started and not ended."""
        return self._state != _OUTSIDE

    def feed(self, data: bytes) -> list[Frame]:
        """Take the next bytes of the stream; return the frames they complete, in order."""
        out: list[Frame] = []
        work: bytes | bytearray
        if self._buf:
            self._buf += data
            work = self._buf
        else:
            work = data
        n = len(work)
        pos = 0
        state = self._state
        while pos < n:
            if state == _INSIDE:
                start = self._start
                end = work.find(END_BLOCK, self._scan)
                if end < 0:
                    if n - start > self._max:
                        # too large: keep the head, forget the rest, read on to the end block
                        self._head = bytes(work[start : start + HEAD_BYTES])
                        self._size = n - start
                        state = _DISCARD
                    else:
                        self._scan = n
                    pos = n
                    break
                # a start block inside a frame: the sender abandoned what came before it
                restart = work.find(START_BLOCK, start, end)
                while restart >= 0:
                    if restart > start:
                        head = bytes(work[start : min(restart, start + HEAD_BYTES)])
                        out.append(Frame(TRUNCATED, head, restart - start))
                    start = restart + 1
                    restart = work.find(START_BLOCK, start, end)
                size = end - start
                if size > self._max:
                    head = bytes(work[start : min(end, start + HEAD_BYTES)])
                    out.append(Frame(TOO_LARGE, head, size))
                elif size and (work[start] > 0x20 or work[start:end].strip(_WHITESPACE)):
                    out.append(Frame(MESSAGE, bytes(work[start:end]), size))
                # an empty frame (a keep-alive some senders use) carries nothing to keep
                pos = end + 1
                state = _OUTSIDE
            elif state == _OUTSIDE:
                sb = work.find(START_BLOCK, pos)
                stop = n if sb < 0 else sb
                if stop > pos:
                    self._outside(work, pos, stop)
                if sb < 0:
                    pos = n
                    break
                if self._garbage_size:
                    out.append(self._garbage_frame())
                state = _INSIDE
                self._start = self._scan = pos = sb + 1
            else:  # _DISCARD: a too-large frame's tail, dropped as it arrives
                end = work.find(END_BLOCK, pos)
                if end < 0:
                    self._size += n - pos
                    pos = n
                    break
                self._size += end - pos
                out.append(Frame(TOO_LARGE, self._head, self._size))
                self._head, self._size = b"", 0
                pos = end + 1
                state = _OUTSIDE
        self._state = state
        if state == _INSIDE:
            # keep only the unfinished frame, its content starting at offset 0
            start = self._start
            if work is self._buf:
                if start:
                    del self._buf[:start]
            else:
                self._buf = bytearray(memoryview(work)[start:])
            self._scan -= start
            self._start = 0
        elif self._buf:
            self._buf = bytearray()
        return out

    def _outside(self, work: bytes | bytearray, pos: int, stop: int) -> None:
        """Account for bytes between frames: whitespace is ignored, anything else starts (or
        continues) a garbage run."""
        if not self._garbage_size:
            if stop - pos <= 2 and not work[pos:stop].strip(_WHITESPACE):
                return  # the usual CR (or CR LF) after an end block
            seg = bytes(work[pos:stop]).lstrip(_WHITESPACE)
            if not seg:
                return
            self._garbage_size = len(seg)
            self._garbage += seg[:HEAD_BYTES]
            return
        self._garbage_size += stop - pos
        room = HEAD_BYTES - len(self._garbage)
        if room > 0:
            self._garbage += work[pos : min(stop, pos + room)]

    def _garbage_frame(self) -> Frame:
        frame = Frame(GARBAGE, bytes(self._garbage), self._garbage_size)
        self._garbage = bytearray()
        self._garbage_size = 0
        return frame

    def finish(self) -> list[Frame]:
        """The stream ended (closed or timed out): report an unfinished frame as truncated
        and a garbage run in progress. The framer is empty afterwards."""
        out: list[Frame] = []
        if self._state == _INSIDE and len(self._buf) > self._start:
            partial = self._buf[self._start :]
            out.append(Frame(TRUNCATED, bytes(partial[:HEAD_BYTES]), len(partial)))
        elif self._state == _DISCARD:
            out.append(Frame(TRUNCATED, self._head, self._size))
        if self._garbage_size:
            out.append(self._garbage_frame())
        self._state = _OUTSIDE
        self._buf = bytearray()
        self._start = self._scan = self._size = 0
        self._head = b""
        return out


def frame(message: bytes) -> bytes:
    """``message`` wrapped in an MLLP frame."""
    return START_BLOCK + message + TRAILER


# --- the peer ----------------------------------------------------------------------------------


def _peer_of(transport: asyncio.BaseTransport) -> Peer:
    addr = transport.get_extra_info("peername")
    host, port = (str(addr[0]), int(addr[1])) if isinstance(addr, tuple) else (str(addr), 0)
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return Peer(host, port)
    der = ssl_object.getpeercert(binary_form=True)
    return Peer(host, port, tls=True, certificate=peer_certificate(der) if der else None)


# --- one connection ------------------------------------------------------------------------------


class _Connection(asyncio.Protocol):
    """One peer: the transport feeds the framer, a task hands the frames to the handler one at
    a time and writes the replies."""

    def __init__(self, server: MllpServer) -> None:
        self._server = server
        self._loop = server.loop
        self._framer = MllpFramer(server.max_message_bytes)
        self._queue: deque[Frame] = deque()
        self._queued_bytes = 0
        self._wakeup: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._transport: asyncio.Transport | None = None
        self.peer = Peer("", 0)
        self.task: asyncio.Task[None] | None = None
        self.lost: asyncio.Future[None] = self._loop.create_future()
        self._eof = False  # no more input will arrive
        self._stopping = False  # the server is stopping: finish the current message, then close
        self._busy = False  # the handler is running
        self._read_paused = False
        self._write_paused = False
        self._last = 0.0  # loop time of the last input or reply
        self._timer: asyncio.TimerHandle | None = None
        self._open = False  # counted as an open connection

    # transport callbacks (asyncio.Protocol)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        if self._server.stopping:  # a TLS handshake that finished while the server stopped
            self._transport.abort()
            return
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # replies are small and each sender waits for its ACK: never let Nagle hold one
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.peer = _peer_of(transport)
        self._server.connections.add(self)
        self._open = True
        CONNECTIONS.inc()
        ACCEPTED.inc()
        self._last = self._loop.time()
        self._timer = self._loop.call_later(self._server.idle_timeout, self._on_idle)
        self.task = self._loop.create_task(self._run())
        log.debug("mllp.connection.open", peer=self.peer.host, tls=self.peer.tls)

    def data_received(self, data: bytes) -> None:
        self._last = self._loop.time()
        frames = self._framer.feed(data)
        if frames:
            self._enqueue(frames)

    def eof_received(self) -> bool:
        self._eof = True
        self._enqueue(self._framer.finish())
        self._wake()
        # plain TCP: keep the transport open to send the replies still owed (the task closes
        # it); TLS has no half-close
        return not self.peer.tls

    def connection_lost(self, _exc: Exception | None) -> None:
        if self.lost.done():
            return
        self._eof = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._enqueue(self._framer.finish())
        self._wake()
        self._wake_drain()
        self.lost.set_result(None)
        if self._open:
            self._open = False
            self._server.connections.discard(self)
            CONNECTIONS.dec()
            log.debug("mllp.connection.closed", peer=self.peer.host)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drain()

    # the rest

    def _enqueue(self, frames: list[Frame]) -> None:
        if not frames:
            return
        for f in frames:
            self._queued_bytes += len(f.data)
        self._queue.extend(frames)
        self._wake()
        if (
            not self._read_paused
            and not self._eof
            and (len(self._queue) > _PAUSE_FRAMES or self._queued_bytes > _PAUSE_BYTES)
            and self._transport is not None
        ):
            self._read_paused = True
            self._transport.pause_reading()

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def _wake_drain(self) -> None:
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def _on_idle(self) -> None:
        """The idle timer: close a connection silent for ``idle_timeout`` (never while its
        handler works or input waits for it: then the silence is ours)."""
        self._timer = None
        if self.lost.done() or self._transport is None:
            return
        idle = self._server.idle_timeout
        if self._busy or (self._queue and self._drain is None):
            # our handler is working (a peer that stopped reading our replies is idle, though)
            self._timer = self._loop.call_later(idle, self._on_idle)
            return
        quiet = self._loop.time() - self._last
        if quiet < idle:
            self._timer = self._loop.call_later(idle - quiet, self._on_idle)
            return
        log.info(
            "mllp.connection.idle",
            peer=self.peer.host,
            seconds=idle,
            partial_bytes=self._framer.buffered,
        )
        self._eof = True
        self._enqueue(self._framer.finish())
        if self._transport.get_write_buffer_size():
            self._transport.abort()  # a peer that does not read would keep close() waiting
        else:
            self._transport.close()

    def begin_stop(self) -> None:
        """The server is stopping: stop reading, finish the message in hand, then close."""
        self._stopping = True
        if self._transport is not None and not self._transport.is_closing():
            if not self._read_paused:
                self._read_paused = True
                self._transport.pause_reading()
        self._wake()

    async def _run(self) -> None:
        """Hand the queued frames to the handler in order; write each one's replies."""
        handler = self._server.handler
        transport = self._transport
        assert transport is not None
        queue = self._queue
        try:
            while not self._stopping:
                if not queue:
                    if self._eof:
                        break
                    self._wakeup = self._loop.create_future()
                    await self._wakeup
                    self._wakeup = None
                    continue
                f = queue.popleft()
                self._queued_bytes -= len(f.data)
                if self._read_paused and not self._eof and not self._stopping:
                    if len(queue) <= _PAUSE_FRAMES // 4 and self._queued_bytes < _PAUSE_BYTES:
                        self._read_paused = False
                        transport.resume_reading()
                _FRAME_COUNT[f.kind].inc()
                self._busy = True
                started = self._loop.time()
                try:
                    if f.kind == MESSAGE:
                        replies = await handler.handle(f.data, self.peer)
                        HANDLE_SECONDS.observe(self._loop.time() - started)
                    else:
                        log.warning(
                            "mllp.frame.rejected", peer=self.peer.host, kind=f.kind, size=f.size
                        )
                        replies = await handler.reject(f.kind, f.data, self.peer, size=f.size)
                except Exception as exc:  # noqa: BLE001 - one bad call must not take the server down
                    HANDLER_ERRORS.inc()
                    where = traceback.extract_tb(exc.__traceback__)[-1:]
                    log.error(
                        "mllp.handler.failed",
                        peer=self.peer.host,
                        kind=f.kind,
                        size=f.size,
                        # the type and place only: an exception's text may quote the message
                        error=type(exc).__name__,
                        at=f"{where[0].filename}:{where[0].lineno}" if where else "",
                    )
                    break
                finally:
                    self._busy = False
                    self._last = self._loop.time()
                if replies and f.kind != TRUNCATED and not transport.is_closing():
                    transport.write(b"".join(START_BLOCK + r + TRAILER for r in replies))
                    if self._write_paused:
                        self._drain = self._loop.create_future()
                        await self._drain
                        self._drain = None
        finally:
            if queue and self._stopping:
                log.info("mllp.connection.stopped", peer=self.peer.host, unhandled=len(queue))
            if not transport.is_closing():
                transport.close()


# --- the server ----------------------------------------------------------------------------------


class MllpServer:
    """An asyncio MLLP server (see the module docstring) handing messages to ``handler``."""

    def __init__(
        self,
        handler: MllpHandler,
        *,
        host: str = "127.0.0.1",
        port: int = 2575,
        max_message_bytes: int = 16 << 20,
        idle_timeout_seconds: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if max_message_bytes < 1:
            raise ValueError("max_message_bytes must be positive")
        if idle_timeout_seconds <= 0:
            raise ValueError("idle_timeout_seconds must be positive")
        self.handler = handler
        self.host = host
        self.requested_port = port
        self.max_message_bytes = max_message_bytes
        self.idle_timeout = idle_timeout_seconds
        self.ssl_context = ssl_context
        self.connections: set[_Connection] = set()
        self.stopping = False
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the server runs on (set by :meth:`start`)."""
        if self._loop is None:
            raise RuntimeError("the MLLP server is not started")
        return self._loop

    @property
    def port(self) -> int:
        """The port actually listened on (the one chosen by the system for port 0)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the MLLP server is not listening")
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Start listening; returns once connections are accepted."""
        if self._server is not None:
            raise RuntimeError("the MLLP server is already started")
        self._loop = asyncio.get_running_loop()
        self.stopping = False
        self._server = await self._loop.create_server(
            lambda: _Connection(self),
            self.host,
            self.requested_port,
            ssl=self.ssl_context,
            ssl_handshake_timeout=min(self.idle_timeout, 60.0) if self.ssl_context else None,
            reuse_address=True,
            backlog=1024,
        )
        log.info(
            "mllp.listening",
            host=self.host,
            port=self.port,
            tls=self.ssl_context is not None,
            client_certificates=bool(
                self.ssl_context and self.ssl_context.verify_mode == ssl.CERT_REQUIRED
            ),
            max_message_bytes=self.max_message_bytes,
        )

    async def stop(self, grace_seconds: float = 10.0) -> None:
        """Stop listening and close every connection. A message being handled is finished and
        its replies sent (for up to ``grace_seconds``, then the handler is cancelled); messages
        not yet started are left unacknowledged, so their senders send them again. Returns
        when every connection is closed and every task has ended."""
        server = self._server
        if server is None:
            return
        self.stopping = True
        server.close()
        conns = list(self.connections)
        for c in conns:
            c.begin_stop()
        tasks = [c.task for c in conns if c.task is not None and not c.task.done()]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=grace_seconds)
            for t in late:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        lost = [c.lost for c in conns if not c.lost.done()]
        if lost:
            # a TLS close waits for the peer's close_notify; do not wait for a peer forever
            _, late_lost = await asyncio.wait(lost, timeout=5.0)
            if late_lost:
                for c in conns:
                    if not c.lost.done() and c._transport is not None:
                        c._transport.abort()
                await asyncio.wait(late_lost, timeout=5.0)
        await server.wait_closed()
        self._server = None
        log.info("mllp.stopped", host=self.host)


def mllp_server_from_settings(settings: Settings, handler: MllpHandler) -> MllpServer:
    """The server ``HIE_MLLP_*`` describes (TLS when ``HIE_MLLP_TLS_CERT`` is set)."""
    ctx = None
    if settings.mllp_tls_cert:
        ctx = server_ssl_context(
            settings.mllp_tls_cert, settings.mllp_tls_key, settings.mllp_tls_client_ca
        )
    return MllpServer(
        handler,
        host=settings.mllp_host,
        port=settings.mllp_port,
        max_message_bytes=settings.mllp_max_message_bytes,
        idle_timeout_seconds=settings.mllp_idle_timeout_seconds,
        ssl_context=ctx,
    )


# --- running beside another server ---------------------------------------------------------------


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new event loop: uvloop's when it is installed (faster sockets), else asyncio's."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class MllpThread:
    """Runs an :class:`MllpServer` on its own event loop in a daemon thread, so ``hie serve``
    can run it beside uvicorn. The handler's coroutines run on that loop (:attr:`loop`)."""

    def __init__(self, server: MllpServer, *, name: str = "hie-mllp") -> None:
        self.server = server
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._stop: asyncio.Event | None = None

    @property
    def port(self) -> int:
        """The port the server listens on."""
        return self.server.port

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The thread's event loop (for ``asyncio.run_coroutine_threadsafe``)."""
        if self._loop is None:
            raise RuntimeError("the MLLP thread is not started")
        return self._loop

    def start(self, timeout: float = 30.0) -> None:
        """Start the thread; return once the server listens (raise what stopped it if it
        could not, e.g. the port is taken)."""
        if self._thread is not None:
            raise RuntimeError("the MLLP thread is already started")
        self._thread = threading.Thread(target=self._main, name=self._name, daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError("the MLLP server did not start in time")
        if self._error is not None:
            self._thread.join(timeout)
            raise self._error

    def _main(self) -> None:
        loop = self._loop = new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # noqa: BLE001 - handed to start()
            self._error = exc
        finally:
            self._started.set()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        await self.server.start()
        self._started.set()
        await self._stop.wait()
        await self.server.stop()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server (see :meth:`MllpServer.stop`) and the thread."""
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None or loop is None:
            return
        if stop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:  # the loop closed meanwhile
                pass
        thread.join(timeout)
        self._thread = None


def serve_in_thread(server: MllpServer) -> MllpThread:
    """Start ``server`` in a thread of its own (see :class:`MllpThread`); returns once it
    listens."""
    thread = MllpThread(server)
    thread.start()
    return thread
