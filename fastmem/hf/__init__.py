"""Hugging Face integration: the only part of fastmem that touches transformers or PEFT internals.

``patch(model)`` routes a causal LM's attention through fastmem (`fastmem.hf.attention`);
``inject(model, bank, index)`` runs it with memory (`fastmem.hf.inject`); supported architectures are
the rows of `fastmem.hf.architectures.ARCHITECTURES`.
"""
from fastmem.hf.architectures import ARCHITECTURES, MIN_TRANSFORMERS, TESTED_TRANSFORMERS, ModelShape, model_shape
from fastmem.hf.attention import patch, unpatch
from fastmem.hf.inject import InjectionContext, KVPool, Memory, inject

__all__ = ["ARCHITECTURES", "MIN_TRANSFORMERS", "TESTED_TRANSFORMERS", "InjectionContext", "KVPool", "Memory",
           "ModelShape", "inject", "model_shape", "patch", "unpatch"]
