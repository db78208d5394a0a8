"""Tools for the MLLP benchmarks: a bare echo server (the ceiling) and a load client.

- :func:`run_echo_server` frames nothing but MLLP and answers every message at once with a
  fixed minimal ACK that copies its MSH-10 (found with one split, no parsing): what a socket
  and an event loop can do on this machine, the ceiling the hub's listener is compared to.
- :func:`run_load` opens N connections; each sends its messages one at a time and waits for
  the reply before the next (HL7 original-mode acknowledgement), recording each round trip's
  latency and the reply's MSA-1 code. ``rate`` paces the total to a target (messages per
  second) for "latency at half load"; without it every connection sends as fast as replies
  come back.

    .venv/bin/python bench/mllp_tools.py echo --port 2576
    .venv/bin/python bench/mllp_tools.py load --port 2576 --connections 8 --messages 20000
    .venv/bin/python bench/mllp_tools.py load --port 2575 --messages 10000 --rate 500

The messages are synthetic ORU^R01 results of about ``--size`` bytes (invented people).
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

SB = b"\x0b"
EB = b"\x1c"
TRAILER = b"\x1c\r"


# --- the echo server -----------------------------------------------------------------------------


def ack_for(message: bytes) -> bytes:
    """A minimal ACK (MSA-1 ``AA``) echoing MSH-10 of ``message``, found by one split of the
    first segment on its own field separator (MSH-1)."""
    sep = message[3:4] or b"|"
    msh = message.split(b"\r", 1)[0].split(sep)
    control = msh[9] if len(msh) > 9 else b""
    return (
        b"MSH" + sep + b"^~\\&" + sep + b"ECHO" + sep + b"BENCH" + sep * 5 + b"ACK" + sep
        + b"A" + control + sep + b"P" + sep + b"2.5.1\rMSA" + sep + b"AA" + sep + control
    )  # fmt: skip


class _Echo(asyncio.Protocol):
    """One connection of the echo server: frames by ``bytes.find``, answers each message."""

    def __init__(self) -> None:
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        out = []
        pos = 0
        while True:
            end = buf.find(EB, pos)
            if end < 0:
                break
            start = buf.find(SB, pos, end)
            if start >= 0:
                out.append(SB + ack_for(buf[start + 1 : end]) + TRAILER)
            pos = end + 1
        self.buf = buf[pos:]
        if out and self.transport is not None:
            self.transport.write(b"".join(out))


async def start_echo_server(host: str = "127.0.0.1", port: int = 0) -> asyncio.Server:
    """Start the echo server (port 0: any free port, see ``server.sockets``)."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(_Echo, host, port, backlog=1024)


async def run_echo_server(host: str = "127.0.0.1", port: int = 2576) -> None:
    """Run the echo server until cancelled."""
    server = await start_echo_server(host, port)
    async with server:
        await server.serve_forever()


# --- the load client -----------------------------------------------------------------------------


@dataclass
class LoadResult:
    """What a load run measured."""

    count: int = 0  # replies received
    elapsed: float = 0.0  # seconds, first send to last reply
    latencies: list[float] = field(default_factory=list)  # seconds, one per reply
    codes: Counter[str] = field(default_factory=Counter)  # MSA-1 of each reply
    errors: list[str] = field(default_factory=list)  # connections that failed, and why

    @property
    def rate(self) -> float:
        """Replies per second."""
        return self.count / self.elapsed if self.elapsed else 0.0

    def percentile(self, p: float) -> float:
        """Latency percentile ``p`` (0–100) in seconds (nearest rank)."""
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        k = min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))
        return ordered[k]


def msa_code(reply: bytes) -> str:
    """MSA-1 of an ACK (``"?"`` when it has no MSA segment)."""
    at = reply.find(b"\rMSA")
    if at < 0:
        return "?"
    sep = reply[3:4] or b"|"
    return reply[at + 5 :].split(sep, 1)[0].split(b"\r", 1)[0].decode("ascii", "replace")


def split(messages: Sequence[bytes], connections: int) -> list[list[bytes]]:
    """``messages`` dealt round-robin to ``connections`` lists."""
    return [list(messages[i::connections]) for i in range(connections)]


