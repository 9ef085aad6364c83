"""What users run today without fastmem: the baselines every figure of bench/throughput.py is compared to.

Every function takes fastmem's layout (queries ``[B, Tq, Hq, D]``, keys and values ``[B, T, Hkv, D]``)
and returns ``[B, Tq, Hq, D]``, so its output compares directly with `fastmem.prefix_attention`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastmem.kernels.prefix_attention_ref import attention_mask, normalize_index

try:
    from flash_attn import flash_attn_func
except Exception:  # not installed (CPU machines), or a build that does not import
    flash_attn_func = None


def sdpa(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None = None,
         softmax_scale: float | None = None) -> Tensor:
    """SDPA on fastmem's layout, with grouped KV heads handled the fastest plain-torch way: SDPA's own
    ``enable_gqa`` where it keeps a fused kernel (CPU; CUDA without a mask), else KV heads repeated with
    `repeat_interleave` (what transformers does on CUDA with a mask, where masked GQA falls back to the
    math kernel). On CPU here ``enable_gqa`` beat `repeat_interleave` by ~20% (masked prefill, fwd and
    fwd+bwd) and ~4x (unmasked decode). mask: boolean ``[B, Tq, Tk]`` (True = visible) or None."""
    heads_first = q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
    attn_mask = None if mask is None else mask[:, None]
    if mask is None or not q.is_cuda:
        out = F.scaled_dot_product_attention(*heads_first, attn_mask=attn_mask, scale=softmax_scale,
                                             enable_gqa=True)
    else:
        query, key, value = heads_first
        group = q.shape[2] // keys.shape[2]
        out = F.scaled_dot_product_attention(query, key.repeat_interleave(group, dim=1),
                                             value.repeat_interleave(group, dim=1), attn_mask=attn_mask,
                                             scale=softmax_scale)
    return out.transpose(1, 2)


def gather_prefix(pool: Tensor, index: Tensor) -> Tensor:
    """Each row's slots copied out of the pool and laid end to end: pool ``[S, P, Hkv, D]``, index
    ``[B, M]`` -> ``[B, M * P, Hkv, D]`` (``-1`` entries read slot 0; mask them). Differentiable in the pool."""
    batch, uses = index.shape
    return pool[index.clamp(min=0)].reshape(batch, uses * pool.shape[1], *pool.shape[2:])


def peft_prefix_attention(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
                          prefix_index: Tensor, prefix_lens: Tensor | None = None, *, causal: bool = True,
                          softmax_scale: float | None = None) -> Tensor:
    """Prefix attention the PEFT way: gather each row's prefix from the pool (``prefix_k[index]``),
    concatenate it onto K/V, build the boolean mask (valid prefix positions, causal own keys) and call
    SDPA with it (grouped KV heads as in `sdpa`).

    Same arguments and result as `fastmem.prefix_attention`; gradients reach the pool through the gather.
    One difference: a query that sees no key at all gets NaN (SDPA's convention) instead of zeros.
    """
    index = normalize_index(prefix_index).long()
    num_slots, prefix_len = prefix_k.shape[:2]
    lens = torch.full((num_slots,), prefix_len, device=q.device) if prefix_lens is None else prefix_lens
    mask = attention_mask(index, lens, prefix_len, q.shape[1], k.shape[1], causal)
    keys = torch.cat([gather_prefix(prefix_k, index), k], dim=1)
    values = torch.cat([gather_prefix(prefix_v, index), v], dim=1)
    return sdpa(q, keys, values, mask, softmax_scale)


def flash_attn_prefix_attention(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
                                prefix_index: Tensor) -> Tensor:
    """Causal prefix attention with flash-attn on the gathered and concatenated K/V (CUDA, fp16/bf16).

    flash-attn takes no mask, so every listed slot counts in full (no ``prefix_lens``); its causal mask
    aligns bottom-right, which leaves the prefix visible to every query. Needs ``flash_attn`` importable.
    """
    if flash_attn_func is None:
        raise RuntimeError("flash-attn is not importable here")
    index = normalize_index(prefix_index).long()
    keys = torch.cat([gather_prefix(prefix_k, index), k], dim=1)
    values = torch.cat([gather_prefix(prefix_v, index), v], dim=1)
    return flash_attn_func(q, keys, values, causal=True)


def concat_cache_decode(q: Tensor, memory_k: Tensor, memory_v: Tensor, prompt_k: Tensor, prompt_v: Tensor,
                        cache_k: Tensor, cache_v: Tensor) -> Tensor:
    """One decode step the usual way: concatenate each row's memory, the shared prompt cache and the row's
    own cache (every step), SDPA without a mask (one query sees every key; grouped KV heads as in `sdpa`).

    q ``[B, 1, Hq, D]``; memory ``[B, Lm, Hkv, D]``; prompt ``[Lp, Hkv, D]`` (shared by all rows);
    cache ``[B, Lc, Hkv, D]``.
    """
    batch = q.shape[0]

    def concat(memory: Tensor, prompt: Tensor, cache: Tensor) -> Tensor:
        return torch.cat([memory, prompt.expand(batch, *prompt.shape), cache], dim=1)

    return sdpa(q, concat(memory_k, prompt_k, cache_k), concat(memory_v, prompt_v, cache_v))
