"""The compiled frame path (setup.py's ``COMPILED``): what runs is what the source says.

``make`` compiles those modules with mypyc in place and again whenever one of them
changes; these tests catch a compiled module older than its source (an edit that
``make`` did not see) and a build that fell back to plain Python unnoticed. With
``PUSHSVC_COMPILE=0`` the plain modules are what is wanted and tested.
"""

from __future__ import annotations

import ast
import importlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PLAIN = os.environ.get("PUSHSVC_COMPILE") == "0"


def compiled_sources() -> list[str]:
    """setup.py's ``COMPILED`` list, read without running setup.py."""
    for node in ast.parse((ROOT / "setup.py").read_text()).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == "COMPILED" for target in node.targets
        ):
            sources: list[str] = ast.literal_eval(node.value)
            return sources
    raise AssertionError("setup.py has no COMPILED list")


@pytest.mark.parametrize("source", compiled_sources())
def test_the_frame_path_runs_compiled_and_current(source: str) -> None:
    module = importlib.import_module(source.removesuffix(".py").replace("/", "."))
    assert module.__spec__ is not None and module.__spec__.origin is not None
    # Only the suffix: mypyc puts its group's folder in front of the module's own path.
    loaded = Path(module.__spec__.origin)
    if PLAIN:
        assert loaded.suffix == ".py", f"{loaded} is compiled although PUSHSVC_COMPILE=0"
        return
    assert loaded.suffix == ".so", (
        f"{source} runs as plain Python: `make` compiles it with mypyc (it needs a C "
        "compiler and the Python headers), or set PUSHSVC_COMPILE=0 to test the plain modules"
    )
    python = ROOT / source
    (built,) = python.parent.glob(f"{python.stem}.*.so")
    assert built.stat().st_mtime >= python.stat().st_mtime, (
        f"{built.name} is older than {source}: `make` rebuilds it"
    )


def test_nothing_outside_the_list_runs_compiled() -> None:
    """A module taken off the list leaves no .so behind that would shadow its source."""
    listed = {Path(source).with_suffix("") for source in compiled_sources()}
    group = Path("pushsvc/frame_path__mypyc")  # mypyc's library of the whole group
    stray = [
        built.relative_to(ROOT)
        for built in (ROOT / "pushsvc").rglob("*.so")
        if (built.relative_to(ROOT).parent / built.name.split(".")[0]) not in listed | {group}
    ]
    assert not stray, f"compiled modules not in setup.py's COMPILED: {stray} (`make` removes them)"


@pytest.mark.slow
def test_a_failing_compiler_installs_the_plain_modules(tmp_path: Path) -> None:
    """No C compiler (a slim container): the wheel holds the plain modules, not half a build."""
    source = tmp_path / "source"  # a copy: the build writes build/ and egg-info beside it
    source.mkdir()
    for name in ("setup.py", "setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for package in ("pushsvc", "plugins"):
        shutil.copytree(
            ROOT / package, source / package, ignore=shutil.ignore_patterns("*.so", "__pycache__")
        )
    env = {**os.environ, "CC": "false", "PUSHSVC_COMPILE": "1"}
    result = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps"),
            *("--quiet", "--wheel-dir", str(tmp_path / "dist"), str(source)),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("pushsvc-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert not [name for name in names if name.endswith(".so")]
    assert {"pushsvc/core/session.py", "pushsvc/delivery/tracker.py"} <= set(names)
