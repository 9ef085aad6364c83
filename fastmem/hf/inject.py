"""`inject`: run a patched model with memory, and the small internal API it is built on.

The layers, from the bottom:

- `KVPool`: per-layer key/value pools ``[S, P, Hkv, D]`` with valid lengths ``[S]``: S slots any batch
  row can attend to. A prefix bank is one (its parameters, viewed per layer); a soft-prompt bank
  becomes one by running the model over its prompts (`soft_prompt_memory`); a prompt's KV cache
  becomes one with `KVPool.from_cache`.
- `Memory`: a pool plus, for one batch, which slots each row reads (``index [B, M]``, ``-1`` = none)
  and, for soft prompts, the logits of the last memory position (they predict the first real token).
- `InjectionContext`: what the attention function receives at every layer through the ``fastmem``
  forward keyword: the memory and which rows have any. Its `attend` reads the layout of the layer's own
  keys off the mask that layer is handed (`key_layout`: how many keys hold tokens, each row's padding),
  so any cache and either cache keyword work; it calls `fastmem.prefix_attention` on that layer's pool
  for rows with memory and the model's own attention for rows without.
- `inject(model, source, index)`: a context manager whose forward hooks turn ``source`` (anything with
  ``num_slots``, ``validate(model)``, ``version()`` and ``memory_for(model, index)``: a `MemoryBank` or
  a `KVPool`) into an `InjectionContext` per forward, shift positions by each row's memory length,
  and compute the loss. Works with ``model(...)`` and ``model.generate(...)``.
- Shared prefixes (`shared_prefix`, `run_after_memory`, `token_logprobs`): B prompts run once under
  their memory and become a pool with one slot per prompt, which many rows then continue (the
  samples of `fastmem.sample`, the traces of `fastmem.MemoryTrainer`). These forwards call the
  decoder directly with an explicit handler and explicit positions: no cache, no padding mask
  (every batch is right padded, which causal attention needs no mask for).

Each row behaves as if it ran alone with its memory in front: its real tokens sit at positions
``n_b + 0, n_b + 1, ...`` (``n_b`` = the row's memory positions), left padding is invisible, and the
cache of ``generate`` holds real tokens only.
"""
from __future__ import annotations

import contextlib
import inspect
import weakref
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from fastmem.hf.architectures import model_shape
from fastmem.hf.attention import CONTEXT_KEYWORD, original_implementation
from fastmem.hf.support import check_cache, check_rope_positions, find_cache, rope_position_limit
from fastmem.kernels.prefix_attention_ref import valid_slot_positions
from fastmem.ops import prefix_attention

IGNORE_INDEX = -100


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
    """What `inject` accepts: a `MemoryBank`, a `KVPool`, or anything with these members."""
    num_slots: int

    def validate(self, model) -> None: ...

    def version(self) -> tuple[int, ...]: ...

    def memory_for(self, model, index: Tensor) -> Memory: ...


