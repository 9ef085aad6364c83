"""Memory as attention sees it: per-layer key/value pools, and which slots each batch row reads.

- `KVPool`: per-layer key/value pools ``[S, P, Hkv, D]`` with valid lengths ``[S]``: S slots any batch
  row can attend to. A prefix bank is one (its parameters, viewed per layer); a soft-prompt bank
  becomes one by running the model over its prompts (`fastmem.hf.soft_prompts`); a prompt's KV cache
  becomes one with `KVPool.from_cache`.
- `Memory`: a pool plus, for one batch, which slots each row reads (``index [B, M]``, ``-1`` = none)
  and, for soft prompts, the logits of the last memory position (they predict the first real token).
- `MemorySource`: what `fastmem.inject` accepts (a `MemoryBank`, a `KVPool`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from fastmem.hf.architectures import model_shape


@dataclass(frozen=True)
class KVPool:
    """Keys and values of S memory slots at every layer.

    layers: one ``(keys, values)`` per decoder layer, each ``[S, P, Hkv, D]`` (keys as the attention sees
    them, i.e. after any rotary embedding); lengths: integer ``[S]``, the valid positions of each slot.
    """
    layers: tuple[tuple[Tensor, Tensor], ...]
    lengths: Tensor

    @classmethod
    def from_cache(cls, cache, lengths: Tensor | None = None) -> "KVPool":
        """A pool whose slot s is row s of a transformers cache (``cache.layers[l].keys [S, Hkv, P, D]``).

        lengths: ``[S]`` valid positions per row (right padding); all P when None. The pool views the
        cache's current tensors; later cache updates (which concatenate into new tensors) leave it as is.
        """
        layers = tuple((layer.keys.transpose(1, 2), layer.values.transpose(1, 2)) for layer in cache.layers)
        num_slots, prefix_len = layers[0][0].shape[:2]
        if lengths is None:
            lengths = torch.full((num_slots,), prefix_len, dtype=torch.long, device=layers[0][0].device)
        return cls(layers, lengths)

    @property
    def num_slots(self) -> int:
        return self.layers[0][0].shape[0]

    def validate(self, model) -> None:
        """ValueError when the pool does not fit ``model``'s layers, KV heads and head dim."""
        shape = model_shape(model)
        expected = (shape.num_kv_heads, shape.head_dim)
        if len(self.layers) != shape.num_layers or any(
                tuple(k.shape[2:]) != expected or k.shape != v.shape for k, v in self.layers):
            found = sorted({(tuple(k.shape), tuple(v.shape)) for k, v in self.layers})
            raise ValueError(f"KV pool does not fit the model: need {shape.num_layers} layers of "
                             f"[S, P, {expected[0]}, {expected[1]}] keys and values, got {len(self.layers)} "
                             f"layers with shapes {found}")

    def version(self) -> tuple[int, ...]:
        return tuple(t._version for pair in self.layers for t in pair) + (self.lengths._version,)

    def memory_for(self, model, index: Tensor) -> "Memory":
        return Memory(self, index)


@dataclass(frozen=True)
class Memory:
    """A pool and, for one batch, the slots each row reads.

    index: ``[B, M]`` slot ids in order, ``-1`` = none. lead_logits: ``[B, V]`` or None; the logits at the
    last memory position of each row (soft prompts only), which predict the row's first token.
    """
    pool: KVPool
    index: Tensor
    lead_logits: Tensor | None = None

    def row_lengths(self) -> Tensor:
        """``[B]`` memory positions of each row."""
        return memory_lengths(self.pool.lengths, self.index)


def memory_lengths(slot_lengths: Tensor, index: Tensor) -> Tensor:
    """``[B]`` memory positions of rows reading slots ``index [B, M]`` (-1 = none) of ``slot_lengths [S]``."""
    return torch.where(index >= 0, slot_lengths[index.clamp(min=0)], 0).sum(dim=1)


class MemorySource(Protocol):
    """What `inject` accepts: a `MemoryBank`, a `KVPool`, or anything with these members.

    ``memory_for`` runs inside the model's forward (in `inject`'s pre-hook): a source that needs a forward
    of its own runs ``model.get_decoder()``, as `fastmem.hf.soft_prompts` does, never the hooked ``model``.
    """
    num_slots: int

    def validate(self, model) -> None: ...

    def version(self) -> tuple[int, ...]: ...

    def memory_for(self, model, index: Tensor) -> Memory: ...


def checked_index(index, num_slots: int, device) -> Tensor:
    """``[B]`` or ``[B, M]`` integer slot ids in ``[-1, num_slots)`` -> ``[B, M]`` long on ``device``."""
    if not isinstance(index, Tensor) or index.dtype.is_floating_point or index.dtype.is_complex \
            or index.dtype == torch.bool:
        raise TypeError(f"index must be an integer tensor [B] or [B, M]; got {type(index).__name__} "
                        f"{getattr(index, 'dtype', '')}")
    if index.dim() not in (1, 2) or index.shape[0] == 0 or index.shape[-1] == 0:
        raise ValueError(f"index must be [B] or [B, M] with B, M >= 1; got shape {tuple(index.shape)}")
    index = (index[:, None] if index.dim() == 1 else index).to(device=device, dtype=torch.long)
    if index.numel() and (int(index.min()) < -1 or int(index.max()) >= num_slots):
        bad = sorted({v for v in index.flatten().tolist() if not -1 <= v < num_slots})
        raise IndexError(f"index holds slots {bad}, outside [-1, {num_slots}) for a memory of {num_slots} slots")
    return index
