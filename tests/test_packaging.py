"""The build switches: no compiler falls back to pure Python, unless the extension is required."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("Cython")


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory):
    dst = tmp_path_factory.mktemp("src")
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, dst / name)
    for pkg in ("_fastpath", "appliance"):
        shutil.copytree(ROOT / pkg, dst / pkg, ignore=shutil.ignore_patterns("*.so", "*.c", "__pycache__"))
    return dst


def build(src: Path, **env):
    full = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    full.update(env)
    return subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=src, env=full,
                          capture_output=True, text=True, timeout=300)


def loaded_build(src: Path, **env) -> str:
    """The build that the copy itself loads (-S: no site hooks, so no editable install of the repo)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    full.update(env)
    out = subprocess.run([sys.executable, "-S", "-c", "import _fastpath; print(_fastpath.BUILD)"], cwd=src, env=full,
                         capture_output=True, text=True, timeout=60)
    return out.stdout.strip() or out.stderr


def test_no_compiler_falls_back_to_pure_python(source_copy):
    r = build(source_copy, CC="/bin/false")
    assert r.returncode == 0, r.stderr
    assert "installing the pure-Python build" in r.stderr
    assert not list((source_copy / "_fastpath").glob("_cengine*.so"))
    assert loaded_build(source_copy) == "py"


def test_required_extension_turns_a_failed_build_into_an_error(source_copy):
    r = build(source_copy, CC="/bin/false", APPLIANCE_REQUIRE_EXTENSION="1")
    assert r.returncode != 0
    assert not list((source_copy / "_fastpath").glob("_cengine*.so"))
    assert "ImportError" in loaded_build(source_copy, APPLIANCE_REQUIRE_EXTENSION="1")


def test_compiled_build_and_pure_switch(source_copy):
    r = build(source_copy)
    assert r.returncode == 0, r.stderr
    assert list((source_copy / "_fastpath").glob("_cengine*.so"))
    assert loaded_build(source_copy) == "c"
    assert loaded_build(source_copy, APPLIANCE_PUREPYTHON="1") == "py"