def _needs_grad(tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _check_grad_mode(needs_grad: bool) -> None:
    if needs_grad and not torch.is_grad_enabled():
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
    distinct mask per forward.
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

    @classmethod
    def for_memory(cls, memory: Memory) -> "InjectionContext":
        """The handler attending to ``memory``; it expects gradients when autograd is on and the pool needs them.

        Checks the slot ids and slot lengths here, in the one host sync this needs anyway, so that every
        layer's `prefix_attention` skips its own check."""
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
        return cls(memory, row_lengths, max(per_row), memory_rows, plain_rows, _needs_grad(tensors))

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

    def attend(self, original, module, query: Tensor, key: Tensor, value: Tensor, attention_mask,
               **kwargs) -> tuple[Tensor, None]:
        """query ``[B, Hq, Tq, D]``, key/value ``[B, Hkv, Tk, D]`` as the layer's cache hands them, with the
        layer's own mask -> ``[B, Tq, Hq, D]``. ValueError when memory would not fit a sliding window, when
        attention dropout is on, or when a memory row's mask is not one run of keys."""
        _check_grad_mode(self.needs_grad)
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
        rows, index, key_start = self.memory_rows, self.memory.index, layout.key_start
        pick = (lambda t: t) if rows is None else (lambda t: t[rows])
        if key_start is not None:
            key_start = pick(key_start)
        pool_keys, pool_values = self.memory.pool.layers[module.layer_idx]
        out = prefix_attention(pick(query).transpose(1, 2), pick(key)[:, :, :layout.used].transpose(1, 2),
                               pick(value)[:, :, :layout.used].transpose(1, 2), pool_keys.to(query.dtype),
                               pool_values.to(query.dtype), pick(index), self.memory.pool.lengths, causal=True,
                               softmax_scale=kwargs.get("scaling"), key_start=key_start, check_index=False)
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
        _check_grad_mode(self.needs_grad)
        self.keys[module.layer_idx], self.values[module.layer_idx] = key, value
        attend = original if self.context is None else partial(self.context.attend, original)
        return attend(module, query, key, value, attention_mask, **kwargs)

    def pool(self, lengths: Tensor) -> KVPool:
        """The recorded ``[S, Hkv, P, D]`` states as a pool ``[S, P, Hkv, D]`` per layer."""
        return KVPool(tuple((self.keys[i].transpose(1, 2), self.values[i].transpose(1, 2))
                            for i in sorted(self.keys)), lengths)


def soft_prompt_memory(model, prompts: Tensor, lengths: Tensor, index: Tensor, with_logits: bool) -> Memory:
    """Soft prompts as a pool: run the model once per distinct slot sequence among the rows.

    prompts ``[S, P, hidden]``, lengths ``[S]``, index ``[B, M]`` (-1 = none). A row's memory is its slots'
    first ``lengths[s]`` vectors, concatenated in order; since they come first and attention is causal,
    their keys and values depend on nothing else, so each distinct sequence runs once (right padded,
    positions from 0) and rows attend to the result as a prefix. with_logits: also return the logits at
    each row's last memory position (needed for the loss).
    """
    slot_lengths = lengths.tolist()
    sequences: dict[tuple[int, ...], int] = {}
    row_sequence = []
    for row in index.tolist():
        sequence = tuple(slot for slot in row if slot >= 0 and slot_lengths[slot] > 0)
        row_sequence.append(sequences.setdefault(sequence, len(sequences)) if sequence else -1)
    device = prompts.device
    row_index = torch.tensor(row_sequence, dtype=torch.long, device=device)[:, None]
    if not sequences:
        shape = model_shape(model)
        empty = prompts.new_zeros((1, 1, shape.num_kv_heads, shape.head_dim))
        pool = KVPool(((empty, empty),) * shape.num_layers, torch.zeros(1, dtype=torch.long, device=device))
        return Memory(pool, row_index)

    prompt_len = prompts.shape[1]
    flat_positions = [[slot * prompt_len + p for slot in sequence for p in range(slot_lengths[slot])]
                      for sequence in sequences]
    sequence_lengths = torch.tensor([len(p) for p in flat_positions], dtype=torch.long, device=device)
    longest = int(sequence_lengths.max())
    gather = torch.tensor([p + [0] * (longest - len(p)) for p in flat_positions], dtype=torch.long, device=device)
    valid = torch.arange(longest, device=device) < sequence_lengths[:, None]
    embeds = prompts.reshape(-1, prompts.shape[-1])[gather].to(model.dtype)   # [U, L, hidden]
    last = sequence_lengths - 1
    kept = last.unique()                                  # logits only where some sequence ends

    recorder = KVRecorder(_needs_grad([prompts]))
    out = model(inputs_embeds=embeds, attention_mask=valid.long(), use_cache=False,
                logits_to_keep=kept if with_logits else 1, **{CONTEXT_KEYWORD: recorder})
    lead_logits = None
    if with_logits:
        sequence_logits = out.logits[torch.arange(len(sequences), device=device), torch.searchsorted(kept, last)]
        lead_logits = sequence_logits[row_index[:, 0].clamp(min=0)]
    return Memory(recorder.pool(sequence_lengths), row_index, lead_logits)


def _key_start(attention_mask: Tensor, batch: int, new: int) -> Tensor:
    """Leading padding ``[B]`` of each row of a 2-D mask ``[B, past + new]``; ValueError for any other layout."""
    if attention_mask.shape[0] != batch or attention_mask.shape[1] < new:
        raise ValueError(f"memory injection needs a 2-D attention_mask [batch, past + new tokens] with batch = "
                         f"{batch} and at least {new} columns; got {tuple(attention_mask.shape)}")
    valid = attention_mask.bool()
    start = (~valid).long().cumprod(dim=1).sum(dim=1)
    positions = torch.arange(attention_mask.shape[1], device=valid.device)
    expected = (positions >= start[:, None]) & (positions < (start + valid.sum(dim=1))[:, None])
    if not torch.equal(valid, expected):
        raise ValueError("with memory, each attention_mask row must be one run of ones (left and/or right "
                         "padding only)")
    return start


def _position_ids(position_ids: Tensor | None, attention_mask: Tensor | None, past: int, new: int,
                  row_lengths: Tensor) -> Tensor:
    """``[B, T]`` positions of the new tokens as if each row ran alone, shifted by its memory length.

    attention_mask: the forward's mask when it is 2-D (positions count its ones), else None."""
    if position_ids is None:
        if attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)[:, -new:]
        else:
            position_ids = torch.arange(past, past + new, device=row_lengths.device)[None]
    return position_ids + row_lengths[:, None]


