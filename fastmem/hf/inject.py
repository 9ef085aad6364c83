"""`inject`: run a patched model with memory, inside a ``with`` block.

A context manager whose forward hooks turn a memory source (anything with ``num_slots``,
``validate(model)``, ``version()`` and ``memory_for(model, index)``: a `MemoryBank` or a `KVPool`) into an
`InjectionContext` per forward, shift positions by each row's memory length, and compute the loss.
Works with ``model(...)`` and ``model.generate(...)``.

Each row behaves as if it ran alone with its memory in front: its real tokens sit at positions
``n_b + 0, n_b + 1, ...`` (``n_b`` = the row's memory positions), left padding is invisible, and the
cache of ``generate`` holds real tokens only.
"""
from __future__ import annotations

import contextlib
import inspect
import weakref

import torch
from torch import Tensor

from fastmem.hf.attention import CONTEXT_KEYWORD, check_patched
from fastmem.hf.context import InjectionContext
from fastmem.hf.pools import Memory, MemorySource, checked_index
from fastmem.hf.support import check_cache, check_rope_positions, find_cache, rope_position_limit

IGNORE_INDEX = -100

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
        self.pending: tuple[InjectionContext, Tensor | None, Tensor, bool] | None = None

    def memory(self, index: Tensor) -> Memory:
        """The batch's memory; without autograd it is built once per block and source version."""
        if torch.is_grad_enabled():
            return self.source.memory_for(self.model, index)
        key = self.source.version() + (index.shape[0],)
        if self.cached is None or self.cached[0] != key:
            self.cached = (key, self.source.memory_for(self.model, index))
        return self.cached[1]

    def before_forward(self, module, args, kwargs):
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
            cached = int(cache.get_seq_length()) if cache is not None and context.longest_memory > 0 else past
            if cached != past:
                raise ValueError(f"attention_mask has {flat_mask.shape[1]} columns for {new} new tokens, so it "
                                 f"describes {past} earlier positions, but the cache holds {cached}: pass a 2-D "
                                 "mask over the cached and the new tokens (as generate builds it)")
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
        if self.pending is None:
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
