"""The installed package, not the checkout: build the wheel, install it alone (``--target``) and run
``grootl`` from a folder outside the checkout, as a user of ``pip install grootl`` would."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

from conftest import ASSETS, REPO

pytestmark = pytest.mark.packaging

SOURCES = ("pyproject.toml", "README.md", "LICENSE", "grootl")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the sources (the checkout's own build folders stay untouched)."""
    root = tmp_path_factory.mktemp("build")
    source = root / "src"
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():  # symlinks=False: grootl/kernels (a link to kernels/) is copied as files
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(root / "dist"), str(source)], check=True, capture_output=True)
    (built,) = (root / "dist").glob("grootl-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """The wheel installed alone into a folder (its dependencies are the test environment's)."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    return target


def run_installed(installed: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """``python -m grootl.cli ARGS`` with only the installed package importable as ``grootl``."""
    env = {**os.environ, "PYTHONPATH": str(installed), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "GROOTL_NATIVE": "0"}  # the kernels' first compile is tested elsewhere; here it would take a minute
    return subprocess.run([sys.executable, "-m", "grootl.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_wheel_holds_the_package_data_and_license(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    kernels = {p.name for p in (REPO / "kernels").iterdir() if p.suffix in (".h", ".cpp", ".cu")}
    assert kernels and {f"grootl/kernels/{name}" for name in kernels} <= names
    yamls = {p.name for p in (REPO / "grootl" / "evaluation" / "offline_tasks").glob("*.yaml")}
    assert len(yamls) == 7 and {f"grootl/evaluation/offline_tasks/{name}" for name in yamls} <= names
    assert not any(name.startswith(("tests/", "recipes/", "eval/", "scripts/")) for name in names)
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "grootl = grootl.cli:main" in entry_points
    meta = Parser().parsestr(zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode())
    assert meta["License-Expression"] == "Apache-2.0" and meta["License-File"] == "LICENSE"
    license_text = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("licenses/LICENSE"))).decode()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text


def test_offline_eval_runs_from_the_installed_package(installed, tmp_path):
    from transformers import AutoTokenizer

    from grootl.model import tiny_model

    tiny_model().save_pretrained(tmp_path / "model")
    AutoTokenizer.from_pretrained(ASSETS / "tokenizer").save_pretrained(tmp_path / "model")
    where = run_installed(installed, tmp_path, "--version")
    assert where.returncode == 0 and where.stdout.startswith("grootl ")
    located = subprocess.run([sys.executable, "-c", "import grootl; print(grootl.__file__)"], cwd=tmp_path,
                             env={**os.environ, "PYTHONPATH": str(installed)}, capture_output=True, text=True)
    assert Path(located.stdout.strip()).is_relative_to(installed)  # not the checkout's package
    done = run_installed(installed, tmp_path, "eval", "model", "--tasks", "piqa,sst2",
                         "--data-dir", str(ASSETS / "eval"), "--limit", "2", "--device", "cpu", "--output", "out.json")
    assert done.returncode == 0, done.stderr
    assert set(json.loads((tmp_path / "out.json").read_text())["results"]) == {"piqa", "sst2"}
    for noise in ("fatal: not a git repository", "Traceback", "Warning", "WARNING", "Loading weights", "Generating"):
        assert noise not in done.stderr, done.stderr
