"""Hugging Face integration: the only part of fastmem that touches transformers or PEFT internals.

``patch(model)`` routes a causal LM's attention through fastmem (`fastmem.hf.attention`);
``inject(model, bank, index)`` runs it with memory (`fastmem.hf.inject`); supported architectures are
the rows of `fastmem.hf.architectures.ARCHITECTURES`. A slot id goes from `inject` (or `fastmem.sample`,
`fastmem.MemoryTrainer` through `fastmem.hf.shared_prefix`) to a `Memory` over a `KVPool`
(`fastmem.hf.pools`; soft prompts become one in `fastmem.hf.soft_prompts`), then to the
`InjectionContext` every layer attends through (`fastmem.hf.context`), which plans `fastmem.ops` once.
"""
from fastmem.hf.architectures import ARCHITECTURES, MIN_TRANSFORMERS, TESTED_TRANSFORMERS, ModelShape, model_shape
from fastmem.hf.attention import patch, unpatch
from fastmem.hf.context import InjectionContext
from fastmem.hf.inject import inject
from fastmem.hf.pools import KVPool, Memory

__all__ = ["ARCHITECTURES", "MIN_TRANSFORMERS", "TESTED_TRANSFORMERS", "InjectionContext", "KVPool", "Memory",
           "ModelShape", "inject", "model_shape", "patch", "unpatch"]
