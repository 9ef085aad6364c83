"""The attention handlers a forward with memory hands every layer (through the ``fastmem`` keyword).

- `InjectionContext`: every layer attends to a `Memory` before its own keys. Its `attend` reads the layout
  of the layer's own keys off the mask that layer is handed (`key_layout`: how many keys hold tokens, each
  row's padding), so any cache and either cache keyword work; it calls `fastmem.prefix_attention` for rows
  with memory, with one `AttentionPlan` and the pool in the compute dtype prepared at the first layer and
  reused by the others, and the model's own attention for rows without.
- `KVRecorder`: keeps each layer's keys and values (to make a pool of them), then attends.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor

from fastmem.hf.pools import KVPool, Memory, memory_lengths
from fastmem.ops import AttentionPlan, plan_prefix_attention, prefix_attention


def needs_grad(tensors) -> bool:
    """Whether autograd is on and some of ``tensors`` require gradients."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def check_grad_mode(expects_grad: bool) -> None:
    """ValueError when a layer runs without autograd while its memory ``expects_grad``."""
    if expects_grad and not torch.is_grad_enabled():
        raise ValueError("memory gradients would be lost: a layer ran without autograd (reentrant gradient "
                         "checkpointing); use non-reentrant checkpointing (use_reentrant=False, transformers' "
                         "default)")


@dataclass(frozen=True)
class KeyLayout:
    """How one layer's own keys are laid out, read off the mask that layer is handed.

    used: the leading keys that hold tokens (a static cache hands unfilled slots after them).
    key_start: ``[B]`` or None; row b's own keys ``j < key_start[b]`` are left padding (or evicted).
    longest_span: the most memory plus own positions any memory row attends to (checked against windows).
    mismatched: whether some memory row's mask is not "every key in [key_start, own position]" (a window
    that cuts the row, a custom 4-D mask), which the fused kernel cannot express.
    """
    used: int
    key_start: Tensor | None
    longest_span: int
    mismatched: bool


def _visible_keys(mask, batch: int, q_len: int, k_len: int) -> Tensor:
    """A layer's attention mask as bool ``[B, Tq, Tk]``, True = visible.

    Accepts what transformers' mask functions hand a layer: 4-D ``[B or 1, H or 1, Tq, Tk]`` bool (sdpa) or
    additive float (eager, 0 = visible), or a 2-D padding mask ``[B, Tk]`` (flash attention: causal,
    bottom-right aligned). TypeError for anything else (a flex BlockMask)."""
    if not isinstance(mask, Tensor) or mask.dim() not in (2, 4):
        raise TypeError(f"memory injection needs a dense attention mask (sdpa, eager or flash attention); got "
                        f"{type(mask).__name__} {tuple(getattr(mask, 'shape', ()))}")
    if mask.dim() == 2:
        own_position = torch.arange(q_len, device=mask.device) + k_len - q_len
        return mask.bool()[:, None, :] & (torch.arange(k_len, device=mask.device) <= own_position[:, None])
    visible = mask[:, 0] if mask.dtype == torch.bool else mask[:, 0] == 0
    if visible.shape[-2:] != (q_len, k_len):
        raise ValueError(f"the attention mask a layer got, {tuple(mask.shape)}, does not match its {q_len} queries "
                         f"and {k_len} keys")
    return visible.expand(batch, q_len, k_len)


def key_layout(mask, batch: int, q_len: int, k_len: int, row_lengths: Tensor) -> KeyLayout:
    """The `KeyLayout` of a layer handed ``mask`` (see `_visible_keys`) with ``q_len`` queries and ``k_len``
    keys, for rows with ``row_lengths [B]`` memory positions.

    A query is real when it sees its own key (left and right padding queries do not). Own key of query i:
    ``i + used - Tq``, where ``used`` is the largest ``last visible key - i + Tq`` over queries: every cache
    layer hands keys in position order, so this is how many hold tokens. One host sync."""
    visible = _visible_keys(mask, batch, q_len, k_len)
    device = visible.device
    keys, queries = torch.arange(k_len, device=device), torch.arange(q_len, device=device)
    seen = visible.any(dim=-1)                                                  # [B, Tq]
    last = k_len - 1 - visible.flip(-1).to(torch.uint8).argmax(dim=-1)
    used = torch.where(seen, last - queries, -k_len).max() + q_len
    own = queries + used - q_len                                                # [Tq]
    real = visible.gather(2, own.clamp(0, k_len - 1).expand(batch, q_len)[..., None]).squeeze(2) & (own >= 0)
    first = visible.to(torch.uint8).argmax(dim=-1)
    key_start = torch.minimum(torch.where(real, first, k_len).min(dim=1).values, used)
    expected = (keys >= key_start[:, None, None]) & (keys <= own[:, None])
    matches = ((visible == expected) | ~real[..., None]).all(dim=-1).all(dim=-1)
    has_memory = row_lengths > 0
    span = torch.where(has_memory, row_lengths + used - key_start, 0).max()
    used, span, mismatched = torch.stack([used, span, (has_memory & ~matches).any()]).tolist()
    return KeyLayout(used, key_start, span, bool(mismatched))


