"""The node's agent daemon: one long-lived process per node root that answers the controller's resident
sessions (read-only ops, protocol.RESIDENT_OPS) without a Python start per SSH connection.

A fresh SSH connection costs the node ~30 ms of CPU for sshd; starting `nephele agent serve` on it cost
~150-220 ms more (the interpreter, nephele's and libvirt's imports). With the daemon, a connection runs
only `socat` to the daemon's unix socket, and the daemon forks a child, imports already done, that serves
the connection exactly as `serve` would (server.serve, one hello then one response per request).

    controller: [ -S <root>/run/agent-v<N>.sock ] && exec socat - UNIX-CONNECT:<root>/run/agent-v<N>.sock
                NEPHELE_AGENT_DAEMON=1 exec nephele agent serve
                (ssh.py: no daemon yet, or a stale socket: this connection gets its own `serve` as
                before, and that `serve` starts the daemon for the next ones)
    node:       serve with NEPHELE_AGENT_DAEMON=1  ->  start_in_background(root)  ->  run(socket)

Lifetime and safety:
- one daemon per socket: it holds an flock on `<socket>.lock` (which names its pid) for its whole life,
  so of two `serve`s starting at once one daemon is left; a socket whose daemon died (SIGKILL) is
  stale and replaced.
- the socket's directory is 0700 and the socket 0600; a peer with another uid is refused (SO_PEERCRED).
- it exits after DAEMON_IDLE seconds without a connection, on SIGTERM, and when its socket is removed
  or replaced (the node's root deleted, a newer daemon).
- new code: when a nephele source file it loaded has changed (an upgrade, an edit), it stops listening and
  serves the waiting connection with a freshly exec'd `serve` (the next connection starts a new daemon).
- the parent never opens libvirt or starts a thread, so each forked child starts clean.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import select
import shutil
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

from nephele.agent.protocol import PROTOCOL_VERSION

# The daemon leaves after this long without a connection: a node keeps ~35 MiB for it while a controller
# calls (a plan, an apply, a watch loop), nothing once they stop.
DAEMON_IDLE = 900.0
# How often an idle daemon checks that its socket is still its own.
CHECK_EVERY = 5.0
# Set by the controller on a `nephele agent serve` that should start the daemon (an environment variable,
# not a flag: an older nephele's `serve` ignores it and still serves).
DAEMON_ENV = "NEPHELE_AGENT_DAEMON"
# sockaddr_un's sun_path holds 108 bytes with the terminating NUL.
MAX_SOCKET_PATH = 107


def socket_path(root: str | Path) -> str:
    """Where the daemon of node root `root` listens (the controller computes the same path)."""
    return f"{root}/run/agent-v{PROTOCOL_VERSION}.sock"


def _log(path: str, text: str) -> None:
    with contextlib.suppress(OSError), open(path + ".log", "a") as f:
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} [{os.getpid()}] {text}\n")


def code_stamp() -> tuple[tuple[str, int, int], ...]:
    """(path, size, mtime) of every nephele source file this process has loaded: a change means new code
    on disk that a forked child would not run."""
    pkg = str(Path(__file__).resolve().parent.parent) + os.sep
    out = []
    for mod in list(sys.modules.values()):
        f = getattr(mod, "__file__", None)
        if isinstance(f, str) and f.startswith(pkg):
            try:
                st = os.stat(f)
            except OSError:
                out.append((f, -1, -1))
                continue
            out.append((f, st.st_size, st.st_mtime_ns))
    return tuple(sorted(out))


def start_in_background(root: str | Path) -> None:
    """Start the daemon for `root`, detached, unless it cannot work here (no socat for the controller to
    reach it, a socket path too long) or one is already running (it finds the lock taken and leaves).
    Returns at once; never raises: the caller serves its own connection either way."""
    path = socket_path(root)
    if shutil.which("socat") is None or len(path.encode()) > MAX_SOCKET_PATH:
        return
    try:
        pid = os.fork()
    except OSError:
        return
    if pid:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        return
    # The intermediate child: a new session, so the SSH session's hang-up does not reach the daemon.
    try:
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):  # not the caller's handlers
            signal.signal(sig, signal.SIG_DFL)
        os.setsid()
        if os.fork():
            os._exit(0)
        # Nothing of the SSH session may stay open in the daemon, or sshd would wait for it to close.
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.closerange(3, 65536)
        os.chdir("/")  # pin no directory (a mount the node may want to remove)
        with contextlib.suppress(OSError):  # what ps and top show for it
            Path("/proc/self/comm").write_text("nephele-agentd")
        rc = run(path)
    except BaseException:  # a detached process has nobody to report to but its log
        import traceback

        _log(path, "daemon failed:\n" + traceback.format_exc())
        rc = 1
    os._exit(rc)


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


def _still_ours(path: str, ino: int) -> bool:
    try:
        return os.stat(path).st_ino == ino
    except OSError:
        return False


def run(path: str, *, idle: float = DAEMON_IDLE, check_every: float = CHECK_EVERY) -> int:
    """The daemon's accept loop (module docstring). Returns 0 when it leaves normally, 0 at once if another
    daemon holds the socket."""
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # Reaped here, not by the kernel (SIG_IGN), so their CPU time adds up in the daemon's, as a shell's would.
    signal.signal(signal.SIGCHLD, _reap)
    # A SIGTERM waits until the loop below can clean up after it (socket, log), even one sent as it starts.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    run_dir = os.path.dirname(path)
    os.makedirs(run_dir, mode=0o700, exist_ok=True)
    os.chmod(run_dir, 0o700)
    lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        return 0
    os.ftruncate(lock, 0)
    os.write(lock, f"{os.getpid()}\n".encode())  # who holds it: for `kill`, ps and the benchmark
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # a stale socket: its daemon would hold the lock
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        listener.bind(path)
    finally:
        os.umask(old_umask)
    listener.listen(64)
    ino = os.stat(path).st_ino
    stamp = code_stamp()
    _log(path, f"listening (nephele agent daemon, protocol {PROTOCOL_VERSION})")
    last = time.monotonic()
    why = "idle"
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        while True:
            ready, _, _ = select.select([listener], [], [], check_every)
            if not ready:
                if not _still_ours(path, ino):
                    why = "socket removed or replaced"
                    break
                if time.monotonic() - last > idle:
                    break
                continue
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            last = time.monotonic()
            if _peer_uid(conn) != os.getuid():
                conn.close()
                continue
            if code_stamp() != stamp:
                why = "nephele's code changed"
                if _still_ours(path, ino):
                    os.unlink(path)
                _in_child(conn, functools.partial(_exec_serve, conn))
                break
            _in_child(conn, functools.partial(_serve_forked, conn, listener, lock))
    except _Stopped:
        why = "SIGTERM"
    finally:
        listener.close()
        if _still_ours(path, ino):
            with contextlib.suppress(OSError):
                os.unlink(path)
        _log(path, f"leaving: {why}")
        os.close(lock)
    return 0


class _Stopped(Exception):
    """SIGTERM: raised out of the daemon's wait (a flag would wait for the next check)."""


