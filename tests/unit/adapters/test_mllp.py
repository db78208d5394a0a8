"""The MLLP listener's framing and connection handling, over real loopback sockets.

The framer is checked on its own (every split of a stream must give the same frames), then
the server with asyncio clients: order, rejects, limits, time-outs, failures and shutdown.
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from hie.adapters import mllp
from hie.adapters.mllp import (
    HEAD_BYTES,
    Frame,
    MllpFramer,
    MllpServer,
    MllpThread,
    Peer,
    frame,
    mllp_server_from_settings,
)

SB, TRAILER = b"\x0b", b"\x1c\r"


def msg(control: str, body_segments: int = 3) -> bytes:
    """A synthetic HL7 v2 message (no real person) with MSH-10 = ``control``."""
    segs = [f"MSH|^~\\&|LABAPP|LAB01|HIE|HUB|20260115103000||ORU^R01|{control}|P|2.5.1"]
    segs += [f"OBX|{i}|NM|2345-7^Glucose^LN||5.{i}|mmol/L|||||F" for i in range(body_segments)]
    return "\r".join(segs).encode() + b"\r"


def control_of(raw: bytes) -> bytes:
    return raw.split(b"\r", 1)[0].split(b"|")[9]


def acked(reply: bytes) -> bytes:
    """The control id an ACK acknowledges (MSA-2)."""
    return reply.split(b"\rMSA|", 1)[1].split(b"|")[1]


def ack(raw: bytes) -> bytes:
    c = control_of(raw)
    return b"MSH|^~\\&|HIE|HUB|LABAPP|LAB01|20260115||ACK|A" + c + b"|P|2.5.1\rMSA|AA|" + c


class Recorder:
    """A handler that records what it is given and answers each message with an ACK."""

    def __init__(
        self,
        *,
        delay: Callable[[bytes], float] | None = None,
        fail: Callable[[bytes], bool] | None = None,
    ) -> None:
        self.messages: list[bytes] = []
        self.rejects: list[tuple[str, bytes, int]] = []
        self.peers: list[Peer] = []
        self.delay = delay
        self.fail = fail
        self.running: dict[int, int] = {}  # peer port -> calls running now
        self.max_running: dict[int, int] = {}  # peer port -> most calls at once
        self.started = asyncio.Event()

    async def handle(self, raw: bytes, peer: Peer) -> list[bytes]:
        now = self.running[peer.port] = self.running.get(peer.port, 0) + 1
        self.max_running[peer.port] = max(self.max_running.get(peer.port, 0), now)
        self.started.set()
        try:
            if self.delay is not None:
                await asyncio.sleep(self.delay(raw))
            if self.fail is not None and self.fail(raw):
                raise RuntimeError("handler bug (message text must never be logged)")
            self.messages.append(raw)
            self.peers.append(peer)
            return [ack(raw)]
        finally:
            self.running[peer.port] -= 1

    async def reject(self, kind: str, head: bytes, peer: Peer, *, size: int) -> list[bytes]:
        self.rejects.append((kind, head, size))
        return [b"REJECTED|" + kind.encode() + b"|" + str(size).encode()]


Runner = Callable[[Awaitable[Any]], Any]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Runner:
    """Runs a coroutine on a fresh event loop of each kind (``hie serve`` runs the listener
    on uvloop), failing after 30 seconds."""
    factory = asyncio.new_event_loop
    if request.param == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        factory = uvloop.new_event_loop

    def runner(coro: Awaitable[Any]) -> Any:
        async def bounded() -> Any:
            async with asyncio.timeout(30):  # no extra task (all_tasks() is checked)
                return await coro

        with asyncio.Runner(loop_factory=factory) as r:
            return r.run(bounded())

    return runner


async def started(handler: Any, **options: Any) -> MllpServer:
    opts: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "max_message_bytes": 1 << 20,
        "idle_timeout_seconds": 10.0,
    }
    opts.update(options)
    server = MllpServer(handler, **opts)
    await server.start()
    return server


async def connect(server: MllpServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return reader, writer


async def reply(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    data = await asyncio.wait_for(reader.readuntil(TRAILER), timeout)
    assert data.startswith(SB)
    return data[1:-2]


async def closed_by_server(reader: asyncio.StreamReader, timeout: float = 5.0) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), timeout) == b""
    except ConnectionResetError:
        return True


# --- the framer on its own ---------------------------------------------------------------------------


def feed_all(framer: MllpFramer, chunks: list[bytes]) -> list[Frame]:
    out: list[Frame] = []
    for c in chunks:
        out += framer.feed(c)
    return out


def test_every_split_of_a_stream_gives_the_same_frames() -> None:
    m1, m2, m3 = msg("A1"), msg("A2", 40), msg("A3")
    stream = frame(m1) + b"\r\n" + frame(m2) + frame(m3) + b"  \n"
    expected = [m1, m2, m3]
    # one byte at a time
    framer = MllpFramer(1 << 20)
    got = feed_all(framer, [stream[i : i + 1] for i in range(len(stream))])
    assert [f.data for f in got] == expected and all(f.kind == "message" for f in got)
    assert framer.finish() == [] and framer.buffered == 0
    # every cut into two, and random cuts into many
    for cut in range(len(stream) + 1):
        got = feed_all(MllpFramer(1 << 20), [stream[:cut], stream[cut:]])
        assert [f.data for f in got] == expected, cut
    rnd = random.Random(7)
    for _ in range(200):
        cuts = sorted(rnd.sample(range(1, len(stream)), 6))
        parts = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
        assert [f.data for f in feed_all(MllpFramer(1 << 20), parts)] == expected


def test_several_frames_in_one_read_and_bytes_kept_exactly() -> None:
    raw = b"MSH|^~\\&|A|B|||x||ORU^R01|\x00\xff\xc0|P|2.3\r" + "Ёлка".encode("cp1251") + b"\r"
    got = MllpFramer(1 << 20).feed(frame(raw) * 5)
    assert [f.data for f in got] == [raw] * 5 and [f.size for f in got] == [len(raw)] * 5


def test_whitespace_between_frames_is_ignored_and_a_missing_cr_accepted() -> None:
    framer = MllpFramer(1 << 20)
    got = framer.feed(b" \r\n\t" + SB + msg("W1") + b"\x1c" + SB + msg("W2") + TRAILER + b"\n\n")
    assert [f.kind for f in got] == ["message", "message"]
    assert framer.finish() == []


def test_empty_frames_are_ignored() -> None:
    assert MllpFramer(100).feed(SB + TRAILER + SB + b"\r\n" + TRAILER) == []


def test_garbage_is_reported_once_per_run_and_the_next_frame_still_read() -> None:
    framer = MllpFramer(1 << 20)
    got = framer.feed(b"\r\nMSH|not framed|")
    got += framer.feed(b"more junk\r")
    got += framer.feed(b"and more" + frame(msg("G1")) + b"xx")
    assert [(f.kind, f.data, f.size) for f in got] == [
        ("garbage", b"MSH|not framed|more junk\rand more", 33),
        ("message", msg("G1"), len(msg("G1"))),
    ]
    assert [(f.kind, f.data) for f in framer.finish()] == [("garbage", b"xx")]


def test_a_long_garbage_run_keeps_only_its_head() -> None:
    framer = MllpFramer(1 << 20)
    junk = b"x" * (HEAD_BYTES + 5000)
    got = feed_all(framer, [junk[:1000], junk[1000:], SB])
    assert len(got) == 1 and got[0].kind == "garbage" and got[0].size == len(junk)
    assert got[0].data == junk[:HEAD_BYTES]


def test_too_large_frame_is_discarded_as_it_arrives() -> None:
    limit = 100_000
    framer = MllpFramer(limit)
    big = msg("BIG1") + b"OBX|" + b"7" * 3_000_000 + b"\r"
    stream = frame(big) + frame(msg("OK1"))
    chunk = 65536
    peak, got = 0, []
    for i in range(0, len(stream), chunk):
        got += framer.feed(stream[i : i + chunk])
        peak = max(peak, framer.buffered)
    assert peak <= limit + chunk + HEAD_BYTES  # never the whole frame
    assert [f.kind for f in got] == ["too-large", "message"]
    assert got[0].size == len(big) and got[0].data == big[:HEAD_BYTES]
    assert got[1].data == msg("OK1")
    # a too-large frame arriving in one piece
    got = MllpFramer(1000).feed(frame(b"M" * 5000) + frame(b"MSH|ok"))
    assert [(f.kind, f.size, len(f.data)) for f in got] == [
        ("too-large", 5000, 5000),
        ("message", 6, 6),
    ]


def test_unfinished_frames_are_truncated() -> None:
    framer = MllpFramer(1 << 20)
    assert framer.feed(SB + b"MSH|^~\\&|part") == [] and framer.in_frame
    assert [(f.kind, f.data) for f in framer.finish()] == [("truncated", b"MSH|^~\\&|part")]
    assert not framer.in_frame
    # a too-large frame cut off
    framer = MllpFramer(10)
    framer.feed(SB + b"A" * 50)
    assert [(f.kind, f.size) for f in framer.finish()] == [("truncated", 50)]
    # a new start block before the end block: the sender gave up on the first frame
    got = MllpFramer(1 << 20).feed(SB + b"MSH|abandoned" + frame(msg("R1")))
    assert [(f.kind, f.data) for f in got] == [
        ("truncated", b"MSH|abandoned"),
        ("message", msg("R1")),
    ]


# --- the server ---------------------------------------------------------------------------------------


def test_frames_split_across_many_reads_and_many_in_one(run: Runner) -> None:
    async def main() -> None:
        rec = Recorder()
        server = await started(rec)
        reader, writer = await connect(server)
        data = frame(msg("S1", 30))
        for i in range(0, len(data), 7):  # many small reads on the server's side
            writer.write(data[i : i + 7])
            await writer.drain()
            await asyncio.sleep(0.001)
        assert acked(await reply(reader)) == b"S1"
        writer.write(b"".join(frame(msg(f"B{i}")) + b"\r\n" for i in range(20)))
        for i in range(20):
            assert (await reply(reader)).endswith(b"MSA|AA|B%d" % i)
        assert rec.messages[0] == msg("S1", 30) and len(rec.messages) == 21
        assert rec.peers[0].host == "127.0.0.1" and not rec.peers[0].tls
        assert rec.peers[0].certificate is None
        (conn,) = server.connections
        sock = conn._transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        writer.close()
        await server.stop()

    run(main())


def test_messages_on_one_connection_are_handled_in_order_one_at_a_time(run: Runner) -> None:
    async def main() -> None:
        rnd = random.Random(3)
        rec = Recorder(delay=lambda _raw: rnd.random() / 200)
        server = await started(rec)
        clients = [await connect(server) for _ in range(4)]
        for n, (_, w) in enumerate(clients):  # pipelined: all sent before any ACK
            w.write(b"".join(frame(msg(f"C{n}-{i}")) for i in range(30)))
        for n, (r, _) in enumerate(clients):
            got = [acked(await reply(r)) for _ in range(30)]
            assert got == [f"C{n}-{i}".encode() for i in range(30)]
        assert max(rec.max_running.values()) == 1  # never two calls at once per connection
        for _, w in clients:
            w.close()
        await server.stop()

    run(main())


def test_garbage_and_too_large_are_rejected_and_the_connection_stays_usable(run: Runner) -> None:
    async def main() -> None:
        rec = Recorder()
        server = await started(rec, max_message_bytes=100_000)
        reader, writer = await connect(server)
        writer.write(b"MSH|^~\\&|unframed\r")
        writer.write(frame(msg("AFTER-GARBAGE")))
        assert await reply(reader) == b"REJECTED|garbage|18"
        assert acked(await reply(reader)) == b"AFTER-GARBAGE"

        big = msg("HUGE") + b"OBX|" + b"9" * 4_000_000 + b"\r"
        data = frame(big)
        peak = 0
        for i in range(0, len(data), 65536):
            writer.write(data[i : i + 65536])
            await writer.drain()
            await asyncio.sleep(0)
            peak = max([peak, *(c._framer.buffered for c in server.connections)])
        assert await reply(reader, 20) == b"REJECTED|too-large|%d" % len(big)
        # the head is there to build an ACK from, and nothing near 4 MB was ever held
        assert rec.rejects[-1][1] == big[:HEAD_BYTES] and peak < 1_000_000
        writer.write(frame(msg("NEXT")))
        assert acked(await reply(reader)) == b"NEXT"
        assert [k for k, _, _ in rec.rejects] == ["garbage", "too-large"]
        writer.close()
        await server.stop()

    run(main())


def test_a_frame_cut_off_by_the_peer_closing_is_truncated(run: Runner) -> None:
    async def main() -> None:
        rec = Recorder()
        server = await started(rec)
        reader, writer = await connect(server)
        writer.write(frame(msg("FULL")) + SB + b"MSH|^~\\&|LABAPP|LAB01|half")
        assert acked(await reply(reader)) == b"FULL"
        writer.close()
        await writer.wait_closed()
        for _ in range(100):
            if rec.rejects:
                break
            await asyncio.sleep(0.02)
        assert rec.rejects == [("truncated", b"MSH|^~\\&|LABAPP|LAB01|half", 26)]
        await server.stop()

    run(main())


def test_idle_timeout_closes_and_reports_a_partial_frame(run: Runner) -> None:
    async def main() -> None:
        rec = Recorder()
        server = await started(rec, idle_timeout_seconds=0.3)
        reader, writer = await connect(server)
        writer.write(SB + b"MSH|^~\\&|stalled")
        assert await closed_by_server(reader)
        assert rec.rejects == [("truncated", b"MSH|^~\\&|stalled", 16)]
        writer.close()
        # a silent connection is closed too, with nothing to report
        reader, writer = await connect(server)
        assert await closed_by_server(reader)
        assert len(rec.rejects) == 1
        # activity keeps a connection open past the timeout
        reader, writer = await connect(server)
        for i in range(4):
            await asyncio.sleep(0.15)
            writer.write(frame(msg(f"K{i}")))
            assert acked(await reply(reader)) == b"K%d" % i
        writer.close()
        await server.stop()

    run(main())


def test_a_slow_handler_is_not_an_idle_connection(run: Runner) -> None:
    async def main() -> None:
        server = await started(Recorder(delay=lambda _r: 0.6), idle_timeout_seconds=0.2)
        reader, writer = await connect(server)
        writer.write(frame(msg("SLOW")))
        assert acked(await reply(reader)) == b"SLOW"
        writer.close()
        await server.stop()

    run(main())


def test_a_handler_that_raises_closes_only_its_connection(
    capsys: pytest.CaptureFixture[str], run: Runner
) -> None:
    async def main() -> None:
        rec = Recorder(fail=lambda raw: control_of(raw) == b"BOOM")
        server = await started(rec)
        errors_before = mllp.HANDLER_ERRORS._value.get()
        bad_r, bad_w = await connect(server)
        good_r, good_w = await connect(server)
        bad_w.write(frame(msg("FINE")) + frame(msg("BOOM")) + frame(msg("NEVER")))
        assert acked(await reply(bad_r)) == b"FINE"
        assert await closed_by_server(bad_r)
        good_w.write(frame(msg("STILL")))
        assert acked(await reply(good_r)) == b"STILL"
        assert b"NEVER" not in b"".join(rec.messages)
        assert mllp.HANDLER_ERRORS._value.get() == errors_before + 1
        # and new connections are accepted
        r, w = await connect(server)
        w.write(frame(msg("NEW")))
        assert acked(await reply(r)) == b"NEW"
        for wr in (bad_w, good_w, w):
            wr.close()
        await server.stop()

    run(main())
    logged = capsys.readouterr()
    assert "mllp.handler.failed" in logged.err + logged.out
    assert "must never be logged" not in logged.err + logged.out


def test_many_concurrent_connections(run: Runner) -> None:
    async def main() -> None:
        rec = Recorder(delay=lambda _r: 0.001)
        server = await started(rec)

        async def client(n: int) -> list[bytes]:
            reader, writer = await connect(server)
            got = []
            for i in range(10):
                writer.write(frame(msg(f"M{n}-{i}")))
                got.append(acked(await reply(reader)))
            writer.close()
            return got

        results = await asyncio.gather(*(client(n) for n in range(100)))
        for n, got in enumerate(results):
            assert got == [f"M{n}-{i}".encode() for i in range(10)]
        assert len(rec.messages) == 1000
        await server.stop()

    run(main())


def test_a_sender_that_pipelines_far_ahead_is_paced_not_dropped(run: Runner) -> None:
    async def main() -> None:
        rec = Recorder(delay=lambda _r: 0.0005)
        server = await started(rec)
        reader, writer = await connect(server)
        writer.write(b"".join(frame(msg(f"P{i}")) for i in range(500)))
        got = [acked(await reply(reader)) for _ in range(500)]
        assert got == [f"P{i}".encode() for i in range(500)]
        writer.close()
        await server.stop()

    run(main())


def test_a_peer_that_stops_reading_replies_is_closed_as_idle(run: Runner) -> None:
    class BigReplies(Recorder):
        async def handle(self, raw: bytes, peer: Peer) -> list[bytes]:
            await super().handle(raw, peer)
            return [b"MSH|" + b"R" * (1 << 20)]  # 1 MiB: the socket buffers fill quickly

    async def main() -> None:
        rec = BigReplies()
        server = await started(rec, idle_timeout_seconds=0.5)
        reader, writer = await connect(server)
        writer.write(b"".join(frame(msg(f"N{i}")) for i in range(60)))  # never reads
        for _ in range(200):
            if not server.connections:
                break
            await asyncio.sleep(0.05)
        assert server.connections == set()
        # what it had received whole is still handled (the replies cannot be sent)
        for _ in range(200):
            if len(rec.messages) == 60:
                break
            await asyncio.sleep(0.05)
        assert len(rec.messages) == 60
        writer.close()
        await server.stop()

    run(main())


def test_replies_still_owed_are_sent_after_the_peer_half_closes(run: Runner) -> None:
    async def main() -> None:
        server = await started(Recorder(delay=lambda _r: 0.05))
        reader, writer = await connect(server)
        writer.write(frame(msg("H1")) + frame(msg("H2")))
        writer.write_eof()
        assert acked(await reply(reader)) == b"H1"
        assert acked(await reply(reader)) == b"H2"
        assert await closed_by_server(reader)
        writer.close()
        await server.stop()

    run(main())


def test_stop_finishes_the_message_in_hand_and_leaves_nothing_running(run: Runner) -> None:
    async def main() -> None:
        open_before = mllp.CONNECTIONS._value.get()
        rec = Recorder(delay=lambda raw: 0.3 if control_of(raw) == b"INHAND" else 0)
        server = await started(rec)
        port = server.port
        clients = [await connect(server) for _ in range(5)]
        reader, writer = clients[0]
        writer.write(frame(msg("INHAND")) + frame(msg("QUEUED")))
        await rec.started.wait()
        await asyncio.sleep(0.01)
        assert mllp.CONNECTIONS._value.get() == open_before + 5
        await server.stop()
        # the message being handled got its ACK; the one behind it is left to be sent again
        assert acked(await reply(reader)) == b"INHAND"
        assert await closed_by_server(reader)
        for r, _ in clients[1:]:
            assert await closed_by_server(r)
        assert [control_of(m) for m in rec.messages] == [b"INHAND"]
        assert server.connections == set()
        assert mllp.CONNECTIONS._value.get() == open_before
        assert asyncio.all_tasks() == {asyncio.current_task()}
        for _, w in clients:
            w.close()
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)

    run(main())


def test_stop_with_a_handler_that_never_returns_cancels_it_after_the_grace(run: Runner) -> None:
    async def main() -> None:
        rec = Recorder(delay=lambda _r: 3600)
        server = await started(rec)
        reader, writer = await connect(server)
        writer.write(frame(msg("HANG")))
        await rec.started.wait()
        await server.stop(grace_seconds=0.2)
        assert await closed_by_server(reader)
        assert asyncio.all_tasks() == {asyncio.current_task()}
        writer.close()

    run(main())


def test_frames_are_counted_by_outcome(run: Runner) -> None:
    def count(kind: str) -> float:
        return float(mllp.FRAMES.labels(kind=kind)._value.get())

    async def main() -> None:
        before = {k: count(k) for k in mllp.FRAME_KINDS}
        server = await started(Recorder(), max_message_bytes=150)
        reader, writer = await connect(server)
        writer.write(b"junk" + frame(msg("C", 0)) + frame(b"X" * 200) + SB + b"cut")
        await reply(reader)
        await reply(reader)
        await reply(reader)
        writer.close()
        for _ in range(100):
            if count("truncated") > before["truncated"]:
                break
            await asyncio.sleep(0.02)
        after = {k: count(k) - before[k] for k in mllp.FRAME_KINDS}
        assert after == {"message": 1, "too-large": 1, "garbage": 1, "truncated": 1}
        await server.stop()

    run(main())


def test_the_thread_runner_serves_beside_another_loop(settings_for: Any) -> None:
    settings = settings_for(mllp_port=0, mllp_max_message_bytes=4096, mllp_idle_timeout_seconds=5)
    server = mllp_server_from_settings(settings, Recorder())
    assert server.ssl_context is None and server.max_message_bytes == 4096
    thread = MllpThread(server)
    thread.start()
    port = thread.port
    try:
        assert port > 0
        with socket.create_connection(("127.0.0.1", thread.port), timeout=5) as s:
            s.sendall(frame(msg("T1")))
            data = b""
            while not data.endswith(TRAILER):
                data += s.recv(4096)
        assert acked(data[1:-2]) == b"T1"
        # a second server on the same port cannot start, and says why
        clash = MllpThread(MllpServer(Recorder(), host="127.0.0.1", port=thread.port))
        with pytest.raises(OSError):
            clash.start()
    finally:
        thread.stop()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), 1):
        pass


def test_settings_that_make_no_sense_are_refused() -> None:
    with pytest.raises(ValueError):
        MllpServer(Recorder(), max_message_bytes=0)
    with pytest.raises(ValueError):
        MllpServer(Recorder(), idle_timeout_seconds=0)
