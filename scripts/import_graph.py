"""The import structure of ``src/peftkit``, read from the source (nothing is imported or run).

    python scripts/import_graph.py            # cycles, engine -> method-family imports, late imports, largest files

Module-level imports make the graph's edges (``from .x import y`` names module ``x``, or ``x.y`` when that is a
module); imports inside function bodies are listed separately as *late* imports. ``tests/test_house.py``
keeps the rules this prints: no module cycle, the engine imports no method family, and every late internal
import is one of ``ALLOWED_LATE`` with its reason.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "peftkit"

# The engine: what every method is built on. It must not import a method family (``peftkit.methods...``).
ENGINE = {
    "adapter", "adapter_names", "checkpoint", "config", "default_targets", "functional", "io", "kernel_helpers",
    "layers", "mha", "model", "model_api", "peft_surface", "quant", "registry", "routing", "saved_modules",
    "serving", "signature", "targeting", "tuner",
}

# Cycles that are the design: the package imports ``compat`` last (``peftkit/__init__.py``), and ``compat`` serves
# the package's public names as ``peft`` (it reads them from the finished package).
ALLOWED_CYCLES = [["peftkit", "peftkit.compat", "peftkit.compat.facade", "peftkit.compat.finder"]]

# Internal imports inside function bodies, each with the reason it cannot be at the top of its module.
ALLOWED_LATE = {
    ("peftkit.registry", "peftkit.methods"): "every method module imports the registry to register itself",
    # the command line: `peftkit methods` must not pay for importing the training and benchmark stacks
    **{("peftkit.cli", m): "command-line module: each command imports what it runs" for m in (
        "peftkit.checkpoint", "peftkit.config", "peftkit.targeting", "peftkit.train", "peftkit.train.commands",
        "peftkit.train.recipe", "peftkit.train.data", "peftkit.train.models", "peftkit.bench.cli",
        "peftkit.estimate")},
}


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(current: str, is_package: bool, level: int, module: str | None, names: list[str],
             known: dict[str, Path]) -> list[str]:
    if level:
        base = current.split(".")
        base = base if is_package else base[:-1]
        base = base[: len(base) - (level - 1)]
        target = ".".join(base + ([module] if module else []))
    else:
        target = module or ""
    if not target.startswith(PACKAGE):
        return []
    found = [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
    return found if found and len(found) == len(names) else ([target] + found if target in known else found)


def imports(known: dict[str, Path]) -> tuple[dict[str, set[str]], list[tuple[str, str, int]]]:
    """Module -> modules it imports at module level; and the late imports (module, target, line)."""
    top: dict[str, set[str]] = {m: set() for m in known}
    late: list[tuple[str, str, int]] = []
    for name, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        is_package = path.name == "__init__.py"
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        inside = {id(n) for f in functions for n in ast.walk(f) if n is not f}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                targets = _resolve(name, is_package, node.level, node.module, [a.name for a in node.names], known)
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name in known]
            else:
                continue
            if _type_checking_only(tree, node):
                continue
            for target in targets:
                if target == name:
                    continue
                if id(node) in inside:
                    late.append((name, target, node.lineno))
                else:
                    top[name].add(target)
    return top, late


def _type_checking_only(tree: ast.Module, node: ast.AST) -> bool:
    for block in ast.walk(tree):
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test):
            if any(n is node for stmt in block.body for n in ast.walk(stmt)):
                return True
    return False


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    sys.setrecursionlimit(10_000)

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def engine_to_methods(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((m, t) for m, ts in graph.items() if m.removeprefix(f"{PACKAGE}.") in ENGINE
                  for t in ts if t.startswith(f"{PACKAGE}.methods"))


def unexplained_late(late: list[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    return [(m, t, line) for m, t, line in late if (m, t) not in ALLOWED_LATE]


def main() -> int:
    known = modules()
    graph, late = imports(known)
    found = cycles(graph)
    print(f"{len(known)} modules, {sum(len(v) for v in graph.values())} module-level internal imports")
    print(f"cycles: {len(found)}")
    for comp in found:
        print("  " + " <-> ".join(comp))
    with_late = {m: set(ts) for m, ts in graph.items()}
    for m, t, _ in late:
        with_late[m].add(t)
    tied = [c for c in cycles(with_late) if c not in found]
    print(f"cycles closed only by late imports: {len(tied)}")
    for comp in tied:
        print("  " + " <-> ".join(comp))
    bad = engine_to_methods(graph)
    print(f"engine -> method-family imports: {len(bad)}")
    for m, t in bad:
        print(f"  {m} -> {t}")
    print(f"late internal imports: {len(late)} ({len(unexplained_late(late))} without a stated reason)")
    for m, t, line in late:
        print(f"  {known[m].relative_to(ROOT.parent)}:{line} -> {t}: {ALLOWED_LATE.get((m, t), 'NO REASON')}")
    sizes = sorted(((len(p.read_text(encoding='utf-8').splitlines()), p.relative_to(ROOT.parent))
                    for p in known.values()), reverse=True)[:8]
    print("largest files: " + ", ".join(f"{p} {n}" for n, p in sizes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
