"""The checkout's layout cannot break a dependency or hide a cycle.

- import path = file path: moe_train is the only importable top-level folder, and no module in bench/, scripts/,
  tests/ or launch/ carries the name of an installed distribution's top-level package (python puts the checkout's
  root or the script's folder first on sys.path, so such a name shadows the dependency: bench/kernels.py and a
  top-level kernels/ once hid the PyPI package `kernels` that transformers 5.25 imports);
- running from the checkout's root imports transformers' hub-kernels integration (which imports `kernels`);
- no import cycle between modules of moe_train (imports inside functions count: they are where cycles hide), and
  imports of moe_train inside functions only in the CLI (subcommands load their job on demand). The layers between
  packages are import-linter's contract in pyproject.toml, run by .ci/run.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAZY_IMPORTS_ALLOWED = {"moe_train/cli.py", "moe_train/planner/cli.py"}  # subcommands
# internal modules that import an optional dependency at module level (lm-evaluation-harness, triton): imported
# where used, so that the package works without them
OPTIONAL_MODULES = {"moe_train.eval.lm_eval_adapter", "moe_train.kernels.triton_routing",
                    "moe_train.kernels.triton_permute"}


def _installed_top_level_names() -> set[str]:
    return set(md.packages_distributions())


def test_only_moe_train_is_a_top_level_package():
    packages = sorted(p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert packages == ["moe_train"], packages


def test_no_script_or_module_shadows_an_installed_package():
    installed = _installed_top_level_names()
    assert "torch" in installed  # the lookup works in this environment
    clashes = []
    for folder in ("bench", "scripts", "tests", "launch"):
        for path in (ROOT / folder).glob("*.py"):
            if path.stem in installed:
                clashes.append(f"{folder}/{path.name}")
        for path in (ROOT / folder).iterdir():
            if path.is_dir() and path.name in installed:
                clashes.append(f"{folder}/{path.name}/")
    for path in ROOT.iterdir():
        if path.suffix == ".py" and path.stem in installed:
            clashes.append(path.name)
    assert not clashes, f"rename these: they shadow installed packages when run from the checkout: {clashes}"


def test_running_from_the_checkout_root_does_not_shadow_a_dependency():
    pytest.importorskip("transformers")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    code = ("import sys; assert sys.path[0] == '', sys.path[0]\n"
            "import importlib.util\n"
            "spec = importlib.util.find_spec('kernels')\n"
            "origin = spec.origin if spec else None\n"
            "assert origin is None or 'site-packages' in origin or 'dist-packages' in origin, origin\n"
            "import transformers.integrations.hub_kernels\n"
            "import moe_train.kernels, moe_train.parallel\n"
            "print('ok', origin)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr[-3000:]


def _internal_imports(path: Path) -> tuple[set[str], list[tuple[int, list[str]]]]:
    """(every moe_train module ``path`` imports, anywhere but under ``if TYPE_CHECKING:`` (annotations only, never
    run: import-linter's exclude_type_checking_imports too); the ones imported inside functions, with line)."""
    tree = ast.parse(path.read_text())
    everything, lazy = set(), []
    in_function, type_only = set(), set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(n) for n in ast.walk(fn))
        if isinstance(fn, ast.If) and isinstance(fn.test, ast.Name) and fn.test.id == "TYPE_CHECKING":
            type_only.update(id(n) for stmt in fn.body for n in ast.walk(stmt))
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from moe_train.x import y` may import the submodule moe_train.x.y
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        names = [n for n in names if n == "moe_train" or n.startswith("moe_train.")]
        if not names:
            continue
        everything.update(names)
        if id(node) in in_function:
            lazy.append((node.lineno, names))
    return everything, lazy


def _module_graph() -> dict[str, set[str]]:
    files = {}
    for path in (ROOT / "moe_train").rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        files[".".join(parts)] = path
    graph = {}
    for name, path in files.items():
        imported, _ = _internal_imports(path)
        graph[name] = {m for m in imported if m in files and m != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(root: str) -> None:
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _is_package_init_edge(a: str, b: str) -> bool:
    """A package's __init__ importing its own submodules (and a submodule naming its package in `from pkg import x`)
    is how Python packages are built, not a cycle between modules."""
    return b.startswith(a + ".") or a.startswith(b + ".")


def test_no_import_cycles_between_modules():
    graph = _module_graph()
    graph = {a: {b for b in bs if not _is_package_init_edge(a, b)} for a, bs in graph.items()}
    assert _cycles(graph) == []


def test_the_cycle_check_can_fail():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_imports_inside_functions_only_in_the_cli():
    offenders = []
    for path in sorted((ROOT / "moe_train").rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        if rel in LAZY_IMPORTS_ALLOWED:
            continue
        for line, modules in _internal_imports(path)[1]:
            if not OPTIONAL_MODULES.intersection(modules):
                offenders.append(f"{rel}:{line} {modules[0]}")
    assert not offenders, ("move these imports to the top of their module (a cycle they hide belongs in a module of "
                           f"its own): {offenders}")
