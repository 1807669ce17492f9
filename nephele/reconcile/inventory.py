"""The inventory of one manifest (Flux's pattern): the images, snapshots and instances nephele created,
per node. The planner prunes only what is listed here (or tagged with the manifest's name on the node).

It is updated after every successful action, and reconciled with each fresh observation: objects a
reachable node no longer has are dropped, instances a node reports as tagged with this manifest are
adopted (the tag is written by the node when nephele starts the instance). Nothing is dropped for an
unreachable node: not answering is not being gone.
"""

from __future__ import annotations

import threading
from pathlib import Path

from nephele.errors import NepheleError
from nephele.model import Inventory, InventoryEntry, Observed
from nephele.reconcile import statedir
from nephele.reconcile.actions import Action, ActionKind

FILE = "inventory.json"


class InventoryStore:
    def __init__(self, directory: Path, manifest: str) -> None:
        self.path = directory / FILE
        self.manifest = manifest
        self._lock = threading.Lock()
        self._entries: set[InventoryEntry] | None = None

    def load(self) -> Inventory | None:
        """The inventory, or None when nephele has never applied this manifest from here."""
        with self._lock:
            if self._read() is None:
                return None
            return Inventory(self.manifest, frozenset(self._entries or ()))

    def _read(self) -> set[InventoryEntry] | None:
        """Load the file once (the caller holds the lock); None when there is no file yet."""
        if self._entries is None:
            data = statedir.read_json(self.path, "inventory")
            if data is None:
                return None
            try:
                inv = Inventory.from_dict(data)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise NepheleError(f"{self.path}: not a nephele inventory ({exc})") from exc
            if inv.manifest != self.manifest:
                raise NepheleError(
                    f"{self.path}: this inventory belongs to manifest {inv.manifest!r}, not {self.manifest!r}"
                )
            self._entries = set(inv.entries)
        return self._entries

    def _entries_for_update(self) -> set[InventoryEntry]:
        entries = self._read()
        if entries is None:
            entries = self._entries = set()
        return entries

    def _save(self, entries: set[InventoryEntry]) -> None:
        statedir.write_json(self.path, Inventory(self.manifest, frozenset(entries)).to_dict())

    def reconcile(self, observed: Observed, *, save: bool = True) -> Inventory | None:
        """Drop what reachable nodes no longer hold; adopt instances tagged with this manifest. None:
        there is no inventory yet and nothing to adopt (the planner then knows it has no record).
        `save=False` (plan, dry runs): the same answer, nothing written."""
        with self._lock:
            existed = self._read() is not None
            entries = self._entries_for_update()
            if not save:
                entries = set(entries)  # answer without changing what a later record() saves
            before = set(entries)
            for e in list(entries):
                obs = observed.nodes.get(e.node)
                if obs is None or not obs.reachable:
                    continue
                held = {"image": obs.images, "snapshot": obs.snapshots, "instance": obs.instances}.get(e.kind)
                if held is not None and e.name not in held:
                    entries.discard(e)
            for node, obs in observed.nodes.items():
                if obs.reachable:
                    for inst in obs.instances.values():
                        if inst.manifest == self.manifest:
                            entries.add(InventoryEntry("instance", inst.name, node))
            if not existed and (not save or not entries):
                self._entries = None  # still no file: load() keeps answering None
            if not existed and not entries:
                return None
            if save and (entries != before or not existed):
                self._save(entries)
            return Inventory(self.manifest, frozenset(entries))

    def record(self, a: Action) -> None:
        """Note the effect of a successful action (crash-safe write before the next action is told)."""
        add: list[InventoryEntry] = []
        drop: list[InventoryEntry] = []
        name = a.name
        match a.kind:
            case ActionKind.IMPORT_IMAGE:
                add.append(InventoryEntry("image", name, a.node))
            case ActionKind.DISTRIBUTE_SNAPSHOT:
                add.append(InventoryEntry("snapshot", name, a.node))
            case ActionKind.REMOVE_IMAGE:
                drop.append(InventoryEntry("image", name, a.node))
            case ActionKind.REMOVE_SNAPSHOT:
                drop.append(InventoryEntry("snapshot", name, a.node))
            case ActionKind.PRUNE:
                drop.append(InventoryEntry("instance", name, a.node))
            case ActionKind.HANDOFF:
                if a.source_node:
                    drop.append(InventoryEntry("instance", name, a.source_node))
                add.append(InventoryEntry("instance", name, a.node))
            case _:  # start, stop, pause, resume, ports: the instance is ours, on a.node
                add.append(InventoryEntry("instance", name, a.node))
        with self._lock:
            entries = self._entries_for_update()
            before = set(entries)
            entries.difference_update(drop)
            entries.update(add)
            if entries != before or not self.path.exists():
                self._save(entries)
