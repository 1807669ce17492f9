"""Process facts a node and a controller both need."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """Whether process pid exists on this host (a process of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
