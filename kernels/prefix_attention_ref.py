"""Plain-torch reference for memory-injected (prefix) attention: the spec every kernel is tested against.

Row ``b`` attends to ``cat([first prefix_lens[s] positions of slot s for s in prefix_index[b] if s >= 0],
own keys of row b)``; the prefix is visible to every query, the own keys are causally masked with
bottom-right alignment (query ``i`` sees own key ``j`` when ``j <= i + Tk - Tq``).

Only a reference: it imports torch and the slot utilities every backend shares (`kernels/slots.py`),
whose `sum_into_slots` fixes the order in which its backward, and every kernel, sums a shared slot's gradients.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .slots import sum_into_slots, valid_slot_positions


class _GatherSlots(torch.autograd.Function):
    """``pool[index.clamp(min=0)]`` with a deterministic backward (`sum_into_slots`)."""

    @staticmethod
    def forward(ctx, pool: Tensor, index: Tensor) -> Tensor:
        ctx.save_for_backward(index)
        ctx.num_slots = pool.shape[0]
        return pool[index.clamp(min=0).long()]

    @staticmethod
    def backward(ctx, grad: Tensor):
        (index,) = ctx.saved_tensors
        return sum_into_slots(grad, index, ctx.num_slots), None


def gather_slots(pool: Tensor, index: Tensor) -> Tensor:
    """pool ``[S, *F]``, index ``[B, M]`` -> ``[B, M, *F]`` (entries of ``-1`` read slot 0; mask them)."""
    return _GatherSlots.apply(pool, index)


def normalize_index(prefix_index: Tensor) -> Tensor:
    """``[B]`` or ``[B, M]`` slot ids -> ``[B, M]``."""
    return prefix_index[:, None] if prefix_index.dim() == 1 else prefix_index


def attention_mask(index: Tensor, lens: Tensor, prefix_len: int, q_len: int, k_len: int,
                   causal: bool, key_start: Tensor | None = None) -> Tensor:
    """Boolean ``[B, Tq, M * P + Tk]``: which keys of the concatenation each query sees."""
    device = index.device
    prefix_ok = valid_slot_positions(index, lens, prefix_len)
    prefix_ok = prefix_ok.reshape(index.shape[0], 1, -1).expand(-1, q_len, -1)
    own_ok = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    if causal:
        query_pos = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
        own_ok = torch.arange(k_len, device=device)[None, :] <= query_pos
    own_ok = own_ok.expand(index.shape[0], -1, -1)
    if key_start is not None:
        own_ok = own_ok & (torch.arange(k_len, device=device) >= key_start.long()[:, None])[:, None, :]
    return torch.cat([prefix_ok, own_ok], dim=2)


def _attention_probs(q, k, v, prefix_k, prefix_v, index, lens, key_start, causal, scale, dtype):
    """Concatenated keys/values ``[B, M*P + Tk, Hq, D]`` (KV heads repeated), probabilities
    ``[B, Hq, Tq, M*P + Tk]`` and lse ``[B, Hq, Tq]``, all computed in ``dtype``."""
    batch, q_len, q_heads, head_dim = q.shape
    k_len, kv_heads = k.shape[1], k.shape[2]
    prefix_len = prefix_k.shape[1]
    uses = index.shape[1]
    # Invalid positions are zeroed, not just masked: whatever they hold (even NaN) must not leak.
    valid = valid_slot_positions(index, lens, prefix_len)[..., None, None]

    def concat(pool: Tensor, own: Tensor) -> Tensor:
        prefix = gather_slots(pool, index).masked_fill(~valid, 0.0)
        return torch.cat([prefix.reshape(batch, uses * prefix_len, kv_heads, head_dim), own], dim=1).to(dtype)

    keys, values = concat(prefix_k, k), concat(prefix_v, v)
    group = q_heads // kv_heads
    keys = keys.repeat_interleave(group, dim=2)
    values = values.repeat_interleave(group, dim=2)

    scores = torch.einsum("bqhd,bkhd->bhqk", q.to(dtype), keys) * scale
    visible = attention_mask(index, lens, prefix_len, q_len, k_len, causal, key_start)[:, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = row_max.masked_fill(row_max == float("-inf"), 0.0)
    weights = torch.exp(scores - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    probs = weights / denom.masked_fill(denom == 0, 1.0)
    lse = (denom.float().log() + row_max.float()).squeeze(-1)
    return keys, values, probs, lse


def _defaults(q, prefix_k, prefix_index, prefix_lens, softmax_scale, upcast):
    index = normalize_index(prefix_index)
    lens = prefix_lens if prefix_lens is not None else torch.full(
        (prefix_k.shape[0],), prefix_k.shape[1], dtype=torch.int32, device=q.device)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    dtype = torch.promote_types(q.dtype, torch.float32) if upcast else q.dtype
    return index, lens, scale, dtype


def prefix_attention_ref(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
                         prefix_index: Tensor, prefix_lens: Tensor | None = None, *,
                         causal: bool = True, softmax_scale: float | None = None,
                         key_start: Tensor | None = None, upcast: bool = True,
                         return_lse: bool = False):
    """Reference prefix attention by gather + concatenate + masked softmax (differentiable by autograd).

    q ``[B, Tq, Hq, D]``; k, v ``[B, Tk, Hkv, D]``; prefix_k, prefix_v ``[S, P, Hkv, D]``;
    prefix_index ``[B]`` or ``[B, M]`` (``-1`` = none); prefix_lens ``[S]`` or None (all P);
    key_start ``[B]`` or None: own keys ``j < key_start[b]`` are invisible (left padding).
    A query that sees no key at all gets a zero output and an lse of ``-inf``.
    Computes in fp32 (fp64 stays fp64) when ``upcast``, else in the inputs' dtype (the "plain torch
    in the same dtype" baseline of the accuracy rule). Returns out ``[B, Tq, Hq, D]`` in q's dtype,
    and with ``return_lse`` also the natural-log logsumexp ``[B, Hq, Tq]`` in fp32.
    """
    index, lens, scale, dtype = _defaults(q, prefix_k, prefix_index, prefix_lens, softmax_scale, upcast)
    _, values, probs, lse = _attention_probs(q, k, v, prefix_k, prefix_v, index, lens, key_start,
                                             causal, scale, dtype)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, values).to(q.dtype)
    return (out, lse) if return_lse else out


def prefix_attention_ref_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor,
                                  prefix_v: Tensor, prefix_index: Tensor,
                                  prefix_lens: Tensor | None = None, *, causal: bool = True,
                                  softmax_scale: float | None = None, key_start: Tensor | None = None,
                                  upcast: bool = True) -> tuple[Tensor, ...]:
    """Explicit backward of `prefix_attention_ref` (FlashAttention's formulas, in plain torch).

    grad_out ``[B, Tq, Hq, D]``; other arguments as in `prefix_attention_ref`. Returns
    ``(dq, dk, dv, dprefix_k, dprefix_v)`` shaped and typed like their inputs; pool gradients are
    summed over uses with `sum_into_slots`.
    """
    index, lens, scale, dtype = _defaults(q, prefix_k, prefix_index, prefix_lens, softmax_scale, upcast)
    keys, values, probs, _ = _attention_probs(q, k, v, prefix_k, prefix_v, index, lens, key_start,
                                              causal, scale, dtype)
    grad_out = grad_out.to(dtype)
    grad_values = torch.einsum("bhqk,bqhd->bkhd", probs, grad_out)
    grad_probs = torch.einsum("bqhd,bkhd->bhqk", grad_out, values)
    grad_scores = probs * (grad_probs - (probs * grad_probs).sum(dim=-1, keepdim=True))
    grad_q = torch.einsum("bhqk,bkhd->bqhd", grad_scores, keys) * scale
    grad_keys = torch.einsum("bhqk,bqhd->bkhd", grad_scores, q.to(dtype)) * scale

    batch, _, kv_heads, head_dim = k.shape
    num_slots, prefix_len = prefix_k.shape[:2]
    uses = index.shape[1]

    def split(grad_cat: Tensor, pool: Tensor, own: Tensor) -> tuple[Tensor, Tensor]:
        grad_cat = grad_cat.reshape(batch, -1, kv_heads, q.shape[2] // kv_heads, head_dim).sum(dim=3)
        per_use = grad_cat[:, :uses * prefix_len].reshape(batch, uses, prefix_len, kv_heads, head_dim)
        return (grad_cat[:, uses * prefix_len:].to(own.dtype),
                sum_into_slots(per_use, index, num_slots).to(pool.dtype))

    grad_k, grad_prefix_k = split(grad_keys, prefix_k, k)
    grad_v, grad_prefix_v = split(grad_values, prefix_v, v)
    return grad_q.to(q.dtype), grad_k, grad_v, grad_prefix_k, grad_prefix_v
