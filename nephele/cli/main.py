"""`nephele`: the declarative front end. Each subcommand lives in its own module `cmd_<name>.py`
exposing `register(subparsers)`; this module only assembles them and maps errors to exit codes.

Exit codes: 0 success (plan: no changes), 1 error, 2 plan has changes (with --detailed-exitcode),
130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from nephele import __version__
from nephele.errors import ManifestError, NepheleError

# Subcommand modules, in the order `nephele --help` lists them. A missing module is skipped so that
# parts can land one at a time.
COMMANDS = ["validate", "plan", "apply", "status", "watch", "handoffs", "cloudlet", "agent"]


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """All subcommands, or just `only`: `nephele agent call` runs once per request on a node, and
    importing every front end (jsonschema, the planner...) would dominate its start-up time."""
    parser = argparse.ArgumentParser(prog="nephele", description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"nephele {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in [only] if only else COMMANDS:
        try:
            module = importlib.import_module(f"nephele.cli.cmd_{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"nephele.cli.cmd_{name}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser("agent" if argv[:1] == ["agent"] else None).parse_args(argv)
    try:
        return int(args.func(args))
    except ManifestError as exc:
        # One FILE:LINE:COL problem per line, first on the line, so editors' problem matchers find them.
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return exc.exit_code
    except NepheleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        # `nephele ... | head`: the reader left; not an error worth a traceback.
        sys.stderr.close()
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
