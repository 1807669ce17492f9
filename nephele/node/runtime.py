"""What one node-side operation runs with: the store, a lazily opened hypervisor, a progress sink
(stderr lines the controller shows as they come) and the node's log, `<root>/nephele.log`."""

from __future__ import annotations

import logging
import logging.handlers
import os
import socket
from collections.abc import Callable
from pathlib import Path

from nephele.node.hypervisor import Hypervisor
from nephele.node.store import Store

ProgressFn = Callable[[str], None]
LOG_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"
FORWARD_ADDRESS_ENV = "NEPHELE_FORWARD_ADDRESS"


class NodeContext:
    def __init__(
        self,
        root: str | Path | None = None,
        *,
        progress: ProgressFn | None = None,
        uri: str | None = None,
        hypervisor: Hypervisor | None = None,
    ) -> None:
        self.store = Store(root).ensure()
        self._progress = progress
        self._uri = uri
        self._hv = hypervisor
        self._own_hv = hypervisor is None
        self.log = logging.getLogger("nephele.node")
        self.log.setLevel(logging.INFO)
        # 25 MiB x 5, like the original's logging.json.
        self._handler = logging.handlers.RotatingFileHandler(
            self.store.log_file, maxBytes=25 << 20, backupCount=5
        )
        self._handler.setFormatter(logging.Formatter(LOG_FORMAT))
        self.log.addHandler(self._handler)

    @property
    def hv(self) -> Hypervisor:
        if self._hv is None:
            self._hv = Hypervisor(self._uri)
        return self._hv

    @property
    def hostname(self) -> str:
        return socket.gethostname()

    @property
    def forward_address(self) -> str:
        """Where forwarded host ports listen: every address of the node unless configured."""
        return os.environ.get(FORWARD_ADDRESS_ENV, "")

    def progress(self, line: str) -> None:
        self.log.info("%s", line)
        if self._progress is not None:
            self._progress(line)

    def close(self) -> None:
        if self._hv is not None and self._own_hv:
            self._hv.close()
        self.log.removeHandler(self._handler)
        self._handler.close()