_INJECTING: "weakref.WeakSet" = weakref.WeakSet()


class _Injection:
    """The forward hooks of one `inject` block."""

    def __init__(self, model, source: MemorySource, index: Tensor, expand: int):
        self.model, self.source, self.index, self.expand = model, source, index, expand
        self.parameter_names = list(inspect.signature(model.forward).parameters)
        self.rope_limit = rope_position_limit(model)
        self.cached: tuple[tuple, Memory] | None = None
        self.pending: tuple[InjectionContext, Tensor, bool] | None = None

    def memory(self, index: Tensor) -> Memory:
        """The batch's memory; without autograd it is built once per block and source version."""
        if torch.is_grad_enabled():
            return self.source.memory_for(self.model, index)
        key = self.source.version() + (index.shape[0],)
        if self.cached is None or self.cached[0] != key:
            self.cached = (key, self.source.memory_for(self.model, index))
        return self.cached[1]

    def before_forward(self, module, args, kwargs):
        if CONTEXT_KEYWORD in kwargs:   # a forward fastmem itself started (soft-prompt pass)
            return None
        self.pending = None
        kwargs = {**dict(zip(self.parameter_names, args)), **kwargs}
        tokens = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        if tokens is None:
            raise ValueError("memory injection needs input_ids or inputs_embeds")
        batch, new = tokens.shape[:2]
        if batch != self.index.shape[0] * self.expand:
            raise ValueError(f"memory index has {self.index.shape[0]} rows (x expand={self.expand}) but the batch "
                             f"has {batch}")
        cache = find_cache(kwargs)          # by type: transformers 5.24 passes `cache=`, older `past_key_values=`
        self.source.validate(self.model)
        memory = self.memory(self.index.repeat_interleave(self.expand, dim=0))
        context = InjectionContext.for_memory(memory)
        if context.longest_memory > 0:
            check_cache(cache)
        attention_mask = kwargs.get("attention_mask")
        flat_mask = attention_mask if isinstance(attention_mask, Tensor) and attention_mask.dim() == 2 else None
        if attention_mask is not None and flat_mask is None and (kwargs.get("position_ids") is None
                                                               or kwargs.get("labels") is not None):
            raise ValueError("with memory, a forward given a prepared (4-D or per-layer) attention_mask needs "
                             "explicit position_ids and no labels; pass the 2-D padding mask instead")
        if flat_mask is not None:
            past = flat_mask.shape[1] - new
            first_token = _key_start(flat_mask, batch, new) - past
        else:
            past, first_token = (int(cache.get_seq_length()) if cache is not None else 0), None
        if attention_mask is None and past == 0 and kwargs.get("position_ids") is not None and bool(
                (kwargs["position_ids"].diff(dim=-1) != 1).any()):
            raise ValueError("packed sequences (position_ids restarting inside a row) are not supported with memory")
        positions = _position_ids(kwargs.get("position_ids"), flat_mask, past, new, context.row_lengths)
        if context.longest_memory > 0 and self.rope_limit is not None:
            check_rope_positions(self.rope_limit, int(positions.max()))
        kwargs["position_ids"] = positions
        kwargs[CONTEXT_KEYWORD] = context
        if kwargs.get("labels") is not None:
            self.pending = (context, first_token, kwargs.pop("labels"), kwargs.get("return_dict", True))
            kwargs["return_dict"] = True
        return (), kwargs

    def after_forward(self, module, args, kwargs, output):
        if self.pending is None or kwargs.get(CONTEXT_KEYWORD) is not self.pending[0]:
            return None
        context, first_token, labels, return_dict = self.pending
        self.pending = None
        output.loss = self.loss(context, first_token, output.logits, labels, kwargs.get("num_items_in_batch"))
        return output if return_dict else output.to_tuple()

    def loss(self, context: InjectionContext, first_token: Tensor | None, logits: Tensor, labels: Tensor,
             num_items_in_batch) -> Tensor:
        """The model's own loss, with each row's first real token predicted as if the row ran alone.

        logits ``[B, T, V]``, labels ``[B, T]`` (the new tokens), first_token ``[B]`` (each row's first real
        token, counted from the first new one: negative when it is cached; None = 0). Position t predicts
        ``labels[:, t + 1]`` as usual, except for each row's first real token (``labels[b, first_token[b]]``):
        the last memory position predicts it for soft prompts (as in PEFT's prompt tuning); nothing does for
        prefixes or rows without memory (as in PEFT's prefix tuning and a plain model). So left padding never
        predicts a real token.
        """
        batch, length = labels.shape
        starts = first_token if first_token is not None else labels.new_zeros(batch)
        positions = torch.arange(length + 1, device=labels.device)
        is_first = positions == starts[:, None]                        # [B, T + 1]: full position of labels[s]
        lead = context.memory.lead_logits
        has_lead = context.row_lengths > 0 if lead is not None else torch.zeros_like(is_first[:, 0])
        full_logits = torch.cat([logits[:, :1], logits], dim=1)          # full_logits[t] predicts labels[t]
        if lead is not None:
            full_logits = torch.where((is_first & has_lead[:, None])[..., None], lead[:, None].to(logits.dtype),
                                      full_logits)
        full_labels = torch.cat([torch.full_like(labels[:, :1], IGNORE_INDEX), labels], dim=1)
        unpredicted = (positions == starts[:, None] + 1) & ~has_lead[:, None]
        full_labels = full_labels.masked_fill(unpredicted, IGNORE_INDEX)
        return self.model.loss_function(logits=full_logits, labels=full_labels,
                                        vocab_size=self.model.config.vocab_size,
                                        num_items_in_batch=num_items_in_batch)


