"""The layering rules hold: which folders may import torch, tensorrt, onnxruntime and each other.

- iropt/, passes/ and dsl/ never import torch or tensorrt; lowering/ imports them only inside
  functions, so that importing iropt never needs them.
- passes/ never imports onnxruntime (a pass runs a model through ctx.runner_factory).
- dsl/ knows the registry, not iropt.passes or iropt.lowering.

ruff's banned-api rule (TID251) enforces this in the editor and in CI; the AST scan here also
sees imports that ruff allows by configuration (lowering/) and checks where they sit.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from iropt.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "tensorrt", "tensorrt_rtx")


def ruff(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """ruff from this environment, run at the repository root so its configuration applies."""
    return subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "--select", "TID251", *args],
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_ruff_finds_no_banned_imports() -> None:
    result = ruff("iropt", "passes", "dsl", "lowering")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("filename", "source", "banned"),
    [
        ("passes/_probe.py", "import torch\n", True),
        ("iropt/_probe.py", "from tensorrt import Builder\n", True),
        ("passes/_probe.py", "import onnxruntime\n", True),
        ("dsl/_probe.py", "import iropt.passes\n", True),
        ("dsl/_probe.py", "from iropt.lowering import ort\n", True),
        ("dsl/_probe.py", "import torch\n", True),
        ("lowering/_probe.py", "import torch\n", False),
        ("passes/_probe.py", "import numpy\n", False),
    ],
)
def test_ruff_configuration_bans_what_it_should(filename: str, source: str, banned: bool) -> None:
    # Without this, a configuration typo would make the check above pass vacuously.
    result = ruff("--stdin-filename", filename, "-", stdin=source)
    assert ("TID251" in result.stdout) is banned, result.stdout + result.stderr
    assert result.returncode == (1 if banned else 0)


def python_files(folder: str) -> list[Path]:
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files, folder
    return files


def imported_modules(node: ast.AST) -> Iterator[tuple[str, ast.AST]]:
    """(module name, node) for every import statement and importlib.import_module("...") call."""
    for child in ast.walk(node):
        if isinstance(child, ast.Import):
            for alias in child.names:
                yield alias.name, child
        elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
            yield child.module, child
        elif (
            isinstance(child, ast.Call)
            and isinstance(child.func, (ast.Attribute, ast.Name))
            and getattr(child.func, "attr", getattr(child.func, "id", "")) == "import_module"
            and child.args
            and isinstance(child.args[0], ast.Constant)
            and isinstance(child.args[0].value, str)
        ):
            yield child.args[0].value, child


def is_under(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def violations(folder: str, packages: tuple[str, ...]) -> list[str]:
    found = []
    for path in python_files(folder):
        tree = ast.parse(path.read_text(), filename=str(path))
        for module, node in imported_modules(tree):
            if is_under(module, *packages):
                found.append(f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}: {module}")
    return found


@pytest.mark.parametrize("folder", ["iropt", "passes", "dsl"])
def test_core_never_imports_torch_or_tensorrt(folder: str) -> None:
    assert violations(folder, HEAVY) == []


def test_passes_never_import_onnxruntime() -> None:
    assert violations("passes", ("onnxruntime",)) == []


def test_dsl_does_not_import_passes_or_back_ends() -> None:
    assert violations("dsl", ("iropt.passes", "iropt.lowering", "passes", "lowering")) == []


def module_level_imports(tree: ast.Module) -> Iterator[tuple[str, ast.AST]]:
    """Imports that run when the module is imported: everything outside function bodies.

    `if TYPE_CHECKING:` blocks never run, so imports for annotations are allowed there.
    """
    pending: list[ast.AST] = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            pending.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield from imported_modules(node)
        pending.extend(ast.iter_child_nodes(node))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def test_lowering_imports_torch_and_tensorrt_only_inside_functions() -> None:
    found = []
    for path in python_files("lowering"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for module, node in module_level_imports(tree):
            if is_under(module, *HEAVY):
                found.append(f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}: {module}")
    assert found == []


def test_the_scan_sees_module_level_imports() -> None:
    # The scanner itself: nested, conditional and try-block imports count; function bodies and
    # TYPE_CHECKING blocks do not.
    tree = ast.parse(
        "import os\n"
        "try:\n    import torch\nexcept ImportError:\n    torch = None\n"
        "if TYPE_CHECKING:\n    import tensorrt\n"
        "class A:\n    import tensorrt_rtx\n"
        "def f():\n    import torch.nn\n"
    )
    assert sorted(name for name, _ in module_level_imports(tree)) == ["os", "tensorrt_rtx", "torch"]


def test_importing_iropt_loads_no_heavy_runtime(tmp_path: Path) -> None:
    # Importing the whole package, the CLI and every pass must not pull in torch or TensorRT; the
    # passes alone must not pull in ONNX Runtime either.
    check = (
        "import sys, iropt, iropt.passes, iropt.dsl, iropt.lowering, iropt.app.cli\n"
        "from iropt.infra.registry import PASSES\n"
        "PASSES.names()\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'tensorrt', 'tensorrt_rtx'}))\n"
    )
    passes_only = (
        "import sys\nfrom iropt.infra.registry import PASSES\nPASSES.names()\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'onnxruntime', 'torch'}))\n"
    )
    for source in (check, passes_only):
        result = subprocess.run(
            [sys.executable, "-c", source], cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "[]"


def test_torch_front_end_explains_a_missing_torch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from iropt.lowering import torch_frontend

    # A None entry makes `import torch` fail as if torch were not installed.
    monkeypatch.setitem(sys.modules, "torch", None)

    with pytest.raises(UserError, match=r"torch is not installed: pip install iropt\[torch\]"):
        torch_frontend.export_from_spec("pkg.module:factory", [1, 3], tmp_path / "out.onnx")
    assert list(tmp_path.iterdir()) == []


# --- the layers of iropt/ and the import graph ------------------------------------------------

# Lower layers never import higher ones. Within a layer, modules import each other freely (the
# cycle check below still holds). The package root `iropt` is the public facade: nothing inside
# imports it.
LAYERS: dict[str, int] = {
    "iropt.errors": 0,
    "iropt.util": 0,
    "iropt.schedules": 0,
    "iropt.ir": 1,
    "iropt.io": 2,
    "iropt.verify": 3,
    "iropt.infra": 4,
    "iropt.rewrite": 5,
    "iropt.compress": 6,
    "iropt.dsl": 6,
    "iropt.passes": 7,
    "iropt.lowering": 7,
    "iropt.app": 8,
    "iropt": 9,
}
FOLDERS = {"iropt": "iropt", "passes": "iropt.passes", "lowering": "iropt.lowering", "dsl": "iropt.dsl"}


def module_name(path: Path) -> str:
    relative = path.relative_to(ROOT).with_suffix("")
    parts = list(relative.parts)
    parts[0] = FOLDERS[parts[0]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> tuple[str, int]:
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if is_under(module, prefix):
            return prefix, LAYERS[prefix]
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def runtime_imports() -> dict[str, set[str]]:
    """iropt module -> the iropt modules it imports when run (function bodies included,
    TYPE_CHECKING blocks not), resolved to modules that exist."""
    modules = {module_name(path): path for folder in FOLDERS for path in python_files(folder)}
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        targets: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and _is_type_checking(node.test):
                node.body = []
        for imported, node in imported_modules(tree):
            names = [alias.name for alias in node.names] if isinstance(node, ast.ImportFrom) else []
            for candidate in [f"{imported}.{name}" for name in names] + [imported]:
                if candidate in modules:
                    targets.add(candidate)
                    break
        graph[module] = targets - {module}
    return graph


def test_every_module_imports_only_its_layer_and_below() -> None:
    found = []
    for module, targets in runtime_imports().items():
        own, rank = layer_of(module)
        for target in targets:
            other, other_rank = layer_of(target)
            if other_rank > rank or (other_rank == rank and other != own and rank != 0):
                found.append(f"{module} ({own}) imports {target} ({other})")
    assert sorted(found) == []


def test_passes_never_import_other_passes() -> None:
    found = [
        f"{module} imports {target}"
        for module, targets in runtime_imports().items()
        if is_under(module, "iropt.passes")
        for target in targets
        if is_under(target, "iropt.passes")
    ]
    assert found == []


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of `graph` (its modules in order), or [] when there is none."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str]:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                return [*stack[stack.index(target):], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[module] = 2
        return []

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return []


def test_the_import_graph_has_no_cycle() -> None:
    assert find_cycle(runtime_imports()) == []


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []
