"""Backend registry for prefix attention and the `auto` policy.

A backend is a module with ``is_available()``, ``forward(...)`` and ``backward(...)`` as described in
``docs/backend_contract.md``. `BACKENDS` maps each name to a `Backend` whose ``load`` imports that module
with a plain import statement inside a function: static analysis sees the import, and it only runs when
the backend is first asked for, so a missing Triton or native build only matters then.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import torch


@dataclass(frozen=True)
class Backend:
    """One prefix-attention backend: ``load()`` imports and returns its module (ImportError, or whatever a
    broken build raises at import); ``module`` is that module's dotted path, for messages."""
    name: str
    module: str
    load: Callable[[], ModuleType]


def _load_torch() -> ModuleType:
    from fastmem.ops import torch_backend
    return torch_backend


def _load_triton() -> ModuleType:
    from fastmem.kernels import prefix_attention
    return prefix_attention


def _load_native() -> ModuleType:
    from fastmem.ops import native
    return native


BACKENDS: dict[str, Backend] = {backend.name: backend for backend in (
    Backend("torch", "fastmem.ops.torch_backend", _load_torch),
    Backend("triton", "fastmem.kernels.prefix_attention", _load_triton),
    Backend("native", "fastmem.ops.native", _load_native),
)}

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
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of 'auto', {', '.join(map(repr, BACKENDS))}")
    reason = unavailable_reason(name)
    if reason is not None:
        raise RuntimeError(f"prefix_attention backend {name!r} is not available: {reason}")
    return BACKENDS[name].load()


@functools.lru_cache(maxsize=None)
def unavailable_reason(name: str) -> str | None:
    """None when backend ``name`` can run here, else why not (checked once per process)."""
    backend = BACKENDS[name]
    try:
        module = backend.load()
    except Exception as error:  # ImportError, or a broken build raising at import
        return f"import of {backend.module} failed ({type(error).__name__}: {error})"
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
        return device.type == "cuda" or _load_triton().interpreting()
    if name == "native":
        return device.type == "cpu" or _load_native().cuda_available()
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
