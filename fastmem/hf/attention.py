"""`patch` / `unpatch`: route a model's attention through fastmem, via transformers' AttentionInterface.

A patched model runs the attention implementation ``fastmem_<original>`` (for example
``fastmem_sdpa``): its mask function is the original's, and its attention function calls the
original unchanged, unless the forward carries a memory handler in the ``fastmem`` keyword (an
`InjectionContext` of `fastmem.hf.context`, or a handler wrapping one, set by `inject`, `sample` and
`MemoryTrainer`). transformers passes unknown forward keywords down to the attention function,
so the handler reaches every layer, also under gradient checkpointing and inside ``generate``.
"""
from __future__ import annotations

import sys
from typing import Callable

from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from fastmem.hf.architectures import architecture_of

PREFIX = "fastmem_"
CONTEXT_KEYWORD = "fastmem"


def _original_attention(name: str, module) -> Callable:
    """The attention function ``name`` resolves to for ``module`` ("eager" is defined per model file)."""
    if name == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[name]


def _make_attention(original: str) -> Callable:
    """The attention function registered as ``fastmem_<original>``."""

    def attention(module, query, key, value, attention_mask, **kwargs):
        """query ``[B, Hq, Tq, D]``, key/value ``[B, Hkv, Tk, D]`` -> (``[B, Tq, Hq, D]``, weights or None)."""
        handler = kwargs.pop(CONTEXT_KEYWORD, None)
        original_attention = _original_attention(original, module)
        if handler is None:
            return original_attention(module, query, key, value, attention_mask, **kwargs)
        return handler.attend(original_attention, module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"{PREFIX}{original}_attention"
    return attention


def original_implementation(model) -> str | None:
    """The attention implementation a patched model had before `patch`; None when not patched."""
    name = model.config._attn_implementation
    return name.removeprefix(PREFIX) if name.startswith(PREFIX) else None


def patch(model):
    """Route ``model``'s attention through fastmem, in place; returns ``model``.

    Idempotent. Outputs are unchanged while no memory is injected (the original attention function
    and mask run as before). Raises TypeError for an unsupported architecture or attention
    implementation.
    """
    architecture_of(model)
    if original_implementation(model) is not None:
        return model
    original = model.config._attn_implementation
    if original not in ALL_MASK_ATTENTION_FUNCTIONS:
        supported = ", ".join(name for name in ALL_MASK_ATTENTION_FUNCTIONS if not name.startswith(PREFIX))
        raise TypeError(f"fastmem cannot wrap attention implementation {original!r}; use one of {supported}")
    name = PREFIX + original
    AttentionInterface.register(name, _make_attention(original))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    model.set_attn_implementation(name)
    return model


def unpatch(model):
    """Restore the attention implementation ``model`` had before `patch`; returns ``model``. Idempotent."""
    original = original_implementation(model)
    if original is not None:
        model.set_attn_implementation(original)
    return model


def check_patched(model) -> None:
    """ValueError unless ``model`` went through `fastmem.patch`."""
    if original_implementation(model) is None:
        raise ValueError(f"{type(model).__name__} is not patched; call fastmem.patch(model) first")
