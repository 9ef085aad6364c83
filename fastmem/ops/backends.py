"""Backend registry for prefix attention and the `auto` policy.

A backend is a module with ``is_available()``, ``forward(...)`` and ``backward(...)`` as described in
``docs/backend_contract.md``. Modules are imported lazily, so a missing Triton or native build only
matters when that backend is asked for.
"""
from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

BACKEND_MODULES = {
    "torch": "fastmem.ops.torch_backend",
    "triton": "fastmem.kernels.prefix_attention",
    "native": "fastmem.ops.native",
}

# Head dims the fused kernels accept (the torch backend takes any).
KERNEL_HEAD_DIMS = range(16, 257, 8)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# `auto` preference per device type, fastest first, as measured by bench/throughput.py
# (attention section). Each entry is tried in order; the torch reference is the fallback.
AUTO_PREFERENCE = {
    "cuda": ("triton", "native", "torch"),
    "cpu": ("native", "torch"),
}


def load(name: str) -> ModuleType:
    """The backend module ``name``; raises ValueError for unknown names, RuntimeError if unavailable."""
    if name not in BACKEND_MODULES:
        raise ValueError(f"unknown backend {name!r}; choose one of 'auto', {', '.join(map(repr, BACKEND_MODULES))}")
    reason = unavailable_reason(name)
    if reason is not None:
        raise RuntimeError(f"prefix_attention backend {name!r} is not available: {reason}")
    return importlib.import_module(BACKEND_MODULES[name])


@functools.lru_cache(maxsize=None)
def unavailable_reason(name: str) -> str | None:
    """None when backend ``name`` can run here, else why not (checked once per process)."""
    try:
        module = importlib.import_module(BACKEND_MODULES[name])
    except Exception as error:  # ImportError, or a broken build raising at import
        return f"import of {BACKEND_MODULES[name]} failed ({type(error).__name__}: {error})"
    if not module.is_available():
        return getattr(module, "UNAVAILABLE_REASON", "its is_available() returned False")
    return None


def supports(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether backend ``name`` runs on this device, dtype and head dim."""
    if name == "torch":
        return True
    if dtype not in KERNEL_DTYPES or head_dim not in KERNEL_HEAD_DIMS:
        return False
    if name == "triton":
        return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    if name == "native":
        return device.type == "cpu" or importlib.import_module(BACKEND_MODULES[name]).cuda_available()
    return False


@functools.lru_cache(maxsize=256)
def resolve(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """Concrete backend for ``name`` ("auto" picks by `AUTO_PREFERENCE`); errors when it cannot run.

    Cached: it runs in both raw ops of every call (every layer, every decode step)."""
    if name == "auto":
        for candidate in AUTO_PREFERENCE.get(device.type, ("torch",)):
            if unavailable_reason(candidate) is None and supports(candidate, device, dtype, head_dim):
                return candidate
        return "torch"
    load(name)
    if not supports(name, device, dtype, head_dim):
        raise ValueError(
            f"backend {name!r} does not support device {device.type}, dtype {dtype}, head dim {head_dim} "
            f"(kernels take {', '.join(str(d) for d in KERNEL_DTYPES)} and head dims 16..256 in steps "
            f"of 8; Triton needs CUDA or TRITON_INTERPRET=1)")
    return name
