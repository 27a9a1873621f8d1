"""The shape of scripts/ (issue 26), checked with ast and subprocesses:

- llamagw/wire/ is sans-IO: no module it reaches within the package imports asyncio or socket;
- no module or folder under scripts/ or tests/ has the name of a standard library module;
- the imports among llamagw's modules (function-level ones included) form no cycle;
- every program in scripts/ imports cleanly the way `python3 scripts/x.py` loads it;
- health_server.py loads no llamagw module but health/, config and backend_state, and those import
  nothing else but the standard library;
- no llamagw module and no program in scripts/ is over MAX_LINES lines, but the ones listed to
  split;
- README.md's Layout names every program and every package folder.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
PACKAGE = "llamagw"
# The programs the README, the Makefile and entrypoint.sh run as `python3 scripts/x.py`.
ENTRIES = ("gateway", "health_server", "keys", "llama_bin", "run_local", "fetch_model")
WIRE_FORBIDDEN = frozenset({"asyncio", "socket"})
# What the health server may load from the package: it must answer the platform's probes within a
# fraction of a second of the container's start.
HEALTH = f"{PACKAGE}.health"
HEALTH_SERVER_MAY_LOAD = frozenset({PACKAGE, f"{PACKAGE}.config", f"{PACKAGE}.backend_state",
                                    HEALTH, f"{HEALTH}.prober", f"{HEALTH}.server"})
# About 500 lines a module or program (issue 26), with some slack.
MAX_LINES = 550
# Over MAX_LINES when the package was made. Any other module over it fails the test; a module
# split below it must leave this list.
TO_SPLIT: set[str] = set()
# Run in a fresh interpreter: load a program by path as `python3 scripts/x.py` does (its folder
# first on sys.path), without running main; print the package's modules it loaded.
ENTRY_PROBE = """
import importlib.util, os, sys
path = sys.argv[1]
sys.path.insert(0, os.path.dirname(path))
spec = importlib.util.spec_from_file_location("entry_under_test", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
print(" ".join(sorted(m for m in sys.modules if m.split(".")[0] == sys.argv[2])))
"""
PROBE_TIMEOUT = 60


def package_modules() -> dict[str, Path]:
    """Dotted name -> file, for the package and every module in it."""
    modules = {}
    for path in sorted((SCRIPTS / PACKAGE).rglob("*.py")):
        parts = path.relative_to(SCRIPTS).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imported(path: Path) -> set[str]:
    """The dotted names a module imports, anywhere in it; `from a import b` gives a and a.b."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: the package imports absolutely"
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def package_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (importing a.b.c runs a and a.b too)."""
    modules = package_modules()
    graph = {}
    for name, path in modules.items():
        deps = set()
        for dotted in imported(path):
            parts = dotted.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                if prefix in modules and prefix != name:
                    deps.add(prefix)
        graph[name] = deps
    return graph


def test_wire_imports_neither_asyncio_nor_socket():
    modules, graph = package_modules(), package_graph()
    wire = [m for m in modules if m.startswith(f"{PACKAGE}.wire.")]
    assert wire
    for start in wire:
        seen, todo = set(), [start]
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo.extend(graph[m])
        for m in sorted(seen):
            bad = {n.split(".")[0] for n in imported(modules[m])} & WIRE_FORBIDDEN
            assert not bad, f"{start} reaches {m}, which imports {sorted(bad)}"


def test_no_module_shadows_the_standard_library():
    bad = []
    for top in (SCRIPTS, ROOT / "tests"):
        for path in sorted(top.rglob("*")):
            rel = path.relative_to(ROOT)
            if any(p == "__pycache__" or p.startswith(".") for p in rel.parts) \
                    or rel.parts[:2] == ("tests", "data"):
                continue
            if path.is_dir():
                name = path.name
            elif path.suffix == ".py" and path.stem != "__init__":
                name = path.stem
            else:
                continue
            if name in sys.stdlib_module_names:
                bad.append(str(rel))
    assert not bad, f"named like a standard library module: {bad}"


def test_no_import_cycles_in_the_package():
    graph = package_graph()
    done: set[str] = set()

    def visit(m: str, path: list[str]) -> None:
        if m in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if m in done:
            return
        for dep in sorted(graph[m]):
            visit(dep, path + [m])
        done.add(m)

    for m in sorted(graph):
        visit(m, [])


def test_every_package_folder_says_what_it_is_and_the_top_is_empty():
    for name, path in package_modules().items():
        if path.name == "__init__.py":
            tree = ast.parse(path.read_text(encoding="utf-8"))
            assert ast.get_docstring(tree), f"{path}: a one-line docstring (the layer, its rule)"
            if name == PACKAGE:
                assert len(tree.body) == 1, f"{path}: docstring only (see its docstring)"


def _load(entry: str, tmp_path) -> set[str]:
    proc = subprocess.run([sys.executable, "-I", "-c", ENTRY_PROBE, str(SCRIPTS / f"{entry}.py"),
                           PACKAGE], cwd=tmp_path, capture_output=True, text=True,
                          timeout=PROBE_TIMEOUT)
    assert proc.returncode == 0, f"scripts/{entry}.py does not import:\n{proc.stderr}"
    return set(proc.stdout.split())


def test_the_pinned_programs_are_there():
    assert set(ENTRIES) <= {p.stem for p in SCRIPTS.glob("*.py")}


@pytest.mark.parametrize("entry", sorted(p.stem for p in SCRIPTS.glob("*.py")))
def test_every_program_imports_cleanly(entry, tmp_path):
    _load(entry, tmp_path)


def test_health_server_loads_only_config(tmp_path):
    loaded = _load("health_server", tmp_path)
    assert {f"{PACKAGE}.config", f"{HEALTH}.server"} <= loaded
    assert loaded <= HEALTH_SERVER_MAY_LOAD, sorted(loaded - HEALTH_SERVER_MAY_LOAD)


def test_the_health_server_modules_stay_light():
    """What HEALTH_SERVER_MAY_LOAD lists, and every module in health/, imports (anywhere in it,
    function-level imports included) only the standard library and the modules listed."""
    modules = package_modules()
    health = {m for m in modules if m == HEALTH or m.startswith(f"{HEALTH}.")}
    assert health <= HEALTH_SERVER_MAY_LOAD, sorted(health - HEALTH_SERVER_MAY_LOAD)
    for name in sorted(HEALTH_SERVER_MAY_LOAD):
        for dotted in imported(modules[name]):
            top = dotted.split(".")[0]
            if top == PACKAGE:
                # `from llamagw.x import name` gives llamagw.x.name too: only real modules count
                if dotted in modules:
                    assert dotted in HEALTH_SERVER_MAY_LOAD, f"{name} imports {dotted}"
            else:
                assert top in sys.stdlib_module_names, f"{name} imports {dotted}"


def test_modules_stay_small():
    over = {}
    for path in [*package_modules().values(), *sorted(SCRIPTS.glob("*.py"))]:
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > MAX_LINES:
            over[path.relative_to(SCRIPTS).as_posix()] = n
    new = {rel: n for rel, n in over.items() if rel not in TO_SPLIT}
    assert not new, f"over {MAX_LINES} lines, split them: {new}"
    assert not TO_SPLIT - set(over), f"under {MAX_LINES} lines now, take them off TO_SPLIT: " \
        f"{sorted(TO_SPLIT - set(over))}"


def test_the_readme_layout_names_every_program_and_folder():
    """README.md's Layout block has a line for each program in scripts/ and each package folder
    (a folder's line starts with `  name/`, for the folder or one of its modules)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    starts = [line.split()[0] for line in block.splitlines() if line.strip()]
    programs = [f"scripts/{p.name}" for p in sorted(SCRIPTS.glob("*.py"))]
    missing = [p for p in programs if p not in starts]
    assert not missing, f"programs missing from README's Layout: {missing}"
    folders = sorted(p.name for p in (SCRIPTS / PACKAGE).iterdir()
                     if p.is_dir() and p.name != "__pycache__")
    missing = [f for f in folders if not any(s.startswith(f"{f}/") for s in starts)]
    assert not missing, f"package folders missing from README's Layout: {missing}"
