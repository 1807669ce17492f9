"""A watch daemon on a fake cloudlet, in its own process, for the signal tests (test_watch_signals.py).

    python watch_fake_daemon.py MANIFEST [--once]

instance.run takes RUN_DELAY seconds on the fake nodes, so a test can signal the daemon while an action
runs. The fake nodes live in this process: a restart starts from empty nodes again.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fakenodes import FakeCloudlet

from nephele.reconcile.watch import Watcher, WatchOptions

RUN_DELAY = 3.0


def main() -> int:
    fc = FakeCloudlet("edge-a", "edge-b")
    fc.delay["instance.run"] = RUN_DELAY
    opts = WatchOptions(manifest=Path(sys.argv[1]), resync=3600, parallelism=1)
    w = Watcher(opts, factory=fc.factory, say=lambda line: print(line, flush=True))
    return w.once() if "--once" in sys.argv else w.serve()


if __name__ == "__main__":
    sys.exit(main())
