"""The planner: plan(desired, observed, inventory) -> Plan. PURE: no I/O, no clock, no randomness; the
same inputs give the same plan, actions in the same order.

Passes, each small (Terraform's graph transformers, in spirit):
  1. nodes       unreachable nodes get no action; their instances are `unknown`, nothing is pruned there
  2. images      import where required and missing
  3. snapshots   copy where required and missing, from a node that has it, else from its source file
  4. instances   start / stop / pause / resume / change ports on the desired node, or hand off to it
  5. orphans     prune instances removed from the manifest (policy.prune + inventory + their prune flag)
  6. leftovers   remove snapshots and images no longer wanted on a node (same rules as prune)
  7. ports       a host port is freed (stop, change, handoff away, prune) before it is reused on a node;
                 a port held by something nephele does not manage is an error, never clobbered
  8. order       topological order (cycles are errors), handoff waves, transfer budget, --target
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from nephele.errors import PlanError
from nephele.model import (
    Desired,
    InstanceSpec,
    InstanceState,
    Inventory,
    NodeObservation,
    Observed,
    ObservedInstance,
    PortMap,
)
from nephele.reconcile import estimate
from nephele.reconcile.actions import (
    Action,
    ActionKind,
    Diagnostic,
    Fact,
    Plan,
    Precondition,
    Unknown,
    action_id,
)

HOLDS_PORTS = (InstanceState.RUNNING, InstanceState.PAUSED)
TARGET_KINDS = ("instance", "image", "snapshot", "node")
_STATE_RANK = {InstanceState.RUNNING: 0, InstanceState.PAUSED: 1, InstanceState.STOPPED: 2}


@dataclass(frozen=True)
class PlanOptions:
    targets: tuple[str, ...] = ()  # "instance/web-1", "image/tiny", "snapshot/web", "node/edge-a"
    ignore_transfer_budget: bool = False  # over-budget handoffs become a warning instead of an error


def plan(
    desired: Desired,
    observed: Observed,
    inventory: Inventory | None = None,
    options: PlanOptions | None = None,
) -> Plan:
    """Diff the manifest against the observed nodes. Raises PlanError only for unusable options (a
    --target naming nothing); every problem of the cloudlet itself is a Diagnostic in Plan.errors."""
    return _Planner(desired, observed, inventory, options or PlanOptions()).run()


def mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def _ports(ports: Iterable[PortMap]) -> str:
    return ", ".join(str(p) for p in ports) or "none"


def _why(reasons: list[str]) -> str:
    """["images.x.nodes lists a", "instance/w1"] -> "images.x.nodes lists a; needed by instance/w1"."""
    users = [r for r in reasons if r.startswith(("instance/", "snapshot/"))]
    parts = [r for r in reasons if r not in users]
    if users:
        parts.append("needed by " + ", ".join(users))
    return "; ".join(parts)


@dataclass(frozen=True)
class _Copy:
    node: str
    obs: ObservedInstance


class _Planner:
    def __init__(self, d: Desired, o: Observed, inv: Inventory | None, opts: PlanOptions) -> None:
        self.d, self.o, self.inv, self.opts = d, o, inv, opts
        extra = sorted(n for n in o.nodes if n not in d.nodes)
        self.node_order = [*d.nodes, *extra]
        self.rank = {n: i for i, n in enumerate(self.node_order)}
        self.up: dict[str, NodeObservation] = {
            n: obs for n, obs in o.nodes.items() if obs.reachable and n in self.rank
        }
        self.actions: dict[str, Action] = {}  # insertion order = generation order
        self.warnings: list[Diagnostic] = []
        self.errors: list[Diagnostic] = []
        self.unknown: list[Unknown] = []
        self.images_at: dict[tuple[str, str], str] = {}  # (image, node) -> import action id
        self.snaps_at: dict[tuple[str, str], str] = {}  # (snapshot, node) -> distribute action id
        # (instance, node) -> id of the handoff or prune that takes it off the node (frees its snapshot)
        self.leaving: dict[tuple[str, str], str] = {}
        self.acquire: list[tuple[str, str, str, PortMap]] = []  # (action id, node, instance, port)

    # ------------------------------------------------------------------------------------------ util

    def add(self, a: Action) -> Action:
        self.actions[a.id] = a
        return a

    def owned(self, c: _Copy) -> bool:
        """Ours: tagged with this manifest, or untagged but in our inventory. Another manifest's tag
        always wins over our inventory: nephele never takes over a VM another manifest manages."""
        if c.obs.manifest is not None:
            return c.obs.manifest == self.d.name
        return self.inv is not None and self.inv.owns("instance", c.obs.name, c.node)

    def dead_reason(self, node: str) -> str:
        obs = self.o.nodes.get(node)
        if obs is None:
            return f"node {node} was not observed"
        since = f" since {obs.since}" if obs.since else ""
        return f"node {node} is unreachable{since}: {obs.error or 'no answer'}"

    def nodes_sorted(self, nodes: Iterable[str]) -> list[str]:
        return sorted(set(nodes), key=lambda n: self.rank.get(n, len(self.rank)))

    # ----------------------------------------------------------------------------------------- passes

    def run(self) -> Plan:
        self.copies = self.locate_instances()
        self.check_targets()
        self.pass_nodes()
        self.snap_need = self.snapshot_requirements()
        self.pass_images()
        self.pass_snapshots()
        for spec in self.d.instances.values():
            self.pass_instance(spec)
        self.pass_orphans()
        self.pass_leftovers()
        self.pass_ports()
        ordered = self.order()
        ordered = self.apply_targets(ordered)
        ordered = self.assign_waves(ordered)  # after targeting: waves count only planned handoffs
        self.check_budget(ordered)
        return Plan(
            manifest=self.d.name,
            actions=tuple(ordered),
            warnings=tuple(self.warnings),
            errors=tuple(self.errors),
            unknown=tuple(self.unknown),
            targets=self.opts.targets,
            transfer_budget_bytes=self.d.policy.transfer_budget_bytes,
            max_parallel_handoffs=self.d.policy.max_parallel_handoffs,
        )

    def pass_nodes(self) -> None:
        for n in self.node_order:
            if n not in self.up:
                self.warnings.append(
                    Diagnostic(
                        f"{self.dead_reason(n)}: no action is planned there and nothing is pruned there",
                        f"node/{n}",
                    )
                )

    def snapshot_requirements(self) -> dict[str, dict[str, list[str]]]:
        """snapshot -> {node: [why it is needed there]}, in manifest order."""
        need: dict[str, dict[str, list[str]]] = {s: {} for s in self.d.snapshots}
        for s in self.d.snapshots.values():
            for n in s.nodes:
                need[s.name].setdefault(n, []).append(f"snapshots.{s.name}.nodes lists {n}")
        for i in self.d.instances.values():
            if i.snapshot in need:
                need[i.snapshot].setdefault(i.node, []).append(f"instance/{i.name}")
        return need

    def pass_images(self) -> None:
        for img in self.d.images.values():
            want: dict[str, list[str]] = {n: [f"images.{img.name}.nodes lists {n}"] for n in img.nodes}
            for s in self.d.snapshots.values():
                if s.image == img.name:
                    for n in self.snap_need[s.name]:
                        want.setdefault(n, []).append(f"snapshot/{s.name}")
            holders = [n for n in self.node_order if n in self.up and img.name in self.up[n].images]
            for n in self.nodes_sorted(want):
                if n not in self.up:
                    continue
                have = self.up[n].images.get(img.name)
                address = f"image/{img.name}"
                if have is not None:
                    if img.content_id and not have.content_id.startswith(img.content_id):
                        self.errors.append(
                            Diagnostic(
                                f"image/{img.name} on {n} has content id {have.content_id[:16]}, but the "
                                f"manifest pins {img.content_id}; nephele does not replace an image in use",
                                address,
                            )
                        )
                    continue
                src_node = None if img.source else next(iter(holders), None)
                if img.source is None and src_node is None:
                    self.errors.append(
                        Diagnostic(f"image/{img.name} has no source and no reachable node holds it", address)
                    )
                    break  # once per image, not once per node
                pre = [Precondition(Fact.IMAGE_ABSENT, n, img.name)]
                if src_node:
                    held = self.up[src_node].images[img.name]
                    pre.append(
                        Precondition(Fact.IMAGE_PRESENT, src_node, img.name, content_id=held.content_id)
                    )
                a = self.add(
                    Action(
                        id=action_id(ActionKind.IMPORT_IMAGE, address, n),
                        kind=ActionKind.IMPORT_IMAGE,
                        address=address,
                        node=n,
                        source_node=src_node,
                        source=img.source,
                        reason=f"missing on {n} ({_why(want[n])})",
                        preconditions=tuple(pre),
                    )
                )
                self.images_at[(img.name, n)] = a.id

    def pass_snapshots(self) -> None:
        for s in self.d.snapshots.values():
            holders = [n for n in self.node_order if n in self.up and s.name in self.up[n].snapshots]
            address = f"snapshot/{s.name}"
            for n, why in sorted(self.snap_need[s.name].items(), key=lambda kv: self.rank.get(kv[0], 0)):
                if n not in self.up or s.name in self.up[n].snapshots:
                    continue
                src_node = next(iter(holders), None)
                if src_node is None and s.source is None:
                    self.errors.append(
                        Diagnostic(f"snapshot/{s.name} has no source and no reachable node holds it", address)
                    )
                    break  # once per snapshot, not once per node
                pre = [Precondition(Fact.SNAPSHOT_ABSENT, n, s.name)]
                est = None
                if src_node:
                    held = self.up[src_node].snapshots[s.name]
                    pre.append(
                        Precondition(Fact.SNAPSHOT_PRESENT, src_node, s.name, content_id=held.content_id)
                    )
                    est = estimate.snapshot_copy(self.d, held, src_node, n) if held.delta_bytes else None
                deps = self.base_deps(s.image, n, pre)
                a = self.add(
                    Action(
                        id=action_id(ActionKind.DISTRIBUTE_SNAPSHOT, address, n),
                        kind=ActionKind.DISTRIBUTE_SNAPSHOT,
                        address=address,
                        node=n,
                        source_node=src_node,
                        source=None if src_node else s.source,
                        reason=f"missing on {n} ({_why(why)})",
                        depends_on=deps,
                        preconditions=tuple(pre),
                        estimate=est,
                    )
                )
                self.snaps_at[(s.name, n)] = a.id

    def base_deps(self, image: str, node: str, pre: list[Precondition]) -> tuple[str, ...]:
        """Depend on the image import on `node` if one is planned, else require the image to be there."""
        if (image, node) in self.images_at:
            return (self.images_at[(image, node)],)
        have = self.up[node].images.get(image) if node in self.up else None
        if have is not None:
            pre.append(Precondition(Fact.IMAGE_PRESENT, node, image, content_id=have.content_id))
        return ()

    def instance_deps(self, snapshot: str, node: str, pre: list[Precondition]) -> tuple[str, ...]:
        """An instance on `node` needs its snapshot (and so its image) there first."""
        if (snapshot, node) in self.snaps_at:
            return (self.snaps_at[(snapshot, node)],)
        have = self.up[node].snapshots.get(snapshot) if node in self.up else None
        if have is not None:
            pre.append(Precondition(Fact.SNAPSHOT_PRESENT, node, snapshot, content_id=have.content_id))
        spec = self.d.snapshots.get(snapshot)
        return self.base_deps(spec.image, node, pre) if spec else ()

    def locate_instances(self) -> dict[str, list[_Copy]]:
        copies: dict[str, list[_Copy]] = {}
        for n in self.node_order:
            if n in self.up:
                for _, inst in sorted(self.up[n].instances.items()):  # JSON key order must not matter
                    copies.setdefault(inst.name, []).append(_Copy(n, inst))
        return copies

    def pass_instance(self, spec: InstanceSpec) -> None:
        address = f"instance/{spec.name}"
        copies = self.copies.get(spec.name, [])
        foreign = [c for c in copies if not self.owned(c)]
        for c in foreign:
            self.errors.append(
                Diagnostic(
                    f"instance/{spec.name} on {c.node} exists but is not managed by this manifest "
                    f"(manifest tag {c.obs.manifest!r}); nephele will not take it over",
                    address,
                )
            )
        if any(c.node == spec.node for c in foreign):
            return
        mine = [c for c in copies if self.owned(c)]
        busy = [c for c in mine if c.obs.handoff_url]
        if busy:
            self.warnings.append(
                Diagnostic(
                    f"instance/{spec.name}: a handoff out of {busy[0].node} is in progress "
                    f"({busy[0].obs.handoff_url}); nothing planned for it until it ends",
                    address,
                )
            )
            return
        if spec.node not in self.up:
            self.unknown.append(Unknown(address, spec.node, self.dead_reason(spec.node)))
            if mine:
                self.warnings.append(
                    Diagnostic(
                        f"instance/{spec.name} is on {mine[0].node} but its desired node {spec.node} is "
                        f"unreachable: the handoff waits until {spec.node} answers",
                        address,
                    )
                )
            return
        if not mine:
            self.place_new(spec)
            return
        # The copy to keep: the most alive one (a running VM is never given up for a stopped copy),
        # then the one already on the desired node, then manifest node order.
        best = min(mine, key=lambda c: (_STATE_RANK[c.obs.state], c.node != spec.node, self.rank[c.node]))
        extra = [c for c in mine if c is not best]
        if best.node == spec.node:
            self.transitions(spec, best)
            for c in extra:
                self.prune_candidate(c, f"duplicate: instance/{spec.name} belongs on {spec.node}")
            return
        stale = next((c for c in extra if c.node == spec.node), None)
        for c in extra:
            why = (
                f"stale {c.obs.state.value} copy: instance/{spec.name} runs on {best.node} and moves here"
                if c is stale
                else f"duplicate: instance/{spec.name} belongs on {spec.node}"
            )
            self.prune_candidate(c, why)
        if stale is not None and (spec.name, spec.node) not in self.leaving:
            self.errors.append(
                Diagnostic(
                    f"instance/{spec.name} is {best.obs.state.value} on {best.node} and a stale "
                    f"{stale.obs.state.value} copy is on its desired node {spec.node}: the handoff needs "
                    "that copy removed first (enable policy.prune, or remove it by hand)",
                    address,
                )
            )
            return
        self.handoff(spec, best, replaces=stale)

    def place_new(self, spec: InstanceSpec) -> None:
        """The instance is on no node that answered: start it, unless it may be on one that did not."""
        address = f"instance/{spec.name}"
        lost = self.inventory_nodes("instance", spec.name, reachable=False)
        if lost:
            self.unknown.append(Unknown(address, lost[0], self.dead_reason(lost[0])))
            self.warnings.append(
                Diagnostic(
                    f"instance/{spec.name} may still run on {lost[0]} (in nephele's inventory, node "
                    f"unreachable): not starting it on {spec.node}",
                    address,
                )
            )
            return
        if spec.state is InstanceState.STOPPED:
            return  # a stopped instance that does not exist is not created (docs/plan.md)
        dark = [n for n in self.node_order if n not in self.up]
        if self.inv is None and dark:
            self.warnings.append(
                Diagnostic(
                    f"instance/{spec.name} is on no node that answered; without an inventory nephele cannot "
                    f"tell whether it runs on {', '.join(dark)}",
                    address,
                )
            )
        self.start(spec, None)

    def inventory_nodes(self, kind: str, name: str, *, reachable: bool) -> list[str]:
        if self.inv is None:
            return []
        nodes = [e.node for e in self.inv.entries if e.kind == kind and e.name == name]
        return [n for n in self.nodes_sorted(nodes) if (n in self.up) == reachable]

    def transitions(self, spec: InstanceSpec, c: _Copy) -> None:
        obs, n, address = c.obs, c.node, f"instance/{spec.name}"
        if obs.snapshot != spec.snapshot:
            self.warnings.append(
                Diagnostic(
                    f"instance/{spec.name} on {n} runs snapshot {obs.snapshot}, the manifest says "
                    f"{spec.snapshot}: nephele does not replace an instance; remove it and add it again",
                    address,
                )
            )
            return
        have, want = obs.state, spec.state
        here = Precondition(Fact.INSTANCE, n, spec.name, uuid=obs.uuid, state=have.value)
        if have is want or want is InstanceState.STOPPED or have is InstanceState.STOPPED:
            if want is InstanceState.STOPPED and have is not InstanceState.STOPPED:
                self.add(
                    Action(
                        id=action_id(ActionKind.STOP_INSTANCE, address),
                        kind=ActionKind.STOP_INSTANCE,
                        address=address,
                        node=n,
                        reason=f"desired state stopped, observed {have.value}",
                        old_ports=obs.ports,
                        state=want,
                        preconditions=(here,),
                    )
                )
            elif have is InstanceState.STOPPED and want is not InstanceState.STOPPED:
                self.start(spec, c)
            elif want is not InstanceState.STOPPED:
                self.change_ports(spec, c, here)
            return
        # Ports first: the port change's precondition names the current state, which the pause or
        # resume would invalidate if it ran first.
        ports_id = self.change_ports(spec, c, here)
        kind = ActionKind.PAUSE_INSTANCE if want is InstanceState.PAUSED else ActionKind.RESUME_INSTANCE
        self.add(
            Action(
                id=action_id(kind, address),
                kind=kind,
                address=address,
                node=n,
                reason=f"desired state {want.value}, observed {have.value}",
                ports=spec.ports,
                old_ports=obs.ports,
                state=want,
                depends_on=(ports_id,) if ports_id else (),
                preconditions=(here,),
            )
        )

    def change_ports(self, spec: InstanceSpec, c: _Copy, here: Precondition) -> str | None:
        if set(c.obs.ports) == set(spec.ports):
            return None
        address = f"instance/{spec.name}"
        a = self.add(
            Action(
                id=action_id(ActionKind.CHANGE_PORTS, address),
                kind=ActionKind.CHANGE_PORTS,
                address=address,
                node=c.node,
                reason=f"ports {_ports(c.obs.ports)} → {_ports(spec.ports)}",
                ports=spec.ports,
                old_ports=c.obs.ports,
                preconditions=(here,),
            )
        )
        old = {p.host for p in c.obs.ports}
        self.acquire += [(a.id, c.node, spec.name, p) for p in spec.ports if p.host not in old]
        return a.id

    def start(self, spec: InstanceSpec, c: _Copy | None) -> None:
        address, n = f"instance/{spec.name}", spec.node
        if c is None:
            pre = [Precondition(Fact.INSTANCE_ABSENT, n, spec.name)]
            reason = "not on any node"
        else:
            pre = [Precondition(Fact.INSTANCE, n, spec.name, uuid=c.obs.uuid, state=c.obs.state.value)]
            reason = f"desired state {spec.state.value}, observed stopped"
        deps = self.instance_deps(spec.snapshot, n, pre)
        a = self.add(
            Action(
                id=action_id(ActionKind.START_INSTANCE, address),
                kind=ActionKind.START_INSTANCE,
                address=address,
                node=n,
                reason=reason,
                ports=spec.ports,
                old_ports=c.obs.ports if c else (),
                state=spec.state,
                depends_on=deps,
                preconditions=tuple(pre),
            )
        )
        self.acquire += [(a.id, n, spec.name, p) for p in spec.ports]

    def handoff(self, spec: InstanceSpec, c: _Copy, replaces: _Copy | None = None) -> None:
        """Move `c` to the desired node. `replaces`: a stale copy there, pruned first (the prune's own
        precondition pins it, so the target is not required to be empty at plan time)."""
        address, src, dst = f"instance/{spec.name}", c.node, spec.node
        live = c.obs.state is not InstanceState.STOPPED and spec.state is not InstanceState.STOPPED
        pre = [Precondition(Fact.INSTANCE, src, spec.name, uuid=c.obs.uuid, state=c.obs.state.value)]
        if replaces is None:
            pre.append(Precondition(Fact.INSTANCE_ABSENT, dst, spec.name))
        deps = self.instance_deps(spec.snapshot, dst, pre)
        if replaces is not None:
            deps = (*deps, self.leaving[(spec.name, dst)])
        reason = f"placement changed {src} → {dst}"
        if not live:
            reason += " (cold: the instance is or will be stopped)"
        if c.obs.snapshot != spec.snapshot:
            self.warnings.append(
                Diagnostic(
                    f"instance/{spec.name} runs snapshot {c.obs.snapshot}, the manifest says "
                    f"{spec.snapshot}: the handoff keeps the running instance as it is",
                    address,
                )
            )
        a = self.add(
            Action(
                id=action_id(ActionKind.HANDOFF, address),
                kind=ActionKind.HANDOFF,
                address=address,
                node=dst,
                source_node=src,
                reason=reason,
                ports=spec.ports,
                old_ports=c.obs.ports,
                state=spec.state,
                mode="live" if live else "cold",
                depends_on=deps,
                preconditions=tuple(pre),
                estimate=estimate.handoff(self.d, c.obs, src, dst, live=live),
            )
        )
        self.leaving[(spec.name, src)] = a.id
        if spec.state is not InstanceState.STOPPED:
            self.acquire += [(a.id, dst, spec.name, p) for p in spec.ports]

    def prune_candidate(self, c: _Copy, why: str) -> None:
        address = f"instance/{c.obs.name}"
        listed = self.inv is not None and self.inv.owns("instance", c.obs.name, c.node)
        blocked = (
            "policy.prune is off"
            if not self.d.policy.prune
            else "its prune flag is false"
            if not c.obs.prune
            else "it is not in nephele's inventory"
            if not listed
            else None
        )
        if blocked:
            self.warnings.append(Diagnostic(f"{address} on {c.node}: {why}; not pruned ({blocked})", address))
            return
        self.add(
            Action(
                id=action_id(ActionKind.PRUNE, address, c.node),
                kind=ActionKind.PRUNE,
                address=address,
                node=c.node,
                reason=why,
                old_ports=c.obs.ports,
                preconditions=(
                    Precondition(Fact.INSTANCE, c.node, c.obs.name, uuid=c.obs.uuid, state=c.obs.state.value),
                ),
            )
        )
        self.leaving[(c.obs.name, c.node)] = action_id(ActionKind.PRUNE, address, c.node)

    def pass_orphans(self) -> None:
        for name, copies in self.copies.items():
            if name in self.d.instances:
                continue
            for c in copies:
                if self.owned(c):
                    self.prune_candidate(c, "not in the manifest")
        if self.inv is not None:
            for e in sorted(self.inv.entries, key=lambda e: (e.kind, e.name, self.rank.get(e.node, 0))):
                if e.kind == "instance" and e.name not in self.d.instances and e.node not in self.up:
                    self.unknown.append(
                        Unknown(f"instance/{e.name}", e.node, f"{self.dead_reason(e.node)}; not pruned")
                    )

    def pass_leftovers(self) -> None:
        """Snapshots, then images, that no kept object needs on a node: removed under the prune rules."""
        for n in self.node_order:
            if n not in self.up:
                continue
            staying: list[ObservedInstance] = [
                i for i in self.up[n].instances.values() if (i.name, n) not in self.leaving
            ]
            used_snaps = {i.snapshot for i in staying}
            removed_snaps: dict[str, str] = {}
            for _, s in sorted(self.up[n].snapshots.items()):
                if n in self.snap_need.get(s.name, {}) or s.name in used_snaps:
                    continue
                leaving = sorted(
                    self.leaving[(i.name, n)]
                    for i in self.up[n].instances.values()
                    if i.snapshot == s.name and (i.name, n) in self.leaving
                )
                a = self.remove(ActionKind.REMOVE_SNAPSHOT, "snapshot", s.name, n, leaving)
                if a is not None:
                    removed_snaps[s.name] = a.id
            kept_snaps = [s for s in self.up[n].snapshots.values() if s.name not in removed_snaps]
            used_images = {s.image for s in kept_snaps}
            used_images |= {self.d.snapshots[x].image for x in self.d.snapshots if n in self.snap_need[x]}
            for _, img in sorted(self.up[n].images.items()):
                spec = self.d.images.get(img.name)
                if (spec and n in spec.nodes) or img.name in used_images:
                    continue
                deps = sorted(
                    removed_snaps[x.name] for x in self.up[n].snapshots.values() if x.image == img.name
                )
                self.remove(ActionKind.REMOVE_IMAGE, "image", img.name, n, deps)

    def remove(self, kind: ActionKind, what: str, name: str, node: str, deps: list[str]) -> Action | None:
        if self.inv is None or not self.inv.owns(what, name, node):
            return None  # not nephele's: an operator's own images and snapshots are left alone
        in_manifest = name in (self.d.images if what == "image" else self.d.snapshots)
        why = f"no longer wanted on {node}" if in_manifest else "not in the manifest"
        address = f"{what}/{name}"
        if not self.d.policy.prune:
            self.warnings.append(
                Diagnostic(f"{address} on {node}: {why}; not pruned (policy.prune is off)", address)
            )
            return None
        obs = self.up[node]
        fact = Fact.IMAGE_PRESENT if what == "image" else Fact.SNAPSHOT_PRESENT
        cid = obs.images[name].content_id if what == "image" else obs.snapshots[name].content_id
        return self.add(
            Action(
                id=action_id(kind, address, node),
                kind=kind,
                address=address,
                node=node,
                reason=why,
                depends_on=tuple(deps),
                preconditions=(Precondition(fact, node, name, content_id=cid),),
            )
        )

    def pass_ports(self) -> None:
        held: dict[tuple[str, int], _Copy] = {}
        for n, obs in self.up.items():
            for inst in obs.instances.values():
                if inst.state in HOLDS_PORTS:
                    for p in inst.ports:
                        held[(n, p.host)] = _Copy(n, inst)
        freed: dict[tuple[str, int], str] = {}
        frees = (ActionKind.STOP_INSTANCE, ActionKind.PRUNE, ActionKind.HANDOFF, ActionKind.CHANGE_PORTS)
        for a in self.actions.values():
            if a.kind not in frees:
                continue
            node = a.source_node or a.node  # a handoff frees its ports on the source
            new = {p.host for p in a.ports} if a.kind is ActionKind.CHANGE_PORTS else set()
            for p in a.old_ports:
                holder = held.get((node, p.host))
                if p.host not in new and holder and holder.obs.name == a.name:
                    freed[(node, p.host)] = a.id
        blocked: set[str] = set()
        for aid, node, name, port in self.acquire:
            a = self.actions[aid]
            holder = held.get((node, port.host))
            if holder is None:
                pre = Precondition(Fact.PORT_FREE, node, port=port.host)
                self.actions[aid] = replace(a, preconditions=(*a.preconditions, pre))
            elif holder.obs.name == name:
                continue
            elif (node, port.host) in freed:
                dep = freed[(node, port.host)]
                if dep not in a.depends_on:
                    self.actions[aid] = replace(a, depends_on=(*a.depends_on, dep))
            else:
                why = (
                    "which this manifest does not manage"
                    if not self.owned(holder)
                    else "which stays (it is not being stopped, moved or pruned)"
                )
                self.errors.append(
                    Diagnostic(
                        f"host port {port.host} on {node} is held by instance/{holder.obs.name}, {why}; "
                        f"instance/{name} cannot use it",
                        f"instance/{name}",
                    )
                )
                blocked.add(aid)
        for aid in blocked:
            del self.actions[aid]

    # ------------------------------------------------------------------------------ order and filters

    def order(self) -> list[Action]:
        """Kahn's algorithm, ties broken by generation order, so the result is deterministic."""
        # An action whose dependency was blocked by an error cannot run either (the error says why).
        dropped = True
        while dropped:
            dropped = False
            for a in list(self.actions.values()):
                if any(d not in self.actions for d in a.depends_on):
                    del self.actions[a.id]
                    dropped = True
        index = {aid: i for i, aid in enumerate(self.actions)}
        waiting = {aid: set(a.depends_on) for aid, a in self.actions.items()}
        dependents: dict[str, list[str]] = {aid: [] for aid in self.actions}
        for aid, deps in waiting.items():
            for dep in deps:
                dependents[dep].append(aid)
        ready = [(index[aid], aid) for aid, deps in waiting.items() if not deps]
        heapq.heapify(ready)
        out: list[Action] = []
        while ready:
            _, aid = heapq.heappop(ready)
            out.append(self.actions[aid])
            for nxt in dependents[aid]:
                waiting[nxt].discard(aid)
                if not waiting[nxt]:
                    heapq.heappush(ready, (index[nxt], nxt))
        done = {a.id for a in out}
        stuck = [aid for aid in self.actions if aid not in done]
        if stuck:
            self.errors.append(
                Diagnostic(
                    f"dependency cycle between {', '.join(stuck)} (for example two instances swapping a "
                    "host port across nodes): change the manifest in two steps"
                )
            )
            out += [self.actions[aid] for aid in stuck]
        return out

    def assign_waves(self, ordered: list[Action]) -> list[Action]:
        """Handoffs run in waves of at most policy.maxParallelHandoffs, at most maxHandoffsPerNode per
        node (as source or target); small handoffs first; a handoff waits for handoffs it depends on."""
        hand = {a.id: a for a in ordered if a.kind is ActionKind.HANDOFF}
        if not hand:
            return ordered
        by_id = {a.id: a for a in ordered}

        def ancestors(aid: str) -> set[str]:
            seen: set[str] = set()
            stack = [aid]
            while stack:
                for dep in by_id[stack.pop()].depends_on:
                    if dep in by_id and dep not in seen:
                        seen.add(dep)
                        stack.append(dep)
            return seen

        needs = {aid: {x for x in ancestors(aid) if x in hand} for aid in hand}
        pending = sorted(hand.values(), key=lambda a: (a.estimate.bytes if a.estimate else 0, a.id))
        wave_of: dict[str, int] = {}
        limit = max(1, self.d.policy.max_parallel_handoffs)
        per_node = max(1, self.d.policy.max_handoffs_per_node)
        wave = 0
        while pending:
            wave += 1
            count, load = 0, dict[str, int]()
            for a in list(pending):
                ends = [a.node, a.source_node or a.node]
                if count >= limit or any(load.get(n, 0) >= per_node for n in ends):
                    continue
                if any(wave_of.get(x, wave) >= wave for x in needs[a.id]):
                    continue
                wave_of[a.id] = wave
                count += 1
                for n in set(ends):
                    load[n] = load.get(n, 0) + 1
                pending.remove(a)
            if wave > len(hand) + 1:  # only a dependency cycle can stall; order() reported it
                for a in pending:
                    wave_of[a.id] = wave
                break
        return [replace(a, wave=wave_of[a.id]) if a.id in wave_of else a for a in ordered]

    def check_targets(self) -> None:
        for t in self.opts.targets:
            kind, _, name = t.partition("/")
            pool: Mapping[str, object] = {
                "instance": {**self.d.instances, **self.copies},
                "image": self.d.images,
                "snapshot": self.d.snapshots,
                "node": dict.fromkeys(self.node_order),
            }.get(kind, {})
            if kind not in TARGET_KINDS or not name:
                raise PlanError(
                    f"--target {t}: expected KIND/NAME with KIND one of {', '.join(TARGET_KINDS)}"
                )
            if name not in pool:
                raise PlanError(f"--target {t}: no {kind} named {name!r} in the manifest or on any node")

    def apply_targets(self, ordered: list[Action]) -> list[Action]:
        targets = self.opts.targets
        if not targets:
            return ordered
        by_id = {a.id: a for a in ordered}

        def hit(a: Action) -> bool:
            return a.address in targets or any(f"node/{n}" in targets for n in (a.node, a.source_node) if n)

        keep = {a.id for a in ordered if hit(a)}
        stack = list(keep)
        while stack:
            for dep in by_id[stack.pop()].depends_on:
                if dep in by_id and dep not in keep:
                    keep.add(dep)
                    stack.append(dep)
        kept = [a for a in ordered if a.id in keep]
        addresses = {a.address for a in kept} | set(targets)
        self.warnings = [w for w in self.warnings if not w.address or w.address in addresses] + [
            Diagnostic(
                f"resource targeting is in effect ({', '.join(targets)}): the plan may not show every "
                "change the manifest needs"
            )
        ]
        self.errors = [e for e in self.errors if not e.address or e.address in addresses]
        self.unknown = [u for u in self.unknown if u.address in addresses or f"node/{u.node}" in targets]
        return kept

    def check_budget(self, ordered: list[Action]) -> None:
        budget = self.d.policy.transfer_budget_bytes
        if budget is None:
            return
        handoffs = [a for a in ordered if a.kind is ActionKind.HANDOFF]
        unsized = [a.address for a in handoffs if a.estimate is None]
        if unsized:
            self.warnings.append(
                Diagnostic(
                    f"no size estimate for the handoff of {', '.join(unsized)}: the transfer budget check "
                    "cannot count it"
                )
            )
        total = sum(a.estimate.bytes for a in handoffs if a.estimate)
        if total <= budget:
            return
        msg = f"handoffs would move ~{mib(total)}, over the transfer budget of {mib(budget)} (policy)"
        if self.opts.ignore_transfer_budget:
            self.warnings.append(Diagnostic(msg + "; planned anyway (--ignore-transfer-budget)"))
        else:
            self.errors.append(Diagnostic(msg + "; raise the budget or use --ignore-transfer-budget"))
