#!/usr/bin/env python3
"""Planner at scale: a generated manifest with 100 nodes, 50 images, 1,000 instances, and an observed
state where ~10% of the instances moved in the manifest (handoffs) and ~10% changed state (stop/start).

Times manifest validation (nephele.manifest.loads: YAML, schema, cross-references) and planning
(nephele.reconcile.plan) separately, best of --repeat runs, and prints a short table.

    .venv/bin/python bench/plan_scale.py [--nodes 100] [--images 50] [--instances 1000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable
from typing import Any

import yaml

from nephele import manifest
from nephele.model import Observed
from nephele.reconcile.plan import plan
from nephele.reconcile.render import render_json, render_text


def generate(nodes: int, images: int, instances: int, seed: int = 1) -> tuple[str, dict[str, Any]]:
    """(manifest YAML text, observed-state dict). Host ports are unique per instance, so no conflicts."""
    rng = random.Random(seed)
    node_names = [f"edge-{i:03d}" for i in range(nodes)]
    doc: dict[str, Any] = {
        "apiVersion": "nephele.dev/v1",
        "kind": "Cloudlet",
        "metadata": {"name": "scale"},
        "nodes": {n: {"address": f"10.{i // 250}.{i % 250}.1"} for i, n in enumerate(node_names)},
        "images": {f"img-{i:02d}": {"source": f"artifacts/img-{i:02d}.zip"} for i in range(images)},
        "snapshots": {
            f"snap-{i:02d}": {"image": f"img-{i:02d}", "source": f"artifacts/snap-{i:02d}.zip"}
            for i in range(images)
        },
        "instances": {},
        "policy": {"maxParallelHandoffs": 8, "maxHandoffsPerNode": 2},
    }
    observed: dict[str, Any] = {
        "format": "nephele.observed/v1",
        "nodes": {
            n: {
                "images": {f"img-{i:02d}": {"content_id": f"{i:064x}"} for i in range(images)},
                "snapshots": {f"snap-{i:02d}": {"image": f"img-{i:02d}"} for i in range(images)},
                "instances": {},
            }
            for n in node_names
        },
    }
    for i in range(instances):
        name, node, snap = f"vm-{i:04d}", node_names[i % nodes], f"snap-{i % images:02d}"
        port = f"{10000 + i}:80"
        doc["instances"][name] = {"snapshot": snap, "node": node, "ports": [port], "state": "running"}
        where, state = node, "running"
        roll = rng.random()
        if roll < 0.10:  # moved in the manifest: observed on another node -> handoff
            where = node_names[(i + 1 + rng.randrange(nodes - 1)) % nodes]
        elif roll < 0.15:  # observed stopped, desired running -> start
            state = "stopped"
        elif roll < 0.20:  # desired stopped, observed running -> stop
            doc["instances"][name]["state"] = "stopped"
        observed["nodes"][where]["instances"][name] = {
            "uuid": f"u-{i}",
            "snapshot": snap,
            "state": state,
            "ports": [port],
            "manifest": "scale",
            "memory_bytes": 256 * 2**20,
            "dirty_bytes": rng.randrange(10, 200) * 2**20,
        }
    return yaml.safe_dump(doc, sort_keys=False), observed


def best_of(repeat: int, fn: Callable[[], Any]) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--nodes", type=int, default=100)
    ap.add_argument("--images", type=int, default=50)
    ap.add_argument("--instances", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    text, obs_dict = generate(args.nodes, args.images, args.instances)
    observed = Observed.from_dict(obs_dict)

    t_validate, desired = best_of(args.repeat, lambda: manifest.loads(text, "generated.yaml"))
    t_plan, result = best_of(args.repeat, lambda: plan(desired, observed))
    t_text, _ = best_of(args.repeat, lambda: render_text(result))
    t_json, _ = best_of(args.repeat, lambda: render_json(result))

    n = len(desired.instances)
    c = result.counts()
    print(
        f"plan_scale: {len(desired.nodes)} nodes, {len(desired.images)} images, {n} instances, "
        f"{len(text) // 1024} KiB of YAML; best of {args.repeat}"
    )
    print(
        f"plan: {c['handoff']} handoffs in {result.summary()['handoff_waves']} waves, {c['start']} starts, "
        f"{c['stop']} stops, {len(result.actions)} actions, {len(result.errors)} errors"
    )
    print(f"{'step':<22}{'seconds':>10}{'instances/s':>14}")
    for step, t in (
        ("validate (load)", t_validate),
        ("plan", t_plan),
        ("render text", t_text),
        ("render json", t_json),
    ):
        print(f"{step:<22}{t:>10.3f}{n / t:>14,.0f}")
    ok = t_validate < 1.0 and t_plan < 1.0 and not result.errors
    if not ok:
        print(
            "FAIL: validation and planning must each take well under a second, without errors",
            file=sys.stderr,
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
