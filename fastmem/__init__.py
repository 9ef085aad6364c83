"""fastmem: fast test-time learning with latent memories (soft prompts and prefixes) for LMs.

`prefix_attention` imports only torch. The Hugging Face layer (`patch`, `unpatch`, `inject`,
`MemoryBank`) is imported on first use, since importing transformers takes seconds.
"""
import importlib

from fastmem.ops import prefix_attention

__version__ = "0.1.0"

_LAZY_EXPORTS = {
    "patch": "fastmem.hf",
    "unpatch": "fastmem.hf",
    "inject": "fastmem.hf",
    "MemoryBank": "fastmem.memory",
    "sample": "fastmem.sampling",
    "MemoryTrainer": "fastmem.training",
    "MemoryStore": "fastmem.store",
    "OnlineLearner": "fastmem.learner",
}

__all__ = ["prefix_attention", "__version__", *_LAZY_EXPORTS]


def __getattr__(name: str):
    if name in _LAZY_EXPORTS:
        return getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)
    raise AttributeError(f"module 'fastmem' has no attribute {name!r}")
