"""A userspace TCP proxy that adds a fixed one-way delay in each direction: the stand-in for netem delay,
which the kernels nephele is tested on lack. Rate limiting stays in the kernel (tbf on the node links).

Each accepted connection gets a fresh connection to the target; every chunk read from one side is released
to the other side `delay` seconds after it was read, so a request/response pair through the proxy sees an
extra round trip of 2 x delay. Per direction at most `max_buffer` bytes wait in the delay line; when it is
full the proxy stops reading, so TCP flow control pushes back to the sender instead of memory growing.

Limits: TCP only (one proxy per port pair); the delay is per chunk, not per packet, so it does not model
jitter, loss or reordering, and a slow consumer adds its own queueing on top. Half-close is forwarded.

Run one: `python -m nephele.cloudlet.delayproxy LISTEN_HOST:PORT TARGET_HOST:PORT --delay-ms 20`
(inside a cloudlet node: `Cloudlet.start_delay_proxy(...)`, or `nephele cloudlet proxy`). It prints
`LISTENING host:port` on stdout once it accepts connections.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import sys
import time
from collections.abc import Sequence

CHUNK = 64 * 1024


class _DelayLine:
    """One direction: bytes read at t are written at t + delay; bounded in buffered bytes."""

    def __init__(self, delay: float, max_buffer: int) -> None:
        self.delay = delay
        self.max_buffer = max_buffer
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.buffered = 0
        self.cond = asyncio.Condition()

    async def pump_in(self, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                data = await reader.read(CHUNK)
            except (ConnectionError, OSError):
                data = b""
            async with self.cond:
                await self.cond.wait_for(lambda: self.buffered < self.max_buffer)
                self.queue.append((time.monotonic() + self.delay, data))
                self.buffered += len(data)
                self.cond.notify_all()
            if not data:
                return

    async def pump_out(self, writer: asyncio.StreamWriter) -> None:
        while True:
            async with self.cond:
                await self.cond.wait_for(lambda: bool(self.queue))
                due, data = self.queue[0]
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            async with self.cond:
                self.queue.popleft()
                self.buffered -= len(data)
                self.cond.notify_all()
            if not data:
                with contextlib.suppress(OSError, RuntimeError):
                    if writer.can_write_eof():
                        writer.write_eof()
                return
            writer.write(data)
            await writer.drain()


async def _handle(
    client_r: asyncio.StreamReader,
    client_w: asyncio.StreamWriter,
    target: tuple[str, int],
    delay: float,
    max_buffer: int,
) -> None:
    try:
        target_r, target_w = await asyncio.open_connection(*target)
    except OSError:
        client_w.close()
        return
    up, down = _DelayLine(delay, max_buffer), _DelayLine(delay, max_buffer)
    tasks = [
        asyncio.ensure_future(up.pump_in(client_r)),
        asyncio.ensure_future(up.pump_out(target_w)),
        asyncio.ensure_future(down.pump_in(target_r)),
        asyncio.ensure_future(down.pump_out(client_w)),
    ]
    try:
        # A reset on either side ends the connection; a clean EOF both ways ends it too.
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for t in done:
            t.exception()  # retrieved: a reset is a normal way for a proxied connection to end
    finally:
        for w in (client_w, target_w):
            w.close()


async def serve(
    listen: tuple[str, int],
    target: tuple[str, int],
    delay_ms: float,
    *,
    max_buffer: int = 4 << 20,
    duration: float | None = None,
) -> None:
    delay = max(0.0, delay_ms) / 1000.0

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _handle(r, w, target, delay, max_buffer)

    server = await asyncio.start_server(handler, listen[0], listen[1], reuse_address=True)
    host, port = server.sockets[0].getsockname()[:2]
    print(f"LISTENING {host}:{port}", flush=True)
    async with server:
        if duration is None:
            await server.serve_forever()
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.serve_forever(), duration)


def parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host, int(port)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nephele.cloudlet.delayproxy", description="TCP delay proxy")
    p.add_argument("listen", type=parse_hostport, help="HOST:PORT to accept on (port 0: any free port)")
    p.add_argument("target", type=parse_hostport, help="HOST:PORT to forward to")
    p.add_argument("--delay-ms", type=float, default=20.0, help="one-way delay per direction (default 20)")
    p.add_argument("--max-buffer", type=int, default=4 << 20, help="bytes held per direction (default 4 MiB)")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    a = p.parse_args(argv)
    try:
        asyncio.run(serve(a.listen, a.target, a.delay_ms, max_buffer=a.max_buffer, duration=a.duration))
    except KeyboardInterrupt:
        return 0
    except OSError as exc:
        print(f"delayproxy: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
