"""The controller's state directory, one per manifest (like Terraform's local state):

    $NEPHELE_STATE_DIR/<manifest name>/     when the variable is set, else
    <manifest's directory>/.nephele/<manifest name>/

        inventory.json      what nephele created for this manifest (only that may be pruned)
        journal.jsonl       progress of the current (or last) apply, one JSON event per line
        journal.prev.jsonl  the apply before it
        lock.json           held while an apply runs: id, holder, pid, host, since
        nodes.json          since when each node has been unreachable
        status.json         last applied / attempted manifest revision, last error per object

Every file is replaced atomically (temp file, fsync, rename, directory fsync): a crash leaves the old
file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from nephele.errors import NepheleError

STATE_DIR_ENV = "NEPHELE_STATE_DIR"
DEFAULT_DIR_NAME = ".nephele"


def state_dir(manifest_path: str | None, manifest_name: str) -> Path:
    """Where the state of the manifest `manifest_name` (read from `manifest_path`; None or '-' for
    stdin: the current directory) lives."""
    base = os.environ.get(STATE_DIR_ENV)
    if base:
        root = Path(base)
    elif manifest_path and manifest_path != "-":
        root = Path(manifest_path).resolve().parent / DEFAULT_DIR_NAME
    else:
        root = Path.cwd() / DEFAULT_DIR_NAME
    return root / manifest_name


def ensure(directory: Path) -> Path:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NepheleError(f"{directory}: cannot create the state directory: {exc.strerror or exc}") from exc
    return directory


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, data: Any) -> None:
    """Replace `path` with `data` as JSON, crash-safe."""
    ensure(path.parent)
    text = json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise NepheleError(f"{path}: cannot write: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise NepheleError(f"{path}: cannot write: {exc.strerror or exc}") from exc


def read_json(path: Path, what: str) -> Any | None:
    """The JSON in `path`, or None when the file does not exist. Unreadable or invalid: a clear error."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise NepheleError(f"{path}: cannot read the {what}: {exc}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise NepheleError(
            f"{path}: the {what} is not valid JSON ({exc}); move it aside to start over"
        ) from exc