def check_patched(model) -> None:
    """ValueError unless ``model`` went through `fastmem.patch`."""
    if original_implementation(model) is None:
        raise ValueError(f"{type(model).__name__} is not patched; call fastmem.patch(model) first")


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


@contextlib.contextmanager
def inject(model, memory: MemorySource, index: Tensor, *, expand: int = 1):
    """Run ``model`` (patched with `fastmem.patch`) with memory, inside a ``with`` block.

    memory: a `MemoryBank` (or a `KVPool`). index: integer ``[B]`` or ``[B, M]``; row b reads slots
    ``index[b]`` in order (``-1`` = none). expand: each index row serves ``expand`` consecutive batch rows,
    as ``generate`` lays them out for ``num_return_sequences`` / ``num_beams``.

    Inside the block, ``model(...)`` and ``model.generate(...)`` behave for every row as if it ran alone
    with its memory in front. ``out.logits`` is ``[B, T, V]``: the real tokens only (PEFT's prompt tuning
    returns ``[B, P + T, V]``, virtual positions first); at left-padding positions its values are
    unspecified. ``out.loss`` equals PEFT's: for soft prompts it also counts predicting each row's first
    real token from the last memory position; see `_Injection.loss`. Explicit ``position_ids`` are
    taken as positions without memory and shifted by the row's memory length; without them, each row's
    real tokens are numbered from 0 after its left padding, as ``generate`` numbers them (a plain
    transformers forward numbers the columns, padding included, so a left-padded row without memory and
    without ``position_ids`` differs from the unpatched forward there, and equals itself run alone).
    Rows without memory run the model's own attention with the mask and cache it hands the layer.
    The cache may come as ``cache=`` or ``past_key_values=``; which caches and rotary embeddings are
    handled and which are refused (before any compute) is tabled in `fastmem.hf.support`.
    Without autograd (as in ``generate``) a soft-prompt bank is run once per block while the bank is
    unchanged. Checks (before computing anything): model patched, index integer and in range, memory made
    for this model and finite; the batch size, the cache and the rotary positions are checked at each forward.
    """
    check_patched(model)
    if model in _INJECTING:
        raise ValueError("fastmem.inject blocks on one model cannot be nested")
    if not isinstance(expand, int) or expand < 1:
        raise ValueError(f"expand must be a positive int; got {expand!r}")
    memory.validate(model)
    index = checked_index(index, memory.num_slots, model.device)
    injection = _Injection(model, memory, index, expand)
    handles = [model.register_forward_pre_hook(injection.before_forward, with_kwargs=True),
               model.register_forward_hook(injection.after_forward, with_kwargs=True)]
    _INJECTING.add(model)
    try:
        yield model
    finally:
        _INJECTING.discard(model)
        for handle in handles:
            handle.remove()


