#!/usr/bin/env bash
# make demo, interim version: the full demo (a local two-node cloudlet, apply, a live handoff over a
# shaped WAN link, its stats) is not built yet. Until it is, this shows the declarative front end on a
# recorded observation of the nodes: validate the example manifest, then plan against that state.
set -euo pipefail
cd "$(dirname "$0")/.."
NEPHELE=${NEPHELE:-.venv/bin/nephele}
MANIFEST=examples/cloudlet.yaml
OBSERVED=examples/observed.json

if [ -t 1 ]; then bold=$'\033[1m' plain=$'\033[0m'; else bold="" plain=""; fi
say() { printf '\n%s== %s%s\n' "$bold" "$*" "$plain"; }
run() { printf '$ %s\n' "$*"; "$@"; }

cat <<'TEXT'
nephele demo (interim)

  The full demo -- a two-node cloudlet on this machine, `nephele apply`, then a live handoff of a
  running VM from edge-a to edge-b over a 20 Mbit/s link, with its stats -- is NOT built yet.
  What runs below is the part that exists: checking the manifest and planning against a recorded
  observation of the nodes. Nothing here touches a VM or a node.
TEXT

say "1. Validate the manifest (schema + cross-references; every problem with FILE:LINE:COL)"
run "$NEPHELE" validate -f "$MANIFEST"

say "2. Plan against a recorded observation ($OBSERVED)"
cat <<'TEXT'
  The recording says: image `tiny` is on both nodes, snapshot `web` only on edge-b, and instance
  web-1 is not running anywhere. The manifest wants web-1 running on edge-a with port 8080:80.
TEXT
echo
set +e
run "$NEPHELE" plan -f "$MANIFEST" --observed "$OBSERVED" --detailed-exitcode
code=$?
set -e
cat <<TEXT

  How to read it: '+' adds (the snapshot is copied to edge-a from edge-b, where it already is, rather
  than uploaded again; the size and time are an estimate from the model in docs/plan.md), then web-1
  starts on edge-a. 'because:' says why, 'after:' what must happen first. With --detailed-exitcode the
  exit code was $code (0 = no changes, 1 = error, 2 = changes).
TEXT
if [ "$code" != 2 ]; then
  echo "demo: expected exit code 2 (the plan has changes), got $code" >&2
  exit 1
fi

say "3. The same plan as JSON (format_version 1, see docs/plan.md), summary only"
"$NEPHELE" plan -f "$MANIFEST" --observed "$OBSERVED" -o json |
  "$(dirname "$NEPHELE")/python" -c 'import json,sys; d=json.load(sys.stdin); print(json.dumps({"format_version": d["format_version"], "summary": d["summary"], "actions": [a["id"] for a in d["actions"]]}, indent=2))'

say "4. What a handoff looks like in a plan"
cat <<'TEXT'
  Move web-1 to edge-b in a copy of the manifest, and plan against a recording where web-1 runs on
  edge-a: the placement change becomes a live handoff ('»') with its estimated cost.
TEXT
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
sed 's/^\(    node: \)edge-a\( .*\)$/\1edge-b\2/' "$MANIFEST" >"$tmp/cloudlet.yaml"
grep -q '^    node: edge-b' "$tmp/cloudlet.yaml" || { echo "demo: could not move web-1 in a copy of $MANIFEST" >&2; exit 1; }
"$(dirname "$NEPHELE")/python" - "$OBSERVED" "$tmp/observed.json" <<'PY'
import json, sys
doc = json.load(open(sys.argv[1]))
a, b = doc["nodes"]["edge-a"], doc["nodes"]["edge-b"]
a["snapshots"] = dict(b["snapshots"])
a["instances"] = {"web-1": {"uuid": "0f3c-demo", "snapshot": "web", "state": "running", "ports": ["8080:80"],
                            "manifest": "demo", "memory_bytes": 268435456, "dirty_bytes": 73400320}}
json.dump(doc, open(sys.argv[2], "w"), indent=2)
PY
echo
run "$NEPHELE" plan -f "$tmp/cloudlet.yaml" --observed "$tmp/observed.json"

say "Done"
echo "  Next (later issues): nephele cloudlet up, nephele apply, and a real live handoff."
