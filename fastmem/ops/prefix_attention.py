"""`prefix_attention`: every batch row attends to its own slots of a shared pool, then its own keys.

Three layers, as in flash-attn's interface: raw ops registered with `torch.library` (with fake
implementations, so callers compile under `torch.compile(fullgraph=True)`), autograd wiring between
them, and the public function that validates shapes and documents every tensor.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastmem.ops import backends

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _check_index_values(index: Tensor, lens: Tensor, key_start: Tensor, num_slots: int,
                        prefix_len: int, k_len: int) -> None:
    """Data-dependent checks, one host sync, before any kernel runs."""
    bounds = torch.stack([index.min(), index.max(), lens.min(), lens.max(),
                          key_start.min(), key_start.max()]).tolist()
    index_min, index_max, lens_min, lens_max, start_min, start_max = bounds
    if index_min < -1 or index_max >= num_slots:
        bad = index_min if index_min < -1 else index_max
        raise IndexError(f"prefix_index holds slot {bad}, outside [-1, {num_slots}) for a pool of "
                         f"{num_slots} slots")
    if lens_min < 0 or lens_max > prefix_len:
        raise ValueError(f"prefix_lens must lie in [0, P={prefix_len}]; got values in "
                         f"[{lens_min}, {lens_max}]")
    if start_min < 0 or start_max > k_len:
        raise ValueError(f"key_start must lie in [0, Tk={k_len}]; got values in [{start_min}, {start_max}]")


@torch.library.custom_op("fastmem::prefix_attention_forward", mutates_args=())
def _forward_op(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor, index: Tensor,
                lens: Tensor, key_start: Tensor, causal: bool, softmax_scale: float,
                backend: str, check_index: bool) -> tuple[Tensor, Tensor]:
    if check_index:
        _check_index_values(index, lens, key_start, prefix_k.shape[0], prefix_k.shape[1], k.shape[1])
    name = backends.resolve(backend, q.device, q.dtype, q.shape[-1])
    out, lse = backends.load(name).forward(q, k, v, prefix_k, prefix_v, index, lens, key_start, causal,
                                           softmax_scale)
    return out.contiguous(), lse.contiguous()


@_forward_op.register_fake
def _forward_fake(q, k, v, prefix_k, prefix_v, index, lens, key_start, causal, softmax_scale, backend,
                  check_index):
    batch, q_len, q_heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, q_heads, q_len), dtype=torch.float32)


@torch.library.custom_op("fastmem::prefix_attention_backward", mutates_args=())
def _backward_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
                 index: Tensor, lens: Tensor, key_start: Tensor, out: Tensor, lse: Tensor, causal: bool,
                 softmax_scale: float, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    name = backends.resolve(backend, q.device, q.dtype, q.shape[-1])
    grads = backends.load(name).backward(grad_out.contiguous(), q, k, v, prefix_k, prefix_v, index, lens,
                                         key_start, out, lse, causal, softmax_scale)
    return tuple(g.contiguous() for g in grads)


@_backward_op.register_fake
def _backward_fake(grad_out, q, k, v, prefix_k, prefix_v, index, lens, key_start, out, lse, causal,
                   softmax_scale, backend):
    return tuple(t.new_empty(t.shape) for t in (q, k, v, prefix_k, prefix_v))


def _setup_context(ctx, inputs, output):
    q, k, v, prefix_k, prefix_v, index, lens, key_start, causal, softmax_scale, backend, _ = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, index, lens, key_start, out, lse)
    ctx.causal, ctx.softmax_scale, ctx.backend = causal, softmax_scale, backend


def _backward(ctx, grad_out, grad_lse):
    q, k, v, prefix_k, prefix_v, index, lens, key_start, out, lse = ctx.saved_tensors
    grads = _backward_op(grad_out, q, k, v, prefix_k, prefix_v, index, lens, key_start, out, lse,
                         ctx.causal, ctx.softmax_scale, ctx.backend)
    return (*grads, None, None, None, None, None, None, None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _describe(**tensors: Tensor) -> str:
    return ", ".join(f"{name} {tuple(t.shape)}" for name, t in tensors.items())


def _validate(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, key_start) -> None:
    """Shape, dtype and device checks that need no data (so they trace under torch.compile)."""
    named = dict(q=q, k=k, v=v, prefix_k=prefix_k, prefix_v=prefix_v, prefix_index=prefix_index)
    if prefix_lens is not None:
        named["prefix_lens"] = prefix_lens
    if key_start is not None:
        named["key_start"] = key_start
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    devices = {t.device for t in named.values()}
    if len(devices) > 1:
        raise ValueError("all tensors must be on one device; got "
                         + ", ".join(f"{n} on {t.device}" for n, t in named.items()))
    floats = dict(q=q, k=k, v=v, prefix_k=prefix_k, prefix_v=prefix_v)
    if q.dtype not in FLOAT_DTYPES or len({t.dtype for t in floats.values()}) > 1:
        raise ValueError("q, k, v, prefix_k, prefix_v must share one float dtype (float32, float16, "
                         "bfloat16 or float64); got "
                         + ", ".join(f"{n} {t.dtype}" for n, t in floats.items()))
    for name, t in floats.items():
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D; got {name} {tuple(t.shape)}")
    batch, q_len, q_heads, head_dim = q.shape
    _, k_len, kv_heads, _ = k.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"k and v must be [B, Tk, Hkv, D] with q's B and D; got {_describe(q=q, k=k, v=v)}")
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(f"q heads must be a multiple of kv heads; got {_describe(q=q, k=k)}")
    if prefix_k.shape != prefix_v.shape or prefix_k.shape[2:] != k.shape[2:]:
        raise ValueError("prefix_k and prefix_v must be [S, P, Hkv, D] with k's Hkv and D; got "
                         + _describe(k=k, prefix_k=prefix_k, prefix_v=prefix_v))
    if k_len < q_len:
        raise ValueError(f"k must have at least as many positions as q (Tk >= Tq); got {_describe(q=q, k=k)}")
    if prefix_k.shape[0] == 0 or prefix_k.shape[1] == 0:
        raise ValueError(f"the pool needs at least one slot of at least one position; got "
                         f"{_describe(prefix_k=prefix_k)} (use prefix_index -1 for rows without memory)")
    for name, t, shapes in (("prefix_index", prefix_index, ((batch,), (batch, prefix_index.shape[-1]))),
                            ("prefix_lens", prefix_lens, ((prefix_k.shape[0],),)),
                            ("key_start", key_start, ((batch,),))):
        if t is None:
            continue
        if t.dtype not in INDEX_DTYPES:
            raise ValueError(f"{name} must be an integer tensor; got {t.dtype}")
        if tuple(t.shape) not in shapes:
            expected = " or ".join(str(list(s)) for s in shapes)
            raise ValueError(f"{name} must have shape {expected}; got {_describe(**{name: t}, q=q, prefix_k=prefix_k)}")


def prefix_attention(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
                     prefix_index: Tensor, prefix_lens: Tensor | None = None, *, causal: bool = True,
                     softmax_scale: float | None = None, key_start: Tensor | None = None,
                     backend: str = "auto", check_index: bool = True) -> Tensor:
    """Attention in which each row first attends to its own slots of a shared pool.

    q: ``[B, Tq, Hq, D]``; k, v: ``[B, Tk, Hkv, D]`` with ``Hq % Hkv == 0`` and ``Tk >= Tq``.
    prefix_k, prefix_v: the pool ``[S, P, Hkv, D]``.
    prefix_index: integer ``[B]`` or ``[B, M]``; row b attends to slots ``prefix_index[b]`` in order,
    ``-1`` meaning none. prefix_lens: integer ``[S]``, slot s contributes its first ``prefix_lens[s]``
    positions (all P when None).
    key_start: integer ``[B]`` or None; own keys ``j < key_start[b]`` are invisible (left padding).

    Query i of row b sees every valid position of its slots, then its own keys j with
    ``j <= i + Tk - Tq`` when ``causal`` (bottom-right alignment), or all of them when not.
    A query that sees no key at all gets a zero output.
    softmax_scale defaults to ``D ** -0.5``. backend: "auto", "torch", "triton" or "native".
    check_index: verify that prefix_index, prefix_lens and key_start hold in-range values before any kernel
    runs (one host sync). Pass False only for values already verified by the caller (as `fastmem.inject`
    does once per model forward instead of once per layer); out-of-range values are then undefined behaviour.
    Returns ``[B, Tq, Hq, D]`` in q's dtype. Differentiable in q, k, v, prefix_k and prefix_v; a slot
    used several times receives the sum of its gradients, deterministically.
    """
    _validate(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, key_start)
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    num_slots, prefix_len = prefix_k.shape[:2]
    index = prefix_index.reshape(q.shape[0], -1).to(torch.int32).contiguous()
    lens = (torch.full((num_slots,), prefix_len, dtype=torch.int32, device=q.device)
            if prefix_lens is None else prefix_lens.to(torch.int32).contiguous())
    starts = (torch.zeros(q.shape[0], dtype=torch.int32, device=q.device)
              if key_start is None else key_start.to(torch.int32).contiguous())
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if q.numel() == 0:
        return q.new_zeros(q.shape)
    out, _ = _forward_op(q, k, v, prefix_k, prefix_v, index, lens, starts, bool(causal), scale, backend,
                         bool(check_index))
    return out
