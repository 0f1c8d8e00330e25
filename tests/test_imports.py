"""The import promises of `memit_hf/__init__.py`: `import memit_hf` and `memit-hf --help` load no torch (each checked
in a fresh interpreter), and every public name resolves."""

import os
import subprocess
import sys
from pathlib import Path

import pytest


SRC = Path(__file__).resolve().parents[1] / "src"


def run_python(code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter that imports this checkout's `memit_hf`."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


NO_TORCH = "loaded = sorted(m for m in ('torch', 'memit_hf.editor') if m in sys.modules); assert not loaded, loaded"


def test_import_memit_hf_loads_no_torch():
    result = run_python(
        "import sys, memit_hf\n"
        f"assert memit_hf.__file__.startswith({str(SRC)!r}), memit_hf.__file__\n"
        "memit_hf.EditingArguments, memit_hf.__version__\n"  # the arguments and the registry are torch-free too
        f"{NO_TORCH}\n"
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("argv", [["--help"], ["edit", "--help"]], ids=["memit-hf", "edit"])
def test_cli_help_loads_no_torch(argv):
    """What `memit-hf --help` runs (`memit_hf.cli:main`, the console script's entry point) prints the usage and exits
    0 without torch."""
    result = run_python(
        "import sys\n"
        "from memit_hf.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 0, exit.code\n"
        f"{NO_TORCH}\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: memit-hf")


def test_every_public_name_resolves():
    import memit_hf
    from memit_hf import algorithms

    for module in (memit_hf, algorithms):
        assert len(set(module.__all__)) == len(module.__all__)
        for name in module.__all__:
            assert getattr(module, name) is not None, f"{module.__name__}.{name}"
        assert set(module.__all__) <= set(dir(module))
        with pytest.raises(AttributeError, match=f"module '{module.__name__}' has no attribute 'Nonexistent'"):
            module.Nonexistent  # noqa: B018


def test_every_name_in_every_packages_all_resolves():
    """`__all__` of `memit_hf` and of each of its subpackages that has one (found by walking the package, so a new
    one is covered) names only attributes that exist, each once."""
    import importlib
    import pkgutil

    import memit_hf

    packages = [memit_hf] + [
        importlib.import_module(info.name)
        for info in pkgutil.walk_packages(memit_hf.__path__, "memit_hf.")
        if info.ispkg
    ]
    assert {"memit_hf.algorithms", "memit_hf.algorithms.memit", "memit_hf.cli", "memit_hf.statistics"} <= {
        package.__name__ for package in packages
    }
    for package in packages:
        names = getattr(package, "__all__", ())  # `memit_hf.metrics` exports by function, without `__all__`
        assert len(set(names)) == len(names), package.__name__
        for name in names:
            assert getattr(package, name) is not None, f"{package.__name__}.{name}"


@pytest.mark.parametrize("family", ["counterfact", "zsre"])
def test_metric_modules_cite_memit_as_the_model_cards_do(family):
    """The `evaluate` metric modules keep their own copy of the citation (they load stand-alone): the same entry."""
    from memit_hf.cards import CITATION

    assert CITATION in (SRC / "memit_hf" / "metrics" / family / f"{family}.py").read_text()
