"""What wakes the watch daemon: file events (debounced), a git checkout moving forward, timers.

None of these carries state into a pass (level-triggered, GITOPS §3.1): each only says "look again".
The timing pieces take the clock as an argument so tests run them on a fake clock:

    Debouncer     a burst of file events becomes one wake-up, after `quiet` s without events
                  (at most `max_wait` s after the first one, so a file rewritten forever still counts)
    Backoff       per key (a node, "apply"): 1, 2, 4 ... s, capped, with jitter; reset on success
    jittered()    the periodic resync interval +-10%, so a fleet of daemons does not move in lockstep
    GitPoller     fetch the upstream of the checkout's branch and fast-forward to it (never merge,
                  never reset: a diverged or dirty checkout is reported and left alone)
    FileWatcher   watchdog on the manifest's directory, filtered to the manifest file itself
"""

from __future__ import annotations

import os
import random
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nephele.errors import NepheleError


class Debouncer:
    def __init__(self, quiet: float = 0.5, max_wait: float = 5.0) -> None:
        self.quiet = quiet
        self.max_wait = max_wait
        self._first: float | None = None
        self._last: float | None = None
        self._lock = threading.Lock()

    def touch(self, now: float) -> None:
        """An event happened at `now`."""
        with self._lock:
            if self._first is None:
                self._first = now
            self._last = now

    def deadline(self) -> float | None:
        """When the pending burst becomes due (None: nothing pending)."""
        with self._lock:
            if self._first is None or self._last is None:
                return None
            return min(self._last + self.quiet, self._first + self.max_wait)

    def take(self, now: float) -> bool:
        """True (once) when a burst is due at `now`; it is then cleared."""
        due = self.deadline()
        if due is None or now < due:
            return False
        with self._lock:
            self._first = self._last = None
        return True


@dataclass
class _Retry:
    attempts: int = 0
    next_at: float = 0.0
    delay: float = 0.0


class Backoff:
    """Capped exponential backoff per key. `failure` returns the delay until the next try."""

    def __init__(
        self,
        initial: float = 2.0,
        cap: float = 60.0,
        factor: float = 2.0,
        jitter: float = 0.1,
        rng: random.Random | None = None,
    ) -> None:
        self.initial, self.cap, self.factor, self.jitter = initial, cap, factor, jitter
        self.rng = rng or random.Random()
        self._keys: dict[str, _Retry] = {}

    def failure(self, key: str, now: float) -> float:
        r = self._keys.setdefault(key, _Retry())
        r.attempts += 1
        base = min(self.cap, self.initial * self.factor ** (r.attempts - 1))
        # Jitter only downwards, so the cap is a real upper bound.
        r.delay = base * (1.0 - self.jitter * self.rng.random())
        r.next_at = now + r.delay
        return r.delay

    def success(self, key: str) -> None:
        self._keys.pop(key, None)

    def failing(self, key: str) -> bool:
        return key in self._keys

    def due(self, key: str, now: float) -> bool:
        r = self._keys.get(key)
        return r is None or now >= r.next_at

    def next_at(self, key: str) -> float | None:
        r = self._keys.get(key)
        return r.next_at if r else None

    def attempts(self, key: str) -> int:
        r = self._keys.get(key)
        return r.attempts if r else 0

    def keys(self) -> list[str]:
        return list(self._keys)


def jittered(interval: float, rng: random.Random, fraction: float = 0.1) -> float:
    return interval * (1.0 + fraction * (2.0 * rng.random() - 1.0))


# --------------------------------------------------------------------------------------------- git

GitRunner = Callable[[list[str], Path], "subprocess.CompletedProcess[str]"]


def _run_git(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    # No prompts: a daemon must fail, not hang, when a remote wants credentials.
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C"}
    try:
        return subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False, env=env
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NepheleError(f"git {' '.join(args)} in {cwd}: {exc}") from exc


@dataclass(frozen=True)
class GitPoll:
    before: str
    after: str
    upstream: str

    @property
    def moved(self) -> bool:
        return self.before != self.after


class GitPoller:
    """Follows the upstream of the branch checked out at `path` (a git work tree)."""

    def __init__(self, path: Path, runner: GitRunner = _run_git) -> None:
        self.runner = runner
        top = self._git("rev-parse", "--show-toplevel", cwd=path, what=f"{path} is not in a git work tree")
        self.top = Path(top)

    def _git(self, *args: str, cwd: Path | None = None, what: str = "") -> str:
        proc = self.runner(list(args), cwd or self.top)
        if proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).strip().splitlines()
            msg = what or f"git {' '.join(args)} failed"
            raise NepheleError(f"{msg}: {detail[-1] if detail else f'exit {proc.returncode}'}")
        return proc.stdout.strip()

    def head(self) -> str:
        return self._git("rev-parse", "HEAD")

    def upstream(self) -> str:
        return self._git(
            "rev-parse",
            "--abbrev-ref",
            "--symbolic-full-name",
            "@{upstream}",
            what=f"{self.top}: the checked-out branch has no upstream to follow "
            "(set one: git branch -u REMOTE/BRANCH)",
        )

    def poll(self) -> GitPoll:
        """Fetch, then fast-forward the checkout to its upstream. Raises NepheleError (the checkout is
        left as it was) when the fetch fails, the branch diverged, or local changes are in the way."""
        upstream = self.upstream()
        remote = upstream.split("/", 1)[0]
        self._git("fetch", "--quiet", remote, what=f"git fetch {remote} failed")
        before = self.head()
        target = self._git("rev-parse", upstream)
        if target == before:
            return GitPoll(before, before, upstream)
        ancestor = self.runner(["merge-base", "--is-ancestor", before, target], self.top)
        if ancestor.returncode != 0:
            raise NepheleError(
                f"{self.top}: {upstream} ({target[:12]}) is not ahead of HEAD ({before[:12]}): the "
                "branch has diverged; not fast-forwarding (the checkout keeps its commit)"
            )
        self._git(
            "merge", "--ff-only", "--quiet", target, what=f"cannot fast-forward {self.top} to {target[:12]}"
        )
        return GitPoll(before, self.head(), upstream)


# --------------------------------------------------------------------------------------- watchdog


class FileWatcher:
    """Calls `on_change()` (from watchdog's thread) when any of `files` is written, created, replaced
    or removed. Watches the files' directories (editors and git replace files by rename)."""

    def __init__(self, files: list[Path], on_change: Callable[[], None]) -> None:
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        self.files = {f.resolve() for f in files}
        wanted = self.files

        class Handler(FileSystemEventHandler):  # type: ignore[misc]
            def on_any_event(self, event: FileSystemEvent) -> None:
                if event.event_type in ("opened", "closed_no_write"):
                    return
                paths = [event.src_path, getattr(event, "dest_path", "") or ""]
                if any(p and Path(_text(p)).resolve() in wanted for p in paths):
                    on_change()

        self.observer: Any = Observer()
        for d in sorted({f.parent for f in self.files}):
            self.observer.schedule(Handler(), str(d), recursive=False)

    def start(self) -> None:
        self.observer.daemon = True
        self.observer.start()

    def stop(self) -> None:
        self.observer.stop()
        self.observer.join(5)


def _text(p: str | bytes) -> str:
    return p.decode(errors="replace") if isinstance(p, bytes) else p
