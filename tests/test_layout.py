"""The package layout keeps its promises: no import circle between packages, the ground floor
(`base`, `texts`) and the pure maths (`solvers`) import no model plumbing, and importing gradfree
touches neither torch's accelerators nor matplotlib."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import gradfree

ROOT = Path(gradfree.__file__).parent


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports() -> dict[str, set[str]]:
    """Package → the gradfree packages its modules import (at any depth, lazy imports too)."""
    edges: dict[str, set[str]] = defaultdict(set)
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        src = _package(".".join(rel.parts).removesuffix(".__init__"))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module == "gradfree":
                    names = [f"gradfree.{a.name}" for a in node.names]
                else:
                    names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                if name.startswith("gradfree."):
                    target = _package(name)
                    if target and target != src and target != "__version__":
                        edges[src].add(target)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one package (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle_between_packages() -> None:
    assert _cycles(_imports()) == []


def test_the_ground_floor_and_the_maths_import_no_plumbing() -> None:
    edges = _imports()
    assert edges.get("base", set()) == set()
    assert edges.get("texts", set()) <= {"base"}
    assert edges.get("solvers", set()) <= {"base"}
    assert edges.get("adapters", set()) <= {"base"}


def test_importing_gradfree_touches_no_accelerator_or_display() -> None:
    code = (
        "import sys, pkgutil, importlib, gradfree\n"
        "for m in pkgutil.walk_packages(gradfree.__path__, 'gradfree.'):\n"
        "    if '.testing' not in m.name: importlib.import_module(m.name)\n"
        "import torch\n"
        "assert not torch.cuda.is_initialized()\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"
