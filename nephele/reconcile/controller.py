"""The controller side of one manifest: read it, find its state directory, observe its nodes, keep its
inventory and its apply record. The CLI commands (plan, apply, status) are thin layers over this.

    ctl = Controller.open("cloudlet.yaml")      # ManifestError before any node is contacted
    observed = ctl.observe()                    # every node in parallel; dark nodes are 'unreachable'
    inventory = ctl.inventory.reconcile(observed)
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nephele import manifest
from nephele.errors import ManifestError, Problem
from nephele.model import Desired, Observed
from nephele.reconcile import statedir
from nephele.reconcile.inventory import InventoryStore
from nephele.reconcile.observe import (
    DEFAULT_TIMEOUT,
    TransportFactory,
    TransportPool,
    UnreachableLog,
    default_factory,
    observe,
)

STATUS_FILE = "status.json"


def read_manifest(path: str) -> tuple[bytes, Desired]:
    """The manifest's bytes (for its hash) and its validated content; '-' reads stdin."""
    try:
        raw = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        raise ManifestError(
            [Problem(path, 1, 1, "", f"cannot read the file: {exc.strerror or exc}")]
        ) from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ManifestError([Problem(path, 1, 1, "", "the file is not UTF-8 text")]) from exc
    return raw, manifest.loads(text, "<stdin>" if path == "-" else path)


def revision(path: str, raw: bytes) -> dict[str, Any]:
    """What version of the manifest this is: its git commit (and whether the file has uncommitted
    changes) when it is in a git work tree, else the sha256 of its bytes."""
    sha = hashlib.sha256(raw).hexdigest()
    out: dict[str, Any] = {"sha256": sha, "text": f"sha256:{sha[:12]}"}
    if path == "-":
        return out
    p = Path(path).resolve()

    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(
                ["git", "-C", str(p.parent), *args], capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return out
    tracked = git("ls-files", "--error-unmatch", p.name) is not None
    changes = git("status", "--porcelain", "--", p.name)
    dirty = not tracked or bool(changes)
    branch = git("rev-parse", "--abbrev-ref", "HEAD") or "HEAD"
    out.update(
        git_commit=commit,
        git_dirty=dirty,
        text=f"{branch}@sha1:{commit[:12]}" + (" (uncommitted changes)" if dirty else ""),
    )
    return out


@dataclass
class Controller:
    path: str
    raw: bytes
    desired: Desired
    directory: Path
    factory: TransportFactory
    timeout: float = DEFAULT_TIMEOUT
    pool: TransportPool = field(init=False)
    inventory: InventoryStore = field(init=False)

    def __post_init__(self) -> None:
        self.pool = TransportPool(self.desired, self.factory)
        self.inventory = InventoryStore(self.directory, self.desired.name)

    @classmethod
    def open(
        cls, path: str, *, factory: TransportFactory | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> Controller:
        raw, desired = read_manifest(path)
        return cls.from_parts(path, raw, desired, factory=factory, timeout=timeout)

    @classmethod
    def from_parts(
        cls,
        path: str,
        raw: bytes,
        desired: Desired,
        *,
        factory: TransportFactory | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Controller:
        """For a manifest already read and validated (e.g. from stdin)."""
        return cls(
            path=path,
            raw=raw,
            desired=desired,
            directory=statedir.state_dir(path, desired.name),
            factory=factory or default_factory(min(10.0, timeout)),
            timeout=timeout,
        )

    def observe(self, *, remember: bool = True) -> Observed:
        """Observe every node; `remember`: keep 'unreachable since' in the state dir (off for dry runs)."""
        log = UnreachableLog(self.directory)
        if not remember:  # still show the remembered 'since', only do not write it
            log = _ReadOnlyLog(log.read())
        return observe(self.desired, self.pool, self.timeout, log=log)

    def revision(self) -> dict[str, Any]:
        return revision(self.path, self.raw)

    def read_status(self) -> dict[str, Any]:
        data = statedir.read_json(self.directory / STATUS_FILE, "status record")
        return data if isinstance(data, dict) else {}

    def write_status(self, data: dict[str, Any]) -> None:
        statedir.write_json(self.directory / STATUS_FILE, data)

    def close(self) -> None:
        self.pool.close()


class _ReadOnlyLog(UnreachableLog):
    def __init__(self, known: dict[str, str]) -> None:
        super().__init__(None)
        self.known = known

    def read(self) -> dict[str, str]:
        return dict(self.known)

    def update(self, observed: Observed) -> None:
        pass