def _mask_rows(mask, rows: Tensor):
    """The rows ``rows`` of a layer's mask (unchanged when it has none or broadcasts over rows)."""
    return mask if not isinstance(mask, Tensor) or mask.shape[0] == 1 else mask[rows]


@dataclass(frozen=True)
class InjectionContext:
    """The attention handler for one forward: every layer attends to ``memory`` before its own keys.

    Rows with memory run `fastmem.prefix_attention`; rows without any (no slot, or empty slots) run the
    model's own attention with the mask it was handed, so they equal the unpatched model exactly, whatever
    cache or window is in play. Each layer reads its keys' layout off its own mask (`key_layout`), once per
    distinct mask per forward; the `AttentionPlan` of the memory rows (`plan`) and each layer's pool in the
    compute dtype (`pool_layer`) are made once per forward too, at the first layer that needs them.
    row_lengths: ``[B]`` memory positions of each row; longest_memory: their maximum.
    memory_rows / plain_rows: ``[B']`` rows with / without memory; None when every row has memory.
    needs_grad: whether the memory expects gradients (autograd must be on inside the layers).
    """
    memory: Memory
    row_lengths: Tensor
    longest_memory: int
    memory_rows: Tensor | None
    plain_rows: Tensor | None
    needs_grad: bool = False
    layouts: dict = field(default_factory=dict, compare=False, repr=False)
    plans: dict = field(default_factory=dict, compare=False, repr=False)
    pools: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def for_memory(cls, memory: Memory) -> "InjectionContext":
        """The handler attending to ``memory``; it expects gradients when autograd is on and the pool needs them.

        Checks the slot ids and slot lengths here (IndexError), in the host sync that finds the rows with
        memory, before anything is gathered by them."""
        tensors = [t for pair in memory.pool.layers for t in pair]
        lengths, index = memory.pool.lengths, memory.index
        in_range = index.clamp(max=lengths.shape[0] - 1)  # a bad id must fail the check below, not the gather
        row_lengths = memory_lengths(lengths, in_range)
        bounds = torch.cat([torch.stack([index.min(), index.max(), lengths.min(), lengths.max()]).long(),
                            row_lengths.long()]).tolist()
        (index_min, index_max, lens_min, lens_max), per_row = bounds[:4], bounds[4:]
        num_slots, pool_len = tensors[0].shape[:2]
        if index_min < -1 or index_max >= num_slots or lens_min < 0 or lens_max > pool_len:
            raise IndexError(f"memory index in [{index_min}, {index_max}] or slot lengths in [{lens_min}, "
                             f"{lens_max}] out of range for a pool of {num_slots} slots of {pool_len} positions")
        memory_rows = plain_rows = None
        if min(per_row) == 0 < max(per_row):
            memory_rows, plain_rows = (torch.tensor([b for b, n in enumerate(per_row) if (n > 0) == wanted],
                                                    device=index.device) for wanted in (True, False))
        return cls(memory, row_lengths, max(per_row), memory_rows, plain_rows, needs_grad(tensors))

    def layout(self, mask, batch: int, q_len: int, k_len: int) -> KeyLayout:
        """`key_layout` of a layer's mask, computed once per distinct mask object in this forward; without a
        mask no host sync at all: no mask means SDPA's ``is_causal``, aligned top-left, so with several queries
        only the first ``Tq`` keys hold tokens (an unpadded prefill into a static cache hands the whole
        buffer without a mask), and one query sees every key."""
        if mask is None:
            used = k_len if q_len == 1 else min(q_len, k_len)
            return KeyLayout(used, None, self.longest_memory + used, False)
        key = (id(mask), q_len, k_len)
        if key not in self.layouts:
            self.layouts[key] = (mask, key_layout(mask, batch, q_len, k_len, self.row_lengths))
        return self.layouts[key][1]

    def plan(self, layout: KeyLayout, query: Tensor) -> AttentionPlan:
        """The `AttentionPlan` of the memory rows for a layer's key layout and query ``[B, Hq, Tq, D]`` (its
        dtype and D): built by the first layer with this layout and dtype (one host sync), reused by the rest."""
        key = (id(layout.key_start), query.dtype, query.shape[-1])
        if key not in self.plans:
            rows, pool = self.memory_rows, self.memory.pool.layers[0][0]
            key_start = layout.key_start if rows is None or layout.key_start is None else layout.key_start[rows]
            self.plans[key] = (layout.key_start, plan_prefix_attention(
                self.memory.index if rows is None else self.memory.index[rows], self.memory.pool.lengths,
                num_slots=pool.shape[0], prefix_len=pool.shape[1], dtype=query.dtype, head_dim=query.shape[-1],
                key_start=key_start, backward=self.needs_grad))
        return self.plans[key][1]

    def pool_layer(self, layer: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Layer ``layer``'s pool keys and values ``[S, P, Hkv, D]`` in ``dtype``, cast once per context."""
        if (layer, dtype) not in self.pools:
            self.pools[layer, dtype] = tuple(t.to(dtype) for t in self.memory.pool.layers[layer])
        return self.pools[layer, dtype]

    def attend(self, original, module, query: Tensor, key: Tensor, value: Tensor, attention_mask,
               **kwargs) -> tuple[Tensor, None]:
        """query ``[B, Hq, Tq, D]``, key/value ``[B, Hkv, Tk, D]`` as the layer's cache hands them, with the
        layer's own mask -> ``[B, Tq, Hq, D]``. ValueError when memory would not fit a sliding window, when
        attention dropout is on, or when a memory row's mask is not one run of keys."""
        check_grad_mode(self.needs_grad)
        if self.longest_memory == 0:
            return original(module, query, key, value, attention_mask, **kwargs)
        if kwargs.get("dropout"):
            raise ValueError(f"attention dropout ({kwargs['dropout']}) is not supported with memory; use "
                             "model.eval() or set config.attention_dropout = 0")
        batch, q_len, k_len = query.shape[0], query.shape[2], key.shape[2]
        layout = self.layout(attention_mask, batch, q_len, k_len)
        window = kwargs.get("sliding_window")
        if window is not None and layout.longest_span > window:
            raise ValueError(f"memory plus keys ({layout.longest_span} positions) exceed layer {module.layer_idx}'s "
                             f"sliding window of {window}")
        if layout.mismatched:
            raise ValueError(f"layer {module.layer_idx}'s attention mask does not give a row with memory one run "
                             "of keys ending at each query: a key masked inside the row (packed sequences, a custom "
                             "4-D mask, or generate's mask inferred from a pad token that also occurs in the prompt: "
                             "pass attention_mask)")
        rows = self.memory_rows
        pick = (lambda t: t) if rows is None else (lambda t: t[rows])
        pool_keys, pool_values = self.pool_layer(module.layer_idx, query.dtype)
        out = prefix_attention(pick(query).transpose(1, 2), pick(key)[:, :, :layout.used].transpose(1, 2),
                               pick(value)[:, :, :layout.used].transpose(1, 2), pool_keys, pool_values, causal=True,
                               softmax_scale=kwargs.get("scaling"), plan=self.plan(layout, query))
        if rows is None:
            return out, None
        plain = self.plain_rows
        plain_out, _ = original(module, query[plain], key[plain], value[plain], _mask_rows(attention_mask, plain),
                                **kwargs)
        return out.new_empty((batch, *out.shape[1:])).index_copy(0, rows, out).index_copy(
            0, plain, plain_out.to(out.dtype)), None


@dataclass
class KVRecorder:
    """An attention handler that keeps each layer's keys and values, then attends: through ``context`` (with
    memory) when given, else with the original attention."""
    needs_grad: bool
    context: InjectionContext | None = None
    keys: dict[int, Tensor] = field(default_factory=dict)
    values: dict[int, Tensor] = field(default_factory=dict)

    def attend(self, original, module, query, key, value, attention_mask, **kwargs):
        check_grad_mode(self.needs_grad)
        self.keys[module.layer_idx], self.values[module.layer_idx] = key, value
        attend = original if self.context is None else partial(self.context.attend, original)
        return attend(module, query, key, value, attention_mask, **kwargs)

    def pool(self, lengths: Tensor) -> KVPool:
        """The recorded ``[S, Hkv, P, D]`` states as a pool ``[S, P, Hkv, D]`` per layer."""
        return KVPool(tuple((self.keys[i].transpose(1, 2), self.values[i].transpose(1, 2))
                            for i in sorted(self.keys)), lengths)
