"""The import graph of the ``dhumor`` package, and the layering rule it must follow.

Every ``import`` counts, lazy ones inside functions too (a lazy import is still a dependency).
The rule: the graph of modules has no circle, and the graph of concerns (a top-level module, or a
top-level folder, of ``dhumor/``) only points downward in :data:`LAYERS`.

    python tests/layering.py        # prints each concern's dependencies and any violation
"""
from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dhumor"

# Lower layers first; a concern may import only from its own layer's lower neighbours (earlier
# entries), never from a later one. Concerns in one tuple must not import each other.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "version"),
    ("schema", "paths", "resources", "registry", "util"),
    ("images", "cache"),
    ("encoders",),
    ("data", "ocr", "explain"),
    ("model",),
    ("inference",),
    ("review",),
    ("app",),
    ("cli",),
]


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, modules: set[str] | frozenset = frozenset()) -> set[str]:
    """The ``dhumor`` modules ``path`` imports (absolute names); ``from pkg import sub`` counts as
    importing ``pkg.sub`` alone when ``sub`` is one of ``modules``."""
    me = module_name(path)
    pkg = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "dhumor"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "dhumor":
                continue
            subs = {f"{mod}.{a.name}" for a in node.names} & set(modules)
            out |= subs if subs else {mod}  # `from . import x` imports the submodule x
    return out


def graph() -> dict[str, set[str]]:
    """Module → the dhumor modules it imports (only names that are modules of the package)."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    g = {m: {i for i in imports(p, set(files)) if i in files and i != m} for m, p in files.items()}
    return g


def concern(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one node (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def layer_of(c: str) -> int | None:
    return next((i for i, layer in enumerate(LAYERS) if c in layer), None)


def violations(g: dict[str, set[str]]) -> list[str]:
    """Imports that point sideways or upward between concerns, and concerns no layer names."""
    out = []
    for m, deps in sorted(g.items()):
        c = concern(m)
        if c == "__init__":
            continue  # the package's front door re-exports from anywhere, lazily
        lc = layer_of(c)
        if lc is None:
            out.append(f"{m}: concern {c!r} is in no layer")
            continue
        for d in sorted(deps):
            cd = concern(d)
            if cd == c or cd == "__init__":
                continue
            ld = layer_of(cd)
            if ld is None or ld >= lc:
                out.append(f"{m} imports {d}: {c!r} (layer {lc}) may not import {cd!r} (layer {ld})")
    return out


def concern_graph(g: dict[str, set[str]]) -> dict[str, set[str]]:
    cg: dict[str, set[str]] = defaultdict(set)
    for m, deps in g.items():
        for d in deps:
            if concern(d) != concern(m):
                cg[concern(m)].add(concern(d))
    return cg


if __name__ == "__main__":
    g = graph()
    for c, deps in sorted(concern_graph(g).items(), key=lambda kv: (layer_of(kv[0]) or -1, kv[0])):
        print(f"{c:12s} (layer {layer_of(c)}) -> {', '.join(sorted(deps))}")
    bad = violations(g) + [f"circle: {' <-> '.join(c)}" for c in cycles(g)]
    print("\n".join(bad) if bad else "layering ok: no circle, every import points downward")
    sys.exit(1 if bad else 0)
