"""The layering, read from the source: each package imports only those below it.

    nst_core (engine, storage)  <-  nst_run (the stored run)  <-  tasks  <-  flows  <-  nst_cli

Every import statement counts, module-level or inside a function (a lazy import is still a
dependency). A few lines of ``ast`` rather than a tool: the rules are short and project-specific.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAYERS = ("nst_core", "nst_run", "tasks", "flows", "nst_cli")
# nst_run's one module that computes with PyTorch; the rest of the package must not need it.
TORCH_MODULE = "nst_run.execute"


def modules(package: str) -> dict[str, Path]:
    found = {}
    for path in sorted((REPO / package).rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path) -> set[str]:
    """Every absolute module name ``path`` imports (``from a.b import c`` counts as ``a.b`` and ``a.b.c``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def layer_of(name: str) -> int | None:
    top = name.split(".", 1)[0]
    return LAYERS.index(top) if top in LAYERS else None


ALL = {name: path for package in LAYERS for name, path in modules(package).items()}


def test_the_layers_exist_and_hold_modules():
    assert {name.split(".", 1)[0] for name in ALL} == set(LAYERS)


@pytest.mark.parametrize("module", sorted(ALL))
def test_no_module_imports_a_layer_above_its_own(module):
    own = layer_of(module)
    above = sorted(n for n in imports(ALL[module]) if (layer := layer_of(n)) is not None and layer > own)
    assert not above, f"{module} imports {above}: a layer above {LAYERS[own]}"


def test_engine_and_stored_run_never_import_prefect():
    offenders = {m: n for m in ALL if layer_of(m) <= LAYERS.index("nst_run") for n in imports(ALL[m]) if n.split(".")[0] == "prefect"}
    assert not offenders, offenders


def test_only_execute_imports_torch_in_nst_run_and_nothing_there_imports_execute():
    torch_users = sorted(m for m, p in ALL.items() if m.startswith("nst_run") and any(n.split(".")[0] == "torch" for n in imports(p)))
    assert torch_users == [TORCH_MODULE]
    assert not [m for m, p in ALL.items() if m.startswith("nst_run") and m != TORCH_MODULE and any(n.startswith(TORCH_MODULE) for n in imports(p))]


def test_cli_commands_import_the_common_module_never_main():
    offenders = sorted(m for m, p in ALL.items() if m.startswith("nst_cli.") and m != "nst_cli.main" and any(n.startswith("nst_cli.main") for n in imports(p)))
    assert not offenders, offenders


def test_nst_core_keeps_no_stub_of_a_module_that_moved_to_nst_run():
    moved = {"manifest", "items", "lease", "status", "review", "report", "export", "results", "planning", "execute", "paths"}
    assert not sorted(moved & {p.stem for p in (REPO / "nst_core").glob("*.py")})


def test_the_stored_run_imports_without_torch_or_prefect():
    """Importing every nst_run module but execute (and nst_core's torch-free modules) loads neither torch nor Prefect."""
    light = sorted(m for m in ALL if m.startswith("nst_run") and m != TORCH_MODULE)
    light += ["nst_core.params", "nst_core.layers", "nst_core.weights", "nst_core.version", "nst_core.images", "nst_core.storage"]
    code = f"import sys\nfor m in {light!r}: __import__(m)\nprint(sorted({{n.split('.')[0] for n in sys.modules}} & {{'torch', 'prefect'}}))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
