#!/usr/bin/env python3
"""Fails when modules of the crate import each other in a circle.

Every file under src/ is a module (`src/server/store/db.rs` is `server::store::db`, a
`mod.rs` is its folder's module). An edge A -> B is a path in A that names an item of B:
`use crate::...`, `crate::...` inline, `super::...`, or a path starting with one of A's
child modules. A strongly connected group of more than one module is a circle: data
and knowledge should flow one way (socket -> worker -> ledger -> store -> committer ->
ack), so each circle is printed with the lines that close it.

    scripts/check-imports.py [SRC_DIR]
"""

import re
import sys
from collections import defaultdict
from pathlib import Path

PATH = re.compile(r"\b((?:crate|super|self)(?:::[A-Za-z_][A-Za-z0-9_]*)+|[a-z_][a-z0-9_]*(?:::[A-Za-z_{][A-Za-z0-9_]*)+)")
USE_GROUP = re.compile(r"\buse\s+([^;]+);", re.S)


def module_of(src: Path, file: Path) -> tuple:
    parts = list(file.relative_to(src).with_suffix("").parts)
    if parts[-1] in ("mod", "lib") or parts[0] == "bin":
        parts = parts[:-1] if parts[0] != "bin" else []
    return tuple(parts)


def expand_use(tree: str) -> list:
    """`a::{b, c::{d, e}}` -> ["a::b", "a::c::d", "a::c::e"] (enough for edges)."""
    tree = re.sub(r"\s+", "", tree)
    out = []

    def walk(prefix, rest):
        brace = rest.find("{")
        if brace < 0:
            for piece in rest.split(","):
                if piece:
                    out.append(prefix + piece.split(" as ")[0])
            return
        head, body = rest[:brace], rest[brace + 1 : rest.rfind("}")]
        depth, start = 0, 0
        for i, ch in enumerate(body + ","):
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            elif ch == "," and depth == 0:
                walk(prefix + head, body[start:i])
                start = i + 1

    walk("", tree)
    return out


def main() -> int:
    args = [a for a in sys.argv[1:] if a != "-v"]
    src = Path(args[0] if args else "src")
    files = {module_of(src, f): f for f in sorted(src.rglob("*.rs")) if "bin" not in f.relative_to(src).parts}
    modules = set(files)
    edges = defaultdict(dict)
    for module, file in files.items():
        text = re.sub(r"//[^\n]*", "", file.read_text())
        paths = [p for group in USE_GROUP.findall(text) for p in expand_use(group)]
        paths += PATH.findall(USE_GROUP.sub("", text))
        for path in paths:
            segments = [s for s in path.split("::") if s and s != "self"]
            if not segments:
                continue
            if segments[0] == "crate":
                base, rest = (), segments[1:]
            elif segments[0] == "super":
                base, rest = module, segments
                while rest and rest[0] == "super":
                    base, rest = base[:-1], rest[1:]
            elif module + (segments[0],) in modules:
                base, rest = module, segments
            else:
                continue  # std, a dependency, or a local item
            target = base
            for segment in rest:
                if target + (segment,) in modules:
                    target = target + (segment,)
                else:
                    break
            # A module naming its own items or an ancestor's declarations is no edge.
            if target != module and module[: len(target)] != target:
                edges[module].setdefault(target, path)
    # Tarjan's strongly connected components.
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                circles.append(sorted(group))

    sys.setrecursionlimit(10000)
    for v in sorted(modules):
        if v not in index:
            visit(v)
    name = lambda m: "::".join(m) or "crate"
    for group in circles:
        print(f"import circle between {', '.join(name(m) for m in group)}:")
        for a in group:
            for b, path in sorted(edges[a].items()):
                if b in group:
                    print(f"  {name(a)} -> {name(b)}  ({path})")
    if "-v" in sys.argv:
        for a in sorted(edges):
            print(name(a), "->", ", ".join(sorted(name(b) for b in edges[a])))
    count = sum(len(e) for e in edges.values())
    print(f"{len(modules)} modules, {count} import edges, {len(circles)} circles")
    return 1 if circles else 0


if __name__ == "__main__":
    sys.exit(main())
