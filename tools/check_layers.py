#!/usr/bin/env python3
"""The layer contract of DESIGN.md §3, checked on the source (no import needed).

A package may import from its own package and from layers below it, never from a layer above or from a
sibling in its own layer. Only nephele.node imports libvirt; only nephele.agent imports fabric (and the
paramiko/invoke it stands on). Prints every violation as FILE:LINE: message; exits 1 if any.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

# Top to bottom. Packages in one tuple are independent siblings.
LAYERS: list[tuple[str, ...]] = [
    ("cli",),
    ("reconcile", "cloudlet"),
    ("manifest",),
    ("agent",),
    ("handoff",),
    ("node",),
    ("vmstate", "delta"),
    ("model", "errors"),
]
ONLY = {"libvirt": "node", "fabric": "agent", "paramiko": "agent", "invoke": "agent"}


def layer_of(part: str) -> int | None:
    for i, names in enumerate(LAYERS):
        if part in names:
            return i
    return None


def imported_modules(tree: ast.AST, module: str) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    pkg = module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name))
    return found


def check(root: Path) -> list[str]:
    errors: list[str] = []
    src = root / "nephele"
    for path in sorted(src.rglob("*.py")):
        rel = path.relative_to(root)
        module = ".".join(rel.with_suffix("").parts)
        if module.endswith(".__init__"):
            module = module[: -len(".__init__")] + ".__init__"
        parts = module.split(".")
        own = parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] != "__init__") else None
        if own == "__main__":  # `python -m nephele` is part of the command line front end
            own = "cli"
        own_layer = layer_of(own) if own else None
        if own and own_layer is None:
            errors.append(f"{rel}:1: package nephele.{own} is not in the layer list (tools/check_layers.py)")
            continue
        tree = ast.parse(path.read_text(), str(rel))
        for lineno, name in imported_modules(tree, module):
            top = name.split(".")[0]
            if top in ONLY and own != ONLY[top]:
                errors.append(f"{rel}:{lineno}: imports {top}; only nephele.{ONLY[top]} may")
            if top != "nephele" or own is None:
                continue
            target = name.split(".")[1] if "." in name else None
            if target is None or target == own:
                continue
            tl = layer_of(target)
            if tl is None:
                continue
            if tl < own_layer or (tl == own_layer and target != own):  # type: ignore[operator]
                errors.append(
                    f"{rel}:{lineno}: nephele.{own} must not import nephele.{target} "
                    f"(layers: {' > '.join('|'.join(names) for names in LAYERS)})"
                )
    return errors


def main() -> int:
    errors = check(Path(__file__).resolve().parent.parent)
    for e in errors:
        print(e)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
