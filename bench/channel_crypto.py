#!/usr/bin/env python3
"""What encrypting the handoff channels costs: plain vs encrypted throughput and CPU on loopback.

    python bench/channel_crypto.py [--mib 256] [--small-mib 32] [--repeat 3]

One real handoff port (``HandoffListener``) and one real channel (``connect_channel``) per run on
127.0.0.1, a sender thread with ``MsgSender`` and a receiver thread with ``MsgReader``, as the channels'
users do. Two message patterns:

- bulk: 1 MiB messages (the memory channel's delta batches), ``--mib`` per run;
- small: 4 KiB messages (NBD requests and libvirt RPC on the disk and control channels), ``--small-mib``.

The receiver runs in a process of its own, as the destination node does. For each pattern it prints MB/s
at memory speed (loopback: CPU-bound, both ends share this machine's cores), CPU seconds per GB of the
sending and the receiving thread (getrusage(RUSAGE_THREAD)), and what that CPU time means on a 100 Mbit/s
link (percent of one core, both ends together). Ratios encrypted/plain are the figures to quote; the
fastest of ``--repeat`` runs counts.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import resource
import socket
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nephele.handoff import channel as ch

LINK_BYTES_PER_S = 100e6 / 8  # 100 Mbit/s


@dataclass
class Run:
    seconds: float
    tx_cpu: float  # sender thread CPU seconds
    rx_cpu: float  # receiver thread CPU seconds
    payload: int

    @property
    def cpu(self) -> float:
        return self.tx_cpu + self.rx_cpu

    @property
    def mb_s(self) -> float:
        return self.payload / self.seconds / 1e6

    @property
    def cpu_per_gb(self) -> float:
        return self.cpu / (self.payload / 1e9)

    @property
    def link_core_pct(self) -> float:
        return 100 * self.cpu * LINK_BYTES_PER_S / self.payload


def thread_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_THREAD)
    return r.ru_utime + r.ru_stime


def _receiver(conn: Connection, hid: bytes, token: bytes, encrypt: bool) -> None:
    """The destination end, in a process of its own (as on a real node: its own GIL)."""
    lst = ch.HandoffListener("127.0.0.1", 0, hid, token, encrypt=encrypt)
    accepted: queue.Queue[ch.Accepted] = queue.Queue()
    threading.Thread(target=lst.accept_loop, args=(accepted.put,), daemon=True).start()
    conn.send(lst.port)
    server = accepted.get(timeout=30).sock
    c0 = thread_cpu()
    rx = ch.MsgReader(server)
    got = 0
    while (m := rx.read()) is not None:
        got += len(m[1])
    conn.send((got, thread_cpu() - c0))
    server.close()
    lst.close()


def one_run(encrypt: bool, msg_size: int, total: int) -> Run:
    hid, token = ch.new_handoff_id(), ch.new_token()
    parent, child = mp.get_context("fork").Pipe()
    proc = mp.get_context("fork").Process(target=_receiver, args=(child, hid, token, encrypt))
    proc.start()
    port = parent.recv()
    client = ch.connect_channel("127.0.0.1", port, hid, token, ch.MEMORY, encrypt=encrypt)
    payload = os.urandom(msg_size)
    count = max(1, total // msg_size)
    t0 = time.perf_counter()
    c0 = thread_cpu()
    tx = ch.MsgSender(client)
    for _ in range(count):
        tx.send(1, payload)
    client.shutdown(socket.SHUT_RDWR)  # the end (an encrypted channel sends its close record)
    tx_cpu = thread_cpu() - c0
    got, rx_cpu = parent.recv()
    seconds = time.perf_counter() - t0
    client.close()
    proc.join(30)
    if got != count * msg_size:
        raise SystemExit(f"lost data: {got} of {count * msg_size} bytes arrived")
    return Run(seconds, tx_cpu, rx_cpu, got)


def best(encrypt: bool, msg_size: int, total: int, repeat: int) -> Run:
    runs = [one_run(encrypt, msg_size, total) for _ in range(repeat)]
    return min(runs, key=lambda r: r.seconds)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=256, help="bulk bytes per run (1 MiB messages)")
    ap.add_argument("--small-mib", type=int, default=32, help="bytes per run in 4 KiB messages")
    ap.add_argument("--repeat", type=int, default=3, help="runs per cell; the fastest counts")
    a = ap.parse_args()
    rec = ch.MAX_RECORD >> 10
    print(f"handoff channel on loopback, {os.cpu_count()} CPUs, AES-256-GCM records of {rec} KiB")
    head = f"{'pattern':<22}{'mode':<11}{'MB/s':>9}{'tx s/GB':>9}{'rx s/GB':>9}{'core % @100Mbit/s':>19}"
    print(head)
    print("-" * len(head))
    for label, size, total in (
        ("bulk (1 MiB msgs)", 1 << 20, a.mib << 20),
        ("small (4 KiB msgs)", 4 << 10, a.small_mib << 20),
    ):
        plain = best(False, size, total, a.repeat)
        sealed = best(True, size, total, a.repeat)
        for mode, r in (("plain", plain), ("encrypted", sealed)):
            gb = r.payload / 1e9
            print(
                f"{label:<22}{mode:<11}{r.mb_s:>9.0f}{r.tx_cpu / gb:>9.2f}{r.rx_cpu / gb:>9.2f}"
                f"{r.link_core_pct:>18.2f}%"
            )
        print(
            f"{'':<22}encrypted/plain: {sealed.mb_s / plain.mb_s:.2f}x the MB/s, "
            f"{sealed.cpu_per_gb / plain.cpu_per_gb:.2f}x the CPU per GB; "
            f"at 100 Mbit/s {sealed.link_core_pct - plain.link_core_pct:.2f}% of one core more"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
