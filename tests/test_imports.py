"""The package's module graph: every module imports on its own in a fresh interpreter, no two modules import each
other (directly or round a cycle, counting imports inside functions), and lower layers never import higher ones
(pipelines → mil → distill → features → wsi)."""

from __future__ import annotations

import ast
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("wsi", "features", "distill", "mil", "pipelines")  # lowest layer first


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Module → the project modules it imports anywhere in its body."""
    known = modules()
    graph: dict[str, set[str]] = {name: set() for name in known}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            for target in targets:
                while target and target not in known:
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(target + "."):  # a package's own __init__
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    colour, stack = {n: 0 for n in graph}, []

    def visit(node: str) -> list[str] | None:
        colour[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if colour[nxt] == 1:
                return stack[stack.index(nxt):] + [nxt]
            if colour[nxt] == 0 and (cycle := visit(nxt)):
                return cycle
        colour[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if colour[node] == 0 and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles_and_layers_point_down():
    graph = import_graph()
    assert find_cycle(graph) is None, f"import cycle: {' → '.join(find_cycle(graph))}"
    layer = {p: i for i, p in enumerate(PACKAGES)}
    upward = [f"{a} → {b}" for a, targets in graph.items() for b in targets
              if layer[b.split(".")[0]] > layer[a.split(".")[0]]]
    assert upward == [], f"lower layers import higher ones: {upward}"


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_module_imports_on_its_own():
    def load(name: str) -> tuple[str, str]:
        result = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, cwd=ROOT)
        return name, result.stderr.strip().splitlines()[-1] if result.returncode else ""

    with ThreadPoolExecutor(4) as pool:
        failures = [f"{name}: {error}" for name, error in pool.map(load, sorted(modules())) if error]
    assert failures == []


def test_the_engine_imports_no_stage_and_modules_stay_small():
    """The engine (plan, runner, cluster, state, lock, run directory) is handed the stage table; it imports no
    stage, deploy or CLI module, nor the model packages. No module is much over 350 lines."""
    graph = import_graph()
    engine = {name: targets for name, targets in graph.items() if name.startswith("pipelines.engine")}
    assert len(engine) >= 8
    forbidden = ("pipelines.stages", "pipelines.deploy", "pipelines.cli", "pipelines.status", "pipelines.live",
                 "features", "distill", "mil")
    wrong = [f"{a} → {b}" for a, targets in engine.items() for b in targets
             if any(b == f or b.startswith(f + ".") for f in forbidden)]
    assert wrong == [], wrong
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > 370}
    assert long == {}, long
