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