def _stop(_signum: int, _frame: object) -> None:
    raise _Stopped


def _reap(_signum: int, _frame: object) -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def _in_child(conn: socket.socket, work: Callable[[], int]) -> None:
    """Run `work` for connection `conn` in a forked child (which exits with its status); the daemon
    keeps listening and closes its copy of `conn`."""
    try:
        pid = os.fork()
    except OSError:
        conn.close()
        return
    if pid:
        conn.close()
        return
    rc = 1
    try:
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):  # the daemon's handlers, not the child's
            signal.signal(sig, signal.SIG_DFL)
        rc = work()
    finally:
        os._exit(rc)


def _serve_forked(conn: socket.socket, listener: socket.socket, lock: int) -> int:
    """In a child: serve the connection as `serve` would, with the daemon's imports."""
    from nephele.agent.server import serve

    listener.close()
    os.close(lock)  # the lock is the daemon's life, not its children's
    with contextlib.suppress(OSError):
        Path("/proc/self/comm").write_text("nephele-agent")
    fd = conn.detach()
    requests = os.fdopen(fd, "rb", buffering=0)
    responses = os.fdopen(os.dup(fd), "wb")
    stderr = open(os.devnull, "w")  # noqa: SIM115 - lives as long as this child
    return serve(requests, responses, stderr)


def _exec_serve(conn: socket.socket) -> int:
    """In a child: serve the connection with the code now on disk (a fresh `nephele agent serve`)."""
    fd = conn.fileno()
    os.dup2(fd, 0)
    os.dup2(fd, 1)
    os.execv(sys.executable, [sys.executable, "-m", "nephele", "agent", "serve"])