# Shared prefixes ---------------------------------------------------------------------------------------

LOGITS_CHUNK_ELEMENTS = 2 ** 26     # `token_logprobs` materializes at most this many logits at once


def right_pad(rows: list[Tensor], value: int = 0) -> tuple[Tensor, Tensor]:
    """1-D token rows -> ids ``[B, max length]`` right padded with ``value``, and lengths ``[B]``."""
    lengths = torch.tensor([len(row) for row in rows], dtype=torch.long, device=rows[0].device)
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=value), lengths


def run_after_memory(model, memory: Memory | None, input_ids: Tensor, *, past: int = 0, handler=None) -> Tensor:
    """Final hidden states ``[B, T, hidden]`` (after the last norm) of right-padded rows ``input_ids [B, T]``.

    Row b's tokens sit at positions ``n_b + past + t`` (``n_b`` = its memory positions, 0 without memory),
    and every layer attends through ``handler``: by default an `InjectionContext` for ``memory`` (row b
    sees its memory, then its own tokens); a handler that wraps one may also keep keys and values.
    """
    offset = past if memory is None else memory.row_lengths()[:, None] + past
    positions = offset + torch.arange(input_ids.shape[1], device=input_ids.device)[None]
    if handler is None and memory is not None:
        handler = InjectionContext.for_memory(memory)
    out = model.get_decoder()(input_ids=input_ids, position_ids=positions.expand(input_ids.shape[0], -1),
                              use_cache=False, **{CONTEXT_KEYWORD: handler})
    return out.last_hidden_state


def output_logits(model, hidden: Tensor) -> Tensor:
    """``[..., hidden]`` final hidden states -> ``[..., V]`` logits (the supported models apply only the head)."""
    return model.get_output_embeddings()(hidden)


