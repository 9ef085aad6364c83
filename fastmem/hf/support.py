"""What a forward may hand fastmem besides the model: caches and rotary embeddings, row by row of a table.

Memory injection keeps one promise: each batch row behaves as if it ran alone with its memory in front.
Two things transformers owns can break it, and each is a table here, checked before any compute.

**Cache layers.** A layer attends to the keys its cache layer hands it. fastmem reads the layout of those
keys (how many hold tokens, where each row's padding ends) off the mask the layer is handed, so it does
not depend on which cache produced them, provided the handed keys are in position order with unfilled
slots last. The layer classes below were checked for that (tests compare `generate` under each with an
uncached greedy recomputation); any other class is refused by name, so a new transformers release fails
loudly instead of silently.

| cache layer (transformers 4.56 - 5.24)     | keys it hands a layer                                   | with memory |
|--------------------------------------------|---------------------------------------------------------|-------------|
| DynamicLayer                               | every key so far, then the new ones                     | handled     |
| DynamicSlidingWindowLayer                  | the last window - 1 keys, then the new ones             | handled     |
| StaticLayer                                | a fixed buffer: filled slots first, unfilled after      | handled     |
| StaticSlidingWindowLayer, SlidingWindowLayer | a fixed window buffer, rolled in position order       | handled     |
| QuantoQuantizedLayer                       | dequantized keys, then an unquantized residual; its     | handled     |
|                                            | groups never span batch rows (rows = rows alone, 2e-7)  |             |
| HQQQuantizedLayer                          | the same, but a row's keys depend on the other rows     | refused     |
|                                            | (measured: logits 0.03-0.25 from the row alone, 2-bit)  |             |
| Fp8QuantizedLayer (5.24)                   | one fp8 scale for the whole batch, frozen at prefill    | refused     |
| anything else (chunked, linear-attention,  | not checked                                             | refused     |
| indexed layers; paged caches)              |                                                         |             |

Offloading (``DynamicCache(offloading=True)``, 4.x ``OffloadedCache``) moves the same layers between
devices and is handled with them. Rows without memory never reach fastmem's kernel (the model's own
attention runs them), so every cache works for them exactly as without fastmem.

**Rotary embeddings that depend on the batch.** transformers picks some RoPE frequencies from the
largest position in the whole batch (`dynamic_rope_update`): memory shifts a row's positions, so one
row's memory would change every other row's rotary embedding, and a cached generation would mix
frequencies. fastmem supports memory with these types only while every position stays below the point
where the choice changes, and refuses it beyond with an error that says why.

| rope_type          | batch-wide choice                                              | memory allowed while          |
|--------------------|----------------------------------------------------------------|-------------------------------|
| longrope (Phi-3)   | long factors once max(position) + 1 > original_max_position_embeddings | max(position) + 1 <= that |
| dynamic (NTK)      | rescaled frequencies once max(position) + 1 > max_position_embeddings  | max(position) + 1 < that  |
| other types        | none (fixed frequencies)                                       | always                        |
"""
from __future__ import annotations

from torch import nn
from transformers.cache_utils import Cache

HANDLED_CACHE_LAYERS = frozenset({
    "DynamicLayer", "DynamicSlidingWindowLayer", "StaticLayer", "StaticSlidingWindowLayer", "SlidingWindowLayer",
    "QuantoQuantizedLayer",
})
REFUSED_CACHE_LAYERS = {
    "Fp8QuantizedLayer": "it quantizes every row of the batch with one fp8 scale, set from the whole batch at "
                         "prefill, so one row's memory would change the other rows' cached keys",
    "HQQQuantizedLayer": "its quantized keys of one row depend on the other rows of the batch (2-bit, measured: "
                         "logits 0.03-0.25 away from the row run alone), so one row's memory would change the others",
}


def find_cache(kwargs: dict):
    """The cache object among a forward's keyword arguments, whatever its keyword (``cache=`` in
    transformers >= 5.24, ``past_key_values=`` before); None without one."""
    for value in kwargs.values():
        if isinstance(value, Cache) or type(value).__name__ == "PagedAttentionCache":
            return value
    return None


def check_cache(cache) -> None:
    """ValueError naming ``cache``'s class or layer class unless memory injection handles it (see the table)."""
    if cache is None:
        return
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise ValueError(f"memory injection does not support {type(cache).__name__}: its keys are not laid out "
                         f"per layer in position order; use DynamicCache or StaticCache")
    classes = {type(layer).__name__ for layer in layers}
    replicated = getattr(cache, "layer_class_to_replicate", None)
    if replicated is not None:
        classes.add(replicated.__name__)
    for name in sorted(classes):
        if name in REFUSED_CACHE_LAYERS:
            raise ValueError(f"memory injection refuses {type(cache).__name__} with {name} layers: "
                             f"{REFUSED_CACHE_LAYERS[name]}")
        if name not in HANDLED_CACHE_LAYERS:
            raise ValueError(f"memory injection does not support {type(cache).__name__} with {name} layers "
                             f"(supported layers: {', '.join(sorted(HANDLED_CACHE_LAYERS))})")


def _rope_limit(rotary: nn.Module, rope_type: str) -> int | None:
    """The largest ``max(position) + 1`` for which ``rope_type``'s frequencies do not depend on the batch."""
    if rope_type == "longrope":
        config = rotary.config
        parameters = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        if "original_max_position_embeddings" in parameters:
            return int(parameters["original_max_position_embeddings"])
        return int(getattr(config, "original_max_position_embeddings", None) or config.max_position_embeddings)
    if "dynamic" in rope_type:
        return int(rotary.original_max_seq_len) - 1
    return None


def rope_position_limit(model) -> tuple[str, int] | None:
    """``(rope_type, limit)`` when ``model``'s rotary embedding chooses its frequencies from the batch's largest
    position: memory is allowed while ``max(position) + 1 <= limit``. None for fixed frequencies."""
    found = None
    for module in model.modules():
        rope_types = getattr(module, "rope_type", None)
        if rope_types is None or not hasattr(module, "original_max_seq_len"):
            continue
        for rope_type in (rope_types.values() if isinstance(rope_types, dict) else (rope_types,)):
            limit = _rope_limit(module, rope_type)
            if limit is not None and (found is None or limit < found[1]):
                found = (rope_type, limit)
    return found


def check_rope_positions(rope_limit: tuple[str, int], longest_position: int) -> None:
    """ValueError when positions up to ``longest_position`` (0-based, memory included) pass ``rope_limit``
    (from `rope_position_limit`), where the rotary embedding picks batch-dependent frequencies."""
    rope_type, limit = rope_limit
    if longest_position + 1 > limit:
        raise ValueError(
            f"memory injection refuses rope_type {rope_type!r} beyond {limit} positions (memory included; this "
            f"batch reaches {longest_position + 1}): transformers picks its rotary frequencies from the largest "
            f"position in the whole batch, so one row's memory would change every other row's embedding and a "
            f"cached generation would mix frequencies")
