"""Plan output: a Terraform-style text diff for people, and the versioned JSON form for programs.

+ instance/web-1  start on edge-a (running, ports 8080:80)
    because: not on any node
    after:   distribute_snapshot:snapshot/web@edge-a
» instance/web-2  edge-a → edge-b  ~120 MiB, ~48 s @ 20 Mbit/s (wave 1)
    because: placement changed edge-a → edge-b

Plan: 1 to start, 0 to change, 1 to hand off, 0 to stop, 0 to prune, 1 to import.
"""

from __future__ import annotations

import json
from typing import Any

from nephele.reconcile.actions import Action, ActionKind, Estimate, Plan

NO_CHANGES = "No changes. The cloudlet matches the manifest."


def human_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            value = n / size
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    return f"{n} B"


def human_seconds(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def estimate_text(e: Estimate) -> str:
    return f"~{human_bytes(e.bytes)}, ~{human_seconds(e.seconds)} @ {e.link_mbit:g} Mbit/s"


def _ports(a: Action) -> str:
    return ", ".join(str(p) for p in a.ports) or "no ports"


def headline(a: Action) -> str:
    """What the action does, in a few words after its address."""
    k = a.kind
    if k is ActionKind.IMPORT_IMAGE:
        return f"import to {a.node} from " + (a.source_node or a.source or "?")
    if k is ActionKind.DISTRIBUTE_SNAPSHOT:
        text = f"copy to {a.node} from " + (a.source_node or a.source or "?")
        return f"{text}  {estimate_text(a.estimate)}" if a.estimate else text
    if k is ActionKind.START_INSTANCE:
        return f"start on {a.node} ({a.state.value if a.state else 'running'}, {_ports(a)})"
    if k is ActionKind.HANDOFF:
        text = f"{a.source_node} → {a.node}"
        if a.mode == "cold":
            text += " (cold)"
        text += (
            f"  {estimate_text(a.estimate)}" if a.estimate else "  (no estimate: the node reported no sizes)"
        )
        if a.wave:
            text += f" (wave {a.wave})"
        return text
    if k is ActionKind.CHANGE_PORTS:
        old = ", ".join(str(p) for p in a.old_ports) or "none"
        new = ", ".join(str(p) for p in a.ports) or "none"
        return f"ports {old} → {new} on {a.node}"
    verb = {
        ActionKind.STOP_INSTANCE: "stop",
        ActionKind.PAUSE_INSTANCE: "pause",
        ActionKind.RESUME_INSTANCE: "resume",
        ActionKind.PRUNE: "prune (stop and delete)",
        ActionKind.REMOVE_IMAGE: "remove",
        ActionKind.REMOVE_SNAPSHOT: "remove",
    }[k]
    return f"{verb} on {a.node}"


def summary_line(plan: Plan) -> str:
    """The last line. "No changes" only when that is the whole truth: no errors and nothing unknown."""
    if plan.errors:
        n = len(plan.errors)
        return f"The plan has {n} error{'s' if n != 1 else ''} and cannot be applied."
    if not plan.has_changes:
        if plan.unknown:
            n = len(plan.unknown)
            return (
                f"No changes on the nodes that answered; {n} object{'s are' if n != 1 else ' is'} unknown, "
                "so the cloudlet may not match the manifest."
            )
        return NO_CHANGES
    return counts_line(plan)


def counts_line(plan: Plan) -> str:
    c = plan.counts()
    line = (
        f"Plan: {c['start']} to start, {c['change']} to change, {c['handoff']} to hand off, "
        f"{c['stop']} to stop, {c['prune']} to prune"
    )
    return line + (f", {c['import']} to import." if c["import"] else ".")


def render_text(plan: Plan) -> str:
    lines: list[str] = []
    if plan.actions:
        lines.append("nephele will perform the following actions, in this order:")
        lines.append("")
        width = max(len(a.address) for a in plan.actions)
        for a in plan.actions:
            lines.append(f"  {a.symbol} {a.address:<{width}}  {headline(a)}")
            lines.append(f"      because: {a.reason}")
            if a.depends_on:
                lines.append(f"      after:   {', '.join(a.depends_on)}")
        lines.append("")
    total_bytes, seconds = plan.handoff_totals()
    n_handoffs = plan.counts()["handoff"]
    if n_handoffs:
        waves = plan.summary()["handoff_waves"]
        unsized = sum(1 for a in plan.actions if a.kind is ActionKind.HANDOFF and a.estimate is None)
        head = f"Handoffs: {n_handoffs} in {waves} wave(s) (at most {plan.max_parallel_handoffs} at once), "
        if unsized == n_handoffs:
            lines.append(head + "no estimate (the nodes reported no sizes)")
        else:
            cost = f"~{human_bytes(total_bytes)} over the WAN, ~{human_seconds(seconds)}"
            if unsized:
                cost += f" for the {n_handoffs - unsized} with an estimate"
            lines.append(head + cost + " (estimated by a model, see docs/plan.md)")
        lines.append("")
    if plan.unknown:
        lines.append("Unknown (their node did not answer):")
        lines += [f"  ? {u.address} on {u.node}: {u.reason}" for u in plan.unknown]
        lines.append("")
    if plan.warnings:
        lines.append("Warnings:")
        lines += [f"  ! {w.message}" for w in plan.warnings]
        lines.append("")
    if plan.errors:
        lines.append("Errors (this plan cannot be applied):")
        lines += [f"  x {e.message}" for e in plan.errors]
        lines.append("")
    if plan.errors and plan.has_changes:
        lines.append(counts_line(plan))
    lines.append(summary_line(plan))
    return "\n".join(lines) + "\n"


def plan_json(plan: Plan) -> dict[str, Any]:
    return plan.to_dict()


def render_json(plan: Plan) -> str:
    return json.dumps(plan_json(plan), indent=2, ensure_ascii=False) + "\n"
