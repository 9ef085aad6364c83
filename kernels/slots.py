"""Slot bookkeeping shared by the prefix-attention backends, the reference and `fastmem.hf`.

`sum_into_slots` is the deterministic reduction of per-use gradients into their slots (the reference's
backward and the order every kernel reproduces); `slot_use_lists` is the CSR of each slot's uses that the
kernels reduce by (an `AttentionPlan` builds it once per forward); `valid_slot_positions` says which pool
positions a row reads. Imports only torch.
"""
from __future__ import annotations

import torch
from torch import Tensor


def sum_into_slots(per_use: Tensor, index: Tensor, num_slots: int) -> Tensor:
    """Deterministic scatter-sum of per-use tensors into their slots.

    per_use: ``[B, M, *F]`` (the contribution of use ``(b, m)``); index: ``[B, M]`` slot ids, ``-1`` unused.
    Returns ``[num_slots, *F]`` in per_use's dtype. Each slot sums its uses in ``(b, m)`` order, in
    conflict-free rounds (round r adds every slot's r-th use, and no slot appears twice in a round),
    so the bits never depend on thread scheduling, on any device.
    """
    feature_shape = per_use.shape[2:]
    flat_index = index.reshape(-1).long()
    flat = per_use.reshape(flat_index.numel(), *feature_shape)
    out = flat.new_zeros((num_slots, *feature_shape))
    uses = (flat_index >= 0).nonzero().squeeze(1)
    if uses.numel() == 0:
        return out
    slots = flat_index[uses]
    order = torch.argsort(slots, stable=True)
    sorted_slots = slots[order]
    counts = torch.bincount(sorted_slots, minlength=num_slots)
    first_use = counts.cumsum(0) - counts
    rank = torch.empty_like(slots)
    rank[order] = torch.arange(slots.numel(), device=slots.device) - first_use[sorted_slots]
    for r in range(int(counts.max())):
        in_round = rank == r
        round_slots = slots[in_round]
        out.index_put_((round_slots,), out[round_slots] + flat[uses[in_round]])
    return out


def slot_use_lists(index: Tensor, num_slots: int) -> tuple[Tensor, Tensor]:
    """Each slot's uses as CSR, for kernels that reduce per-use partials in `sum_into_slots`' order.

    index: ``[B, M]`` slot ids, ``-1`` unused. Returns offsets int32 ``[S + 1]`` and flat use ids
    ``b * M + m`` int32 ``[B * M]``: slot s's uses are ``uses[offsets[s]:offsets[s + 1]]``, ascending.
    Unused entries sort after every slot and are never read. No host sync.
    """
    flat = index.reshape(-1).long()
    key = torch.where(flat >= 0, flat, torch.full_like(flat, num_slots))
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=num_slots + 1)[:num_slots]
    offsets = torch.zeros(num_slots + 1, dtype=torch.int64, device=index.device)
    offsets[1:] = counts.cumsum(0)
    return offsets.to(torch.int32), order.to(torch.int32)


def valid_slot_positions(index: Tensor, lens: Tensor, prefix_len: int) -> Tensor:
    """Boolean ``[B, M, P]``: position p of use (b, m) exists (slot listed and ``p < lens[slot]``)."""
    positions = torch.arange(prefix_len, device=index.device)
    slot_lens = lens.long()[index.clamp(min=0).long()]
    return (index[..., None] >= 0) & (positions < slot_lens[..., None])
