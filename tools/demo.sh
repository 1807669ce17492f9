#!/usr/bin/env bash
# `make demo`: see tools/demo.py (a two-node local cloudlet, apply, a live handoff, its stats).
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python tools/demo.py "$@"