async def run_load(
    host: str,
    port: int,
    per_connection: Sequence[Sequence[bytes]],
    *,
    rate: float | None = None,
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = 30.0,
) -> LoadResult:
    """Send each list of ``per_connection`` on its own connection, one message at a time,
    waiting for each reply; ``rate`` paces the total to that many messages per second."""
    result = LoadResult()
    n = len(per_connection)
    interval = n / rate if rate else 0.0  # between two sends on one connection

    async def one(index: int, messages: Sequence[bytes], t0: float) -> None:
        try:
            reader, writer = await asyncio.open_connection(host, port, ssl=ssl_context)
        except OSError as exc:
            result.errors.append(f"connection {index}: {exc}")
            return
        try:
            for i, msg in enumerate(messages):
                if interval:
                    # staggered so the connections do not all send at the same instant
                    due = t0 + (i + index / n) * interval
                    wait = due - time.perf_counter()
                    if wait > 0:
                        await asyncio.sleep(wait)
                sent = time.perf_counter()
                writer.write(SB + msg + TRAILER)
                reply = await asyncio.wait_for(reader.readuntil(TRAILER), timeout)
                result.latencies.append(time.perf_counter() - sent)
                result.codes[msa_code(reply.lstrip(b"\r\n" + SB))] += 1
                result.count += 1
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            result.errors.append(f"connection {index}: {type(exc).__name__} {exc}")
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i, msgs, t0) for i, msgs in enumerate(per_connection)))
    result.elapsed = time.perf_counter() - t0
    return result


# --- synthetic messages --------------------------------------------------------------------------


def synthetic_oru(i: int, size: int = 2048) -> bytes:
    """A synthetic ORU^R01 (an invented patient's glucose panel) of about ``size`` bytes with
    control id ``BENCH<i>``."""
    head = (
        f"MSH|^~\\&|LABAPP|LAB01|HIE|HUB|20260115103000+0300||ORU^R01^ORU_R01|BENCH{i:09d}|P|2.5.1"
        f"|||AL|NE||UNICODE UTF-8\r"
        f"PID|1||{700000 + i % 50000}^^^LAB01^MR||Тестова^Анна^Сергеевна||19850312|F\r"
        f"OBR|1|ORD{i}|LAB{i}|24331-1^Lipid panel^LN|||20260115090000+0300\r"
    ).encode()
    obx = "OBX|{n}|NM|2345-7^Glucose^LN||{v}|mmol/L|3.9-6.1|N|||F|||20260115100000+0300\r"
    out = [head]
    total, n = len(head), 1
    while total < size:
        seg = obx.format(n=n, v=4 + (i + n) % 30 / 10).encode()
        out.append(seg)
        total += len(seg)
        n += 1
    return b"".join(out)


def _report(res: LoadResult) -> None:
    rows = [
        ("messages", f"{res.count}"),
        ("elapsed", f"{res.elapsed:.2f} s"),
        ("rate", f"{res.rate:,.0f} msg/s"),
        ("latency p50", f"{res.percentile(50) * 1000:.2f} ms"),
        ("latency p95", f"{res.percentile(95) * 1000:.2f} ms"),
        ("latency p99", f"{res.percentile(99) * 1000:.2f} ms"),
        ("MSA-1", ", ".join(f"{k} {v}" for k, v in sorted(res.codes.items())) or "-"),
        ("errors", str(len(res.errors))),
    ]
    for name, value in rows:
        print(f"{name:<14}{value}")
    for e in res.errors[:10]:
        print(f"  {e}")


def _loop_policy() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def main() -> None:
    """``echo`` runs the echo server; ``load`` runs the load client and prints a table."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="command", required=True)
    echo = sub.add_parser("echo", help="run the bare MLLP echo server")
    echo.add_argument("--host", default="127.0.0.1")
    echo.add_argument("--port", type=int, default=2576)
    load = sub.add_parser("load", help="send synthetic ORU^R01 messages and time the ACKs")
    load.add_argument("--host", default="127.0.0.1")
    load.add_argument("--port", type=int, default=2575)
    load.add_argument("--connections", type=int, default=8)
    load.add_argument("--messages", type=int, default=10000, help="in all")
    load.add_argument("--size", type=int, default=2048, help="bytes per message, about")
    load.add_argument("--rate", type=float, default=None, help="total messages per second")
    args = ap.parse_args()
    _loop_policy()
    if args.command == "echo":
        print(f"MLLP echo server on {args.host}:{args.port}")
        try:
            asyncio.run(run_echo_server(args.host, args.port))
        except KeyboardInterrupt:
            pass
        return
    msgs = [synthetic_oru(i, args.size) for i in range(args.messages)]
    res = asyncio.run(run_load(args.host, args.port, split(msgs, args.connections), rate=args.rate))
    _report(res)


if __name__ == "__main__":
    main()
