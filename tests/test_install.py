"""How fastmem is found and described: source checkout vs install, the `hf` test selection, `info`."""
from __future__ import annotations

import ast
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fastmem
from conftest import HF_FACING_MODULES

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"


# ---- running from a source checkout -------------------------------------------------------------

def _fake_checkout(where: Path) -> Path:
    """A copy of the checkout's layout: setup.py, fastmem/ (no compiled module), kernels/."""
    where.mkdir()
    shutil.copy(ROOT / "setup.py", where / "setup.py")
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.pyd")
    shutil.copytree(ROOT / "fastmem", where / "fastmem", ignore=ignore)
    shutil.copytree(ROOT / "kernels", where / "kernels", ignore=ignore)
    return where


def test_checkout_is_recognised_by_its_own_files(tmp_path):
    checkout = _fake_checkout(tmp_path / "checkout")
    assert fastmem._SourceCheckoutFinder.for_package(checkout / "fastmem") is not None
    # site-packages: fastmem/ with kernels/ inside, Hugging Face's top-level `kernels/` beside it, no setup.py
    site = tmp_path / "site-packages"
    (site / "fastmem" / "kernels").mkdir(parents=True)
    (site / "kernels").mkdir()
    (site / "kernels" / "__init__.py").write_text("")
    (site / "kernels" / "prefix_attention_ref.py").write_text("")
    assert fastmem._SourceCheckoutFinder.for_package(site / "fastmem") is None
    (site / "setup.py").write_text("")  # even then: an installed fastmem/ carries its own kernels/
    assert fastmem._SourceCheckoutFinder.for_package(site / "fastmem") is None


def test_checkout_shadowing_a_regular_install_imports_kernels_and_native(tmp_path):
    """`pip install .` then running from the checkout: the checkout's fastmem/ comes first on sys.path."""
    native = importlib.util.find_spec("fastmem._native")
    if native is None or not native.origin:
        pytest.skip("fastmem._native is not built here")
    checkout = _fake_checkout(tmp_path / "checkout")
    installed = tmp_path / "site" / "fastmem"  # what `pip install .` leaves: the package and its build
    installed.mkdir(parents=True)
    (installed / "__init__.py").write_text("raise ImportError('the installed copy must not be imported')\n")
    shutil.copy(native.origin, installed / Path(native.origin).name)
    probe = ("import sys, fastmem, fastmem.kernels.prefix_attention_ref as ref, fastmem._native as native\n"
             "print(fastmem.__file__); print(ref.__file__); print(native.__file__); print(native.cpu_isa())\n"
             "print('kernels' in sys.modules)\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    result = subprocess.run([sys.executable, "-c", probe], cwd=checkout, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    package, kernel, compiled, _isa, top_level = result.stdout.split()
    assert Path(package).resolve() == (checkout / "fastmem" / "__init__.py").resolve()
    assert Path(kernel).resolve() == (checkout / "kernels" / "prefix_attention_ref.py").resolve()
    assert Path(compiled).resolve().parent == installed.resolve()
    assert top_level == "False"  # no top-level `kernels` module was imported on the way


# ---- the Hugging Face-facing tests ---------------------------------------------------------------

def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_every_module_using_transformers_or_peft_is_hf_facing():
    modules = {path.name: _imported_modules(path) for path in sorted(TESTS.glob("test_*.py"))}
    assert HF_FACING_MODULES <= set(modules), "HF_FACING_MODULES names a test module that does not exist"
    hf = {name for name, imports in modules.items() if imports & {"transformers", "peft"}}
    changed = True
    while changed:  # and the modules that import from those (test_sampling uses test_patch's models)
        grown = hf | {name for name, imports in modules.items() if {m + ".py" for m in imports} & hf}
        changed, hf = grown != hf, grown
    missing = sorted(hf - HF_FACING_MODULES)
    assert not missing, f"add {missing} to HF_FACING_MODULES in tests/conftest.py"


def test_hf_marker_selects_exactly_the_listed_modules(request):
    items = request.session.items
    marked = {item.path.name for item in items if item.get_closest_marker("hf")}
    unmarked = {item.path.name for item in items if not item.get_closest_marker("hf")}
    assert marked <= HF_FACING_MODULES
    assert not unmarked & HF_FACING_MODULES


# ---- `python -m fastmem info`: the tested transformers range ------------------------------------

def _info(monkeypatch, capsys, transformers_version: str) -> list[str]:
    import fastmem.__main__ as cli

    real = cli._version
    monkeypatch.setattr(cli, "_version", lambda package: transformers_version if package == "transformers"
                        else real(package))
    cli.main(["info"])
    return capsys.readouterr().out.splitlines()


def test_tested_range_is_read_from_architectures():
    from fastmem.__main__ import tested_transformers
    from fastmem.hf import architectures

    assert tested_transformers() == (architectures.MIN_TRANSFORMERS, tuple(architectures.TESTED_TRANSFORMERS))


def test_info_warns_when_transformers_is_newer_than_tested(monkeypatch, capsys):
    from fastmem.__main__ import tested_transformers

    minimum, tested = tested_transformers()
    lines = _info(monkeypatch, capsys, "99.0.0")
    range_lines = [line for line in lines if line.startswith("transformers supported:")]
    assert len(range_lines) == 1 and minimum in range_lines[0] and all(v in range_lines[0] for v in tested)
    warnings = [line for line in lines if "WARNING" in line]
    assert len(warnings) == 1, lines
    assert "99.0.0" in warnings[0] and "newer than the newest tested" in warnings[0]


@pytest.mark.parametrize("which", ["newest", "oldest"])
def test_info_does_not_warn_for_a_tested_transformers(monkeypatch, capsys, which):
    from packaging.version import Version

    from fastmem.__main__ import tested_transformers

    tested = sorted(tested_transformers()[1], key=Version)
    lines = _info(monkeypatch, capsys, tested[-1] if which == "newest" else tested[0])
    assert any(line.startswith("transformers supported:") for line in lines)
    assert not [line for line in lines if "WARNING" in line], lines
