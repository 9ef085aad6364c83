"""The `torch` backend of prefix attention: the plain-torch reference, always available.

Implements the backend contract of ``docs/backend_contract.md`` with the reference's forward and its
explicit backward (pool gradients through the deterministic `sum_into_slots`).
"""
from __future__ import annotations

from torch import Tensor

from fastmem.kernels.prefix_attention_ref import prefix_attention_ref, prefix_attention_ref_backward


def is_available() -> bool:
    return True


def forward(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor, index: Tensor,
            lens: Tensor, key_start: Tensor, causal: bool, softmax_scale: float) -> tuple[Tensor, Tensor]:
    """Returns out ``[B, Tq, Hq, D]`` and lse ``[B, Hq, Tq]`` (fp32, natural log)."""
    return prefix_attention_ref(q, k, v, prefix_k, prefix_v, index, lens, causal=causal,
                                softmax_scale=softmax_scale, key_start=key_start, return_lse=True)


def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
             index: Tensor, lens: Tensor, key_start: Tensor, out: Tensor, lse: Tensor, causal: bool,
             softmax_scale: float, slot_offsets: Tensor, slot_uses: Tensor) -> tuple[Tensor, ...]:
    """Returns dq, dk, dv, dprefix_k, dprefix_v, each shaped and typed like its input (the slot-use lists
    are unused: `sum_into_slots` sums in their order)."""
    return prefix_attention_ref_backward(grad_out, q, k, v, prefix_k, prefix_v, index, lens,
                                         causal=causal, softmax_scale=softmax_scale, key_start=key_start)
