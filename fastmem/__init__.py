"""fastmem: fast test-time learning with latent memories (soft prompts and prefixes) for LMs.

`prefix_attention` and `plan_prefix_attention` (its once-per-forward plan) import only torch. The Hugging
Face layer (`patch`, `unpatch`, `inject`, `MemoryBank`) is imported on first use, since importing
transformers takes seconds.
"""
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path


class _SourceCheckoutFinder(importlib.abc.MetaPathFinder):
    """Makes a source checkout's ``fastmem/`` importable whichever way fastmem was installed.

    Running from a checkout (``python bench/throughput.py``, ``python -m pytest tests``) puts the repo
    root on ``sys.path`` first, so Python imports the checkout's ``fastmem/``, not the installed copy.
    Two modules are not inside that directory:

    * ``fastmem.kernels`` is the repo's top-level ``kernels/`` (setup.py maps it there with
      ``package_dir``; it is never installed as a top-level ``kernels``, a name transformers uses for
      Hugging Face's own package). Here it resolves to the ``kernels/`` beside this ``fastmem/``, so
      the checkout's Python and Triton sources always run together.
    * ``fastmem._native`` is compiled. ``pip install -e .`` builds it into the checkout's ``fastmem/``
      (found the normal way); ``pip install .`` puts it only into the installed ``fastmem/``. When the
      checkout has none, it is loaded from the first other ``fastmem/`` package on ``sys.path`` that
      has one: the installed copy, the one place a regular install leaves a build. (It was built from
      the sources at install time; reinstall after changing ``csrc/``.)

    A checkout is recognised by its own files (``setup.py`` and ``kernels/prefix_attention_ref.py``
    next to this ``fastmem/``, which has no ``kernels/`` inside), never by what ``site-packages``
    holds: there ``kernels/`` may be Hugging Face's package and there is no ``setup.py``. Installed
    copies never match, and an editable install maps the same directories, so both modes agree.
    """

    def __init__(self, package_dir: Path) -> None:
        self.package_dir = package_dir
        self.kernels_dir = package_dir.parent / "kernels"

    @staticmethod
    def for_package(package_dir: Path) -> "_SourceCheckoutFinder | None":
        root = package_dir.parent
        in_checkout = ((root / "setup.py").is_file() and (root / "kernels" / "prefix_attention_ref.py").is_file()
                       and not (package_dir / "kernels").exists())
        return _SourceCheckoutFinder(package_dir) if in_checkout else None

    def find_spec(self, fullname, path=None, target=None):
        if fullname == __name__ + ".kernels":
            return importlib.util.spec_from_file_location(
                fullname, self.kernels_dir / "__init__.py", submodule_search_locations=[str(self.kernels_dir)])
        if fullname == __name__ + "._native":
            return self._native_spec(fullname)
        return None

    def _native_spec(self, fullname: str):
        own = importlib.machinery.PathFinder.find_spec(fullname, [str(self.package_dir)])
        if own is not None:  # built in place (editable install): the normal machinery finds it
            return None
        for entry in sys.path:
            try:
                installed = importlib.machinery.PathFinder.find_spec(__name__, [entry])
            except (ImportError, OSError, ValueError):
                continue
            locations = [location for location in (installed.submodule_search_locations or [])
                         if Path(location).resolve() != self.package_dir] if installed else []
            if locations:
                spec = importlib.machinery.PathFinder.find_spec(fullname, locations)
                if spec is not None:
                    return spec
        return None


def _install_checkout_finder() -> None:
    finder = _SourceCheckoutFinder.for_package(Path(__file__).resolve().parent)
    if finder is not None and not any(isinstance(f, _SourceCheckoutFinder) for f in sys.meta_path):
        # First, ahead of an editable install's finder, which maps fastmem.kernels to the checkout it
        # was installed from: a second checkout must use its own kernels/.
        sys.meta_path.insert(0, finder)


_install_checkout_finder()

from fastmem.ops import AttentionPlan, plan_prefix_attention, prefix_attention  # noqa: E402

__version__ = "0.1.0"

_LAZY_EXPORTS = {
    "patch": "fastmem.hf",
    "unpatch": "fastmem.hf",
    "inject": "fastmem.hf",
    "MemoryBank": "fastmem.memory",
    "sample": "fastmem.sampling",
    "MemoryTrainer": "fastmem.training",
    "MemoryStore": "fastmem.store",
    "EntryMeta": "fastmem.store",
    "OnlineLearner": "fastmem.learner",
    "LearnerConfig": "fastmem.learner",
    "load_model": "fastmem.models",
    "save_model": "fastmem.models",
    "PromptFormat": "fastmem.prompting",
}

__all__ = ["AttentionPlan", "plan_prefix_attention", "prefix_attention", "__version__", *_LAZY_EXPORTS]


def __getattr__(name: str):
    if name in _LAZY_EXPORTS:
        return getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)
    raise AttributeError(f"module 'fastmem' has no attribute {name!r}")
