"""The package installs under the `iropt` namespace, from a wheel and editable alike.

The repository keeps passes/, lowering/ and dsl/ at the top level, and setuptools maps them to
iropt.passes, iropt.lowering and iropt.dsl. These tests build a real wheel, install it into a
fresh virtual environment (offline: the dependencies come from this environment through a .pth
file) and use it from outside the repository, so an import that only works from the source tree
(`from passes.x import ...`) or a data file missing from the wheel fails here.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAPPED = {"passes": "iropt/passes", "lowering": "iropt/lowering", "dsl": "iropt/dsl"}


def run(command: list[str], cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    """Run a command, failing the test with its output when it fails."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def wheel_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A wheel built from a copy of the sources (the build never writes into the repository),
    and what the build printed."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    shutil.copytree(ROOT, source, ignore=_not_sources)
    dist = work / "dist"
    if importlib.util.find_spec("build") is not None:
        command = [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--no-isolation",
            "--outdir",
            str(dist),
            str(source),
        ]
    else:
        command = [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(dist),
            str(source),
        ]
    result = run(command, work)
    (built,) = dist.glob("iropt-*.whl")
    return built, result.stdout + result.stderr


@pytest.fixture(scope="module")
def wheel(wheel_build: tuple[Path, str]) -> Path:
    return wheel_build[0]


def test_build_prints_no_deprecated_metadata_warning(wheel_build: tuple[Path, str]) -> None:
    # The SPDX string form of `license` (PEP 639); the table form makes setuptools warn.
    _, output = wheel_build
    assert "project.license" not in output and "SetuptoolsDeprecationWarning" not in output, output
    metadata = next(n for n in zipfile.ZipFile(wheel_build[0]).namelist() if n.endswith(".dist-info/METADATA"))
    assert "License-Expression: Apache-2.0" in zipfile.ZipFile(wheel_build[0]).read(metadata).decode()


# Top-level folders that are not part of the distribution (and may be large), and build litter.
_SKIP_TOP = {".venv", ".git", "tests", "golden_models", "bench", "out", "build", "dist", ".ci"}
_SKIP_ANYWHERE = ("__pycache__", "*.pyc", "*.egg-info", ".*_cache", ".hypothesis")


def _not_sources(folder: str, names: list[str]) -> set[str]:
    ignored = set(shutil.ignore_patterns(*_SKIP_ANYWHERE)(folder, names))
    if Path(folder) == ROOT:
        ignored |= _SKIP_TOP & set(names)
    return ignored


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh environment with the wheel installed and this environment's dependencies visible."""
    root = tmp_path_factory.mktemp("venv") / "env"
    # No pip inside the new environment: this environment's pip installs into it (--python).
    run([sys.executable, "-m", "venv", "--without-pip", str(root)], root.parent)
    python = root / "bin" / "python"
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        root.parent,
    )
    site = Path(
        run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root
        ).stdout.strip()
    )
    # A plain path line: the directory joins sys.path *after* the new site-packages, and the .pth
    # files inside it (the editable install's finder among them) are not executed.
    ours = sysconfig.get_paths()["purelib"]
    (site / "project_dependencies.pth").write_text(ours + "\n")
    return root


def test_wheel_contents(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/", 1)[0] for name in names}
    assert {t for t in top if not t.endswith((".dist-info", ".data"))} == {"iropt"}
    for folder, installed in MAPPED.items():
        modules = sorted(p.name for p in (ROOT / folder).glob("*.py"))
        assert modules, folder
        for module in modules:
            assert f"{installed}/{module}" in names, f"{folder}/{module} is missing from the wheel"
        assert f"{installed}/py.typed" in names
    assert "iropt/py.typed" in names
    assert "iropt/dsl/schedule.lark" in names
    schedules = sorted(p.name for p in (ROOT / "iropt" / "schedules").glob("*.opt"))
    assert schedules
    for schedule in schedules:
        assert f"iropt/schedules/{schedule}" in names
    assert not any(name.startswith(("tests/", "golden_models/", "bench/")) for name in names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "iropt = iropt.app.launch:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


IMPORT_CHECK = """
import importlib.util, iropt, iropt.passes, iropt.dsl, iropt.lowering
from iropt.infra.registry import PASSES
from iropt.dsl import load_schedule
for module in (iropt, iropt.passes, iropt.dsl, iropt.lowering):
    print(module.__file__)
print("names", *PASSES.names())
print("cleanup", *(p.name for p in load_schedule("cleanup").passes()))
print("toplevel", *(n for n in ("passes", "dsl", "lowering") if importlib.util.find_spec(n)))
"""


def test_wheel_installs_and_runs_outside_the_repository(venv: Path, tmp_path: Path) -> None:
    python = venv / "bin" / "python"

    lines = run([str(python), "-c", IMPORT_CHECK], tmp_path).stdout.splitlines()

    files = [Path(line) for line in lines[:4]]
    for file in files:
        assert file.is_relative_to(venv), f"{file} does not come from the wheel"
    assert files[1].parent.name == "passes" and files[1].parent.parent.name == "iropt"
    names = lines[4].split()[1:]
    assert {"eliminate_dead_code", "eliminate_identity", "infer_shapes", "toposort"} <= set(names)
    assert lines[5].split()[1:] == ["eliminate_identity", "eliminate_dead_code", "toposort", "infer_shapes"]
    # Nothing generic lands on sys.path: passes/dsl/lowering exist only under iropt.
    assert lines[6].split() == ["toplevel"]


def test_console_script(venv: Path, tmp_path: Path) -> None:
    result = run([str(venv / "bin" / "iropt"), "--help"], tmp_path)
    assert "usage: iropt" in result.stdout
    for command in ("run", "passes", "export"):
        assert command in result.stdout


def test_editable_install_maps_the_source_folders(tmp_path: Path) -> None:
    import iropt.dsl
    import iropt.lowering
    import iropt.passes

    assert Path(iropt.__file__) == ROOT / "iropt" / "__init__.py"
    assert Path(iropt.passes.__file__) == ROOT / "passes" / "__init__.py"
    assert Path(iropt.lowering.__file__) == ROOT / "lowering" / "__init__.py"
    assert Path(iropt.dsl.__file__) == ROOT / "dsl" / "__init__.py"
    # From outside the repository (no source folder on sys.path), the generic names do not resolve.
    check = "import importlib.util; print([n for n in ('passes', 'dsl', 'lowering') if importlib.util.find_spec(n)])"
    assert run([sys.executable, "-c", check], tmp_path).stdout.strip() == "[]"
