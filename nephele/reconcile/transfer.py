"""Resumable file copies between the controller and the nodes (issue 9): a copy cut off by a link
failure resumes from what the receiver already holds and verified, instead of starting over.

A copy's files are named by their content (a sha256), so a retried copy finds the partial its
interrupted attempt left: on a node `<root>/tmp/nephele-part-<kind>-<name>-<digest>.zip`, on the
controller `<copies dir>/<key>-<digest>.part` (under the manifest's state dir, which outlives the attempt).
Before sending, the sender asks what the receiver holds (`copy.partial`: its size and the sha256 of
that prefix, or for a controller-side partial the sha256 of the same prefix of the node's file); when
the prefix matches, only the rest crosses (ResumableFiles.put_file_at / get_file_at), else the file
crosses whole. The import's own verification (content id, sha256 per file) stays the final check.

A node or transport without these ops (an older nephele, the test fakes) gets whole-file copies.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nephele.agent.transport import AgentTransport, ResumableFiles
from nephele.errors import AgentError, NepheleError

PART_PREFIX = "nephele-part-"  # the node side: copies.PART_PREFIX (swept there after a day)
EXPORT_PREFIX = "nephele-export-"  # the node side: copies.EXPORT_PREFIX
MAX_AGE = 24 * 3600.0  # a controller-side partial untouched this long is swept
MARGIN = 64 << 20  # free space kept on the controller beyond a partial
_CHUNK = 1 << 20

Ask = Callable[[dict[str, Any]], dict[str, Any] | None]  # copy.partial on one node; None: no such op
Say = Callable[[str], None]


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def sha256_of(path: Path, upto: int | None = None) -> str:
    """sha256 of the file's first `upto` bytes (all of it without `upto`)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = os.fstat(f.fileno()).st_size if upto is None else upto
        while left > 0 and (chunk := f.read(min(left, _CHUNK))):
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:40]


def part_name(kind: str, name: str, digest: str) -> str:
    """A node-side partial's file name: the object it carries and the content it must end up as."""
    return f"{PART_PREFIX}{kind}-{_safe(name)}-{digest[:32]}.zip"


def export_name(kind: str, name: str, key: str) -> str:
    return f"{EXPORT_PREFIX}{kind}-{_safe(name)}-{key[:24]}.zip"


@dataclass(frozen=True)
class Moved:
    """One hop of a copy: `resumed_at` bytes were already there, `sent` crossed now, of `size`."""

    size: int
    resumed_at: int = 0
    sent: int = 0


def can_resume(t: AgentTransport) -> bool:
    return isinstance(t, ResumableFiles)


def upload(
    t: AgentTransport,
    ask: Ask,
    local: Path,
    remote: str,
    say: Say,
    *,
    resume: bool = True,
    rate_mbit: float | None = None,
) -> Moved:
    """Bring `local` to `remote` on t's node, resuming from the node's partial when its prefix
    matches (`resume` False: always from the start, the baseline resuming is measured against). A
    node that cannot tell (`ask` returns None) or a transport that cannot append gets the whole file."""
    size = local.stat().st_size
    held = ask({"path": remote, "expect": size}) if can_resume(t) else None
    if held is None or not isinstance(t, ResumableFiles):
        say(f"uploading {mib(size)} to {t.node}")
        t.put_file(local, remote)
        return Moved(size, 0, size)
    have = int(held.get("size", -1))
    offset = 0
    if not resume:
        pass
    elif 0 < have <= size and sha256_of(local, have) == held.get("sha256"):
        offset = have
    elif have > 0:
        why = "is longer than the file" if have > size else "does not match the file"
        say(f"{t.node}'s partial copy ({mib(have)}) {why}: sending it whole")
    if offset:
        say(f"uploading to {t.node}: resuming at {mib(offset)} of {mib(size)}")
    else:
        say(f"uploading {mib(size)} to {t.node}")
    sent = t.put_file_at(local, remote, offset, rate_mbit=rate_mbit) if offset < size else 0
    return Moved(size, offset, sent)


def fetch(
    t: AgentTransport,
    ask: Ask,
    remote: str,
    local: Path,
    size: int,
    digest: str,
    say: Say,
    *,
    resume: bool = True,
    rate_mbit: float | None = None,
) -> Moved:
    """Bring `remote` (of `size` bytes and sha256 `digest`) from t's node to `local`, resuming from
    the local partial when the node's file has the same prefix. The result is checked against
    `digest`; a resumed one that does not match is fetched whole once."""
    have = local.stat().st_size if local.is_file() and resume else 0
    offset = 0
    if have > size:
        say(f"the partial fetch ({mib(have)}) is longer than the file: fetching it whole")
    elif have:
        held = ask({"path": remote, "upto": have})
        if (
            held is not None
            and int(held.get("size", -1)) >= have
            and held.get("sha256") == sha256_of(local, have)
        ):
            offset = have
        else:
            say(f"the partial fetch ({mib(have)}) does not match {t.node}'s file: fetching it whole")
    require_space(local.parent, size - offset, what=f"fetching {remote} from {t.node}")
    if offset:
        say(f"fetching from {t.node}: resuming at {mib(offset)} of {mib(size)}")
    assert isinstance(t, ResumableFiles)
    sent = t.get_file_at(remote, local, offset, rate_mbit=rate_mbit) if offset < size else 0
    if sha256_of(local) != digest:
        if offset:
            say(f"the resumed fetch from {t.node} does not verify: fetching it whole")
            local.unlink()
            again = fetch(t, ask, remote, local, size, digest, say, rate_mbit=rate_mbit)
            return Moved(size, 0, sent + again.sent)
        local.unlink()
        raise AgentError(f"{remote} changed while it was fetched (sha256 differs); try again", node=t.node)
    return Moved(size, offset, sent)


def require_space(directory: Path, needed: int, *, what: str) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed + MARGIN:
        raise NepheleError(
            f"{what}: not enough disk space on the controller: {directory} has {mib(free)} free, "
            f"{mib(needed)} + {mib(MARGIN)} margin needed; nothing was fetched"
        )


# --------------------------------------------------------------------------- the controller's side


class Partials:
    """The controller's partial fetches and the export records that name them, in one directory:

    <digest>.part     a node's export as far as it was fetched
    <key>.json        {digest, size, result}: the export a copy made (key: what was exported,
                      from where, against what), so a retry reuses it instead of exporting again
    """

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def ensure(self) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        return self.dir

    def part(self, key: str, digest: str) -> Path:
        return self.ensure() / f"{key[:24]}-{digest[:32]}.part"

    def complete(self, key: str, rec: dict[str, Any]) -> bool:
        """Whether the record's export is here in full (checked against its sha256)."""
        part = self.part(key, rec["digest"])
        return part.is_file() and part.stat().st_size == rec["size"] and sha256_of(part) == rec["digest"]

    def record_path(self, key: str) -> Path:
        return self.ensure() / f"{key[:24]}.json"

    def record(self, key: str) -> dict[str, Any] | None:
        try:
            doc = json.loads(self.record_path(key).read_text())
        except (OSError, ValueError):
            return None
        ok = isinstance(doc, dict) and isinstance(doc.get("digest"), str) and isinstance(doc.get("size"), int)
        return doc if ok else None

    def save(self, key: str, doc: dict[str, Any]) -> None:
        path = self.record_path(key)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(doc, sort_keys=True))
        os.replace(tmp, path)

    def forget(self, key: str, digest: str | None = None) -> None:
        self.record_path(key).unlink(missing_ok=True)
        if digest:
            self.part(key, digest).unlink(missing_ok=True)

    def sweep(self, max_age: float = MAX_AGE) -> int:
        """Remove partials and records untouched for `max_age` seconds. Returns the bytes freed."""
        freed = 0
        if not self.dir.is_dir():
            return 0
        now = time.time()
        for path in self.dir.iterdir():
            try:
                st = path.stat()
                if path.is_file() and now - st.st_mtime > max_age:
                    path.unlink()
                    freed += st.st_size
            except OSError:
                continue
        return freed


def export_key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