def token_logprobs(model, hidden: Tensor, targets: Tensor) -> Tensor:
    """fp32 ``[N]`` log-probabilities of ``targets [N]`` given final hidden states ``[N, hidden]``.

    Logits are made in chunks of at most `LOGITS_CHUNK_ELEMENTS`; under autograd each chunk is
    checkpointed, so no ``[N, V]`` logits are kept for backward (they are recomputed, chunk by chunk).
    """
    def chunk_logprobs(chunk_hidden: Tensor, chunk_targets: Tensor) -> Tensor:
        logprobs = output_logits(model, chunk_hidden).float().log_softmax(dim=-1)
        return logprobs.gather(1, chunk_targets[:, None]).squeeze(1)

    rows = max(1, LOGITS_CHUNK_ELEMENTS // model.config.vocab_size)
    checkpointed = torch.is_grad_enabled() and hidden.requires_grad
    pieces = [checkpoint(chunk_logprobs, h, t, use_reentrant=False) if checkpointed
              else chunk_logprobs(h, t) for h, t in zip(hidden.split(rows), targets.split(rows))]
    return torch.cat(pieces)


def prepend_memory(memory: Memory, prompts: KVPool) -> KVPool:
    """A pool whose slot b holds row b's memory (slots ``memory.index[b]`` in order), then slot b of ``prompts``.

    ``prompts``: one slot per row of ``memory``. One gather per layer (a copy), differentiable into both;
    each position is read once per row, so gradients sum deterministically.
    """
    memory_keys = memory.pool.layers[0][0]
    num_slots, slot_len = memory_keys.shape[:2]
    batch, prompt_len = prompts.layers[0][0].shape[:2]
    device = memory_keys.device
    memory_flat = (memory.index.clamp(min=0)[..., None] * slot_len + torch.arange(slot_len, device=device)).flatten(1)
    memory_valid = valid_slot_positions(memory.index, memory.pool.lengths, slot_len).flatten(1)
    own = torch.arange(prompt_len, device=device)
    prompt_flat = num_slots * slot_len + torch.arange(batch, device=device)[:, None] * prompt_len + own
    valid = torch.cat([memory_valid, own < prompts.lengths[:, None]], dim=1)
    order = torch.argsort((~valid).to(torch.uint8), dim=1, stable=True)       # valid positions first, in order
    lengths = valid.sum(dim=1)
    gather = torch.cat([memory_flat, prompt_flat], dim=1).gather(1, order)[:, :int(lengths.max())]

    def joined(memory_part: Tensor, prompt_part: Tensor) -> Tensor:
        flat = torch.cat([memory_part.to(prompt_part.dtype).flatten(0, 1), prompt_part.flatten(0, 1)])
        return flat[gather]

    layers = tuple((joined(mk, pk), joined(mv, pv)) for (mk, mv), (pk, pv) in zip(memory.pool.layers, prompts.layers))
    return KVPool(layers, lengths)


@dataclass(frozen=True)
class SharedPrefix:
    """B prompts run once under their memory.

    pool: one slot per prompt, ``[B, longest, Hkv, D]`` per layer: the row's memory positions, then its
    prompt's (``pool.lengths [B]`` = memory + prompt positions). A row continuing slot b at positions
    ``pool.lengths[b] + t`` continues prompt b exactly as if the whole sequence ran at once.
    last_hidden: ``[B, hidden]``, the final hidden state at each prompt's last token (it predicts the
    first continuation token).
    """
    pool: KVPool
    last_hidden: Tensor


def shared_prefix(model, memory: Memory | None, prompts: list[Tensor]) -> SharedPrefix:
    """Run B prompts (1-D token rows, lengths >= 1, on the model's device or the host) in one right-padded
    forward, row b after its memory (``memory.index[b]``; no memory when None). Differentiable into the
    memory's pool."""
    ids, lengths = (t.to(model.device) for t in right_pad(prompts))
    context = None if memory is None else InjectionContext.for_memory(memory)
    recorder = KVRecorder(context is not None and context.needs_grad, context=context)
    hidden = run_after_memory(model, memory, ids, handler=recorder)
    pool = recorder.pool(lengths)
    if memory is not None:
        pool = prepend_memory(memory, pool)
    return SharedPrefix(pool, hidden[torch.arange(len(prompts), device=ids.device), lengths - 1])
