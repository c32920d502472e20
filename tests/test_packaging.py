"""The wheel carries every module and package file of the source tree.

pyproject.toml lists the packages by hand (its package-dir installs dict_training/ and server/
inside the ``csr_vllm`` namespace, a mapping setuptools' discovery cannot follow), so a new
subpackage can be left out of a non-editable install (``pip install .``, the CUDA image) while
editable installs and the tests keep working: csr_vllm.ops once was. This builds the wheel the
way pip does and compares it with the tree.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> where its files land in the wheel (pyproject.toml's package-dir).
PACKAGE_DIRS = {"csr_vllm": "csr_vllm", "dict_training": "csr_vllm/dict_training",
                "server": "csr_vllm/server"}
# Build outputs and caches, not package files.
NOT_PACKAGE_FILES = {".pyc", ".pyo", ".so", ".pyd", ".o"}


def _tree_files() -> set[str]:
    """Wheel paths the tree's package folders should produce."""
    out = set()
    for src, dst in PACKAGE_DIRS.items():
        for f in (ROOT / src).rglob("*"):
            rel = f.relative_to(ROOT / src)
            if f.is_file() and "__pycache__" not in rel.parts \
                    and f.suffix not in NOT_PACKAGE_FILES:
                out.add(f"{dst}/{rel.as_posix()}")
    return out


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory) -> set[str]:
    """Files of a wheel built from a copy of the tree (the repo itself stays clean: no build/
    or egg-info written into it, and no race with another test run)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in PACKAGE_DIRS:
        shutil.copytree(ROOT / folder, src / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp / "dist"
    # The installed setuptools and wheel, offline: what `pip install .` runs, minus isolation.
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
           "--no-index", "-q", str(src), "-w", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    (whl,) = out.glob("csr_vllm-*.whl")
    with zipfile.ZipFile(whl) as z:
        return {n for n in z.namelist() if not n.endswith("/")}


def test_wheel_has_every_module_of_the_tree(wheel_files):
    expected = {f for f in _tree_files() if f.endswith(".py")}
    assert "csr_vllm/ops/library.py" in expected  # the CUDA backend's kernels
    missing = sorted(expected - wheel_files)
    assert not missing, f"not in the wheel (add the package to pyproject.toml): {missing}"


def test_wheel_has_the_package_data_of_the_tree(wheel_files):
    """Non-Python files under the package folders (e.g. the native kernels' C++ sources)."""
    expected = {f for f in _tree_files() if not f.endswith(".py")}
    missing = sorted(expected - wheel_files)
    assert not missing, ("not in the wheel (add them to [tool.setuptools.package-data] in "
                         f"pyproject.toml): {missing}")


def test_wheel_holds_nothing_outside_the_csr_vllm_namespace(wheel_files):
    """dict_training/ and server/ install inside csr_vllm, never as top-level packages."""
    tops = {n.split("/")[0] for n in wheel_files}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"csr_vllm"}


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler on this machine")
def test_the_native_kernels_build_on_this_machine():
    # Where the set-up can compile them they must build: a build error falls back to the
    # PyTorch reference (30x slower) with only a warning, which once hid that the kernels did
    # not compile on any CPU without AVX-512 (tests/test_native_kernels.py then skipped).
    from csr_vllm import native

    assert native.load() is not None, native.error()
