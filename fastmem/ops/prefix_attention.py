"""`prefix_attention`: every batch row attends to its own slots of a shared pool, then its own keys.

Three layers, as in flash-attn's interface: raw ops registered with `torch.library` (with fake
implementations, so callers compile under `torch.compile(fullgraph=True)`), autograd wiring between
them, and the public function that validates shapes and documents every tensor. Planning is split from
running, as in FlashInfer: `plan_prefix_attention` checks and converts what every layer of a forward
shares (index, lens, key offsets, the backend, the backward's slot-use lists) once, into an
`AttentionPlan`; each layer's `prefix_attention(..., plan=plan)` then only checks shapes against it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fastmem.kernels.slots import slot_use_lists
from fastmem.ops import backends

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _check_index_values(index: Tensor, lens: Tensor, key_start: Tensor, num_slots: int,
                        prefix_len: int, k_len: int | None) -> int:
    """Data-dependent checks, one host sync, before any kernel runs; returns the largest key_start.

    k_len None: key_start is only checked to be >= 0 (a plan checks it against each call's Tk)."""
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
    if start_min < 0 or (k_len is not None and start_max > k_len):
        raise ValueError(f"key_start must lie in [0, Tk={k_len if k_len is not None else 'the own keys'}]; got "
                         f"values in [{start_min}, {start_max}]")
    return int(start_max)


@torch.library.custom_op("fastmem::prefix_attention_forward", mutates_args=())
def _forward_op(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor, index: Tensor,
                lens: Tensor, key_start: Tensor, slot_offsets: Tensor | None, slot_uses: Tensor | None,
                causal: bool, softmax_scale: float, backend: str, check_values: bool) -> tuple[Tensor, Tensor]:
    """The forward of a planned call (check_values False: a plan checked them) or a one-off call (True: the
    values are checked here, inside the op, so a one-off call still compiles under fullgraph)."""
    if check_values:
        _check_index_values(index, lens, key_start, prefix_k.shape[0], prefix_k.shape[1], k.shape[1])
    name = backends.resolve(backend, q.device, q.dtype, q.shape[-1])
    out, lse = backends.load(name).forward(q, k, v, prefix_k, prefix_v, index, lens, key_start, causal,
                                           softmax_scale)
    return out.contiguous(), lse.contiguous()


@_forward_op.register_fake
def _forward_fake(q, k, v, prefix_k, prefix_v, index, lens, key_start, slot_offsets, slot_uses, causal,
                  softmax_scale, backend, check_values):
    batch, q_len, q_heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, q_heads, q_len), dtype=torch.float32)


@torch.library.custom_op("fastmem::prefix_attention_backward", mutates_args=())
def _backward_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
                 index: Tensor, lens: Tensor, key_start: Tensor, slot_offsets: Tensor | None,
                 slot_uses: Tensor | None, out: Tensor, lse: Tensor, causal: bool, softmax_scale: float,
                 backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The backward; a one-off call (no plan) builds the slot-use lists here."""
    if slot_offsets is None or slot_uses is None:
        slot_offsets, slot_uses = slot_use_lists(index, prefix_k.shape[0])
    name = backends.resolve(backend, q.device, q.dtype, q.shape[-1])
    grads = backends.load(name).backward(grad_out.contiguous(), q, k, v, prefix_k, prefix_v, index, lens,
                                         key_start, out, lse, causal, softmax_scale, slot_offsets, slot_uses)
    return tuple(g.contiguous() for g in grads)


@_backward_op.register_fake
def _backward_fake(grad_out, q, k, v, prefix_k, prefix_v, index, lens, key_start, slot_offsets, slot_uses, out,
                   lse, causal, softmax_scale, backend):
    return tuple(t.new_empty(t.shape) for t in (q, k, v, prefix_k, prefix_v))


def _setup_context(ctx, inputs, output):
    q, k, v, prefix_k, prefix_v, index, lens, key_start, slot_offsets, slot_uses, causal, softmax_scale, \
        backend, _ = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, index, lens, key_start, slot_offsets, slot_uses, out, lse)
    ctx.causal, ctx.softmax_scale, ctx.backend = causal, softmax_scale, backend


def _backward(ctx, grad_out, grad_lse):
    q, k, v, prefix_k, prefix_v, index, lens, key_start, slot_offsets, slot_uses, out, lse = ctx.saved_tensors
    grads = _backward_op(grad_out, q, k, v, prefix_k, prefix_v, index, lens, key_start, slot_offsets, slot_uses,
                         out, lse, ctx.causal, ctx.softmax_scale, ctx.backend)
    return (*grads, *(None,) * 9)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _describe(**tensors: Tensor) -> str:
    return ", ".join(f"{name} {tuple(t.shape)}" for name, t in tensors.items())


def _check_tensors(named: dict) -> None:
    """TypeError unless every value of ``named`` is a tensor; ValueError when they sit on several devices."""
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    devices = {t.device for t in named.values()}
    if len(devices) > 1:
        raise ValueError("all tensors must be on one device; got "
                         + ", ".join(f"{n} on {t.device}" for n, t in named.items()))


def _validate_attention(q, k, v, prefix_k, prefix_v) -> None:
    """Shape, dtype and device checks of the float tensors (no data read: they trace under torch.compile)."""
    floats = dict(q=q, k=k, v=v, prefix_k=prefix_k, prefix_v=prefix_v)
    _check_tensors(floats)
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


def _validate_index(batch: int, num_slots: int, prefix_index, prefix_lens, key_start, **on_device: Tensor) -> None:
    """Type and shape checks of the integer tensors, on the device of ``on_device``'s tensor if one is given
    (no data read)."""
    named = dict(on_device, prefix_index=prefix_index)
    if prefix_lens is not None:
        named["prefix_lens"] = prefix_lens
    if key_start is not None:
        named["key_start"] = key_start
    _check_tensors(named)
    if prefix_index.dim() not in (1, 2):
        raise ValueError(f"prefix_index must have shape [{batch}] or [{batch}, M]; got "
                         f"{_describe(prefix_index=prefix_index)}")
    for name, t, shapes in (("prefix_index", prefix_index, ((batch,), (batch, prefix_index.shape[-1]))),
                            ("prefix_lens", prefix_lens, ((num_slots,),)),
                            ("key_start", key_start, ((batch,),))):
        if t is None:
            continue
        if t.dtype not in INDEX_DTYPES:
            raise ValueError(f"{name} must be an integer tensor; got {t.dtype}")
        if tuple(t.shape) not in shapes:
            expected = " or ".join(str(list(s)) for s in shapes)
            raise ValueError(f"{name} must have shape {expected}; got {_describe(**{name: t})} (B={batch}, "
                             f"S={num_slots})")


def _int32_arguments(batch: int, num_slots: int, prefix_len: int, prefix_index: Tensor, prefix_lens, key_start,
                     device) -> tuple[Tensor, Tensor, Tensor]:
    """Index ``[B, M]``, lens ``[S]`` and key_start ``[B]`` as contiguous int32 (defaults filled in)."""
    index = prefix_index.reshape(batch, -1).to(device=device, dtype=torch.int32).contiguous()
    lens = (torch.full((num_slots,), prefix_len, dtype=torch.int32, device=device)
            if prefix_lens is None else prefix_lens.to(device=device, dtype=torch.int32).contiguous())
    starts = (torch.zeros(batch, dtype=torch.int32, device=device)
              if key_start is None else key_start.to(device=device, dtype=torch.int32).contiguous())
    return index, lens, starts


@dataclass(frozen=True, eq=False)
class AttentionPlan:
    """What every layer's `prefix_attention` call of one forward (or decode step) shares, prepared once.

    Build it with `plan_prefix_attention`; pass it as ``plan=`` to each layer's call. Holds the checked
    int32 index ``[B, M]``, lens ``[S]`` and key_start ``[B]``, the backend resolved for (device, dtype,
    head_dim), and, when built for a backward, each slot's uses as CSR (`slot_use_lists`: offsets int32
    ``[S + 1]``, uses int32 ``[B * M]``). ``max_key_start``: the largest key_start, so the fewest own keys a
    call may hand. A call with tensors the plan was not built for (batch, pool size, device, dtype, head
    dim, too few keys) raises ValueError before any kernel runs.
    """
    index: Tensor
    lens: Tensor
    key_start: Tensor
    slot_offsets: Tensor | None
    slot_uses: Tensor | None
    backend: str
    prefix_len: int
    dtype: torch.dtype
    head_dim: int
    max_key_start: int

    @property
    def batch(self) -> int:
        return self.index.shape[0]

    @property
    def num_slots(self) -> int:
        return self.lens.shape[0]

    @property
    def device(self) -> torch.device:
        return self.index.device

    def check_fits(self, q: Tensor, k: Tensor, prefix_k: Tensor) -> None:
        """ValueError unless q ``[B, Tq, Hq, D]``, k ``[B, Tk, Hkv, D]`` and the pool ``[S, P, Hkv, D]`` are what
        the plan was built for (shapes, device and dtype only: no data read)."""
        built = (self.batch, self.num_slots, self.prefix_len, self.device, self.dtype, self.head_dim)
        given = (q.shape[0], prefix_k.shape[0], prefix_k.shape[1], q.device, q.dtype, q.shape[-1])
        if built != given or k.shape[1] < self.max_key_start:
            raise ValueError(
                f"this AttentionPlan was built for B={built[0]} rows, a pool of S={built[1]} slots of P={built[2]} "
                f"positions, {built[3]}, {built[4]}, head dim {built[5]} and at least {self.max_key_start} own "
                f"keys; the call has B={given[0]}, S={given[1]}, P={given[2]}, {given[3]}, {given[4]}, head dim "
                f"{given[5]} and {k.shape[1]} own keys: build a plan for these tensors")


def plan_prefix_attention(prefix_index: Tensor, prefix_lens: Tensor | None = None, *, num_slots: int,
                          prefix_len: int, dtype: torch.dtype, head_dim: int, key_start: Tensor | None = None,
                          backend: str = "auto", backward: bool | None = None) -> AttentionPlan:
    """Check and prepare the arguments that every layer's `prefix_attention` call of a forward shares.

    prefix_index: integer ``[B]`` or ``[B, M]`` slot ids (``-1`` = none), on the device the calls run on;
    prefix_lens: integer ``[S]`` or None (all P); key_start: integer ``[B]`` or None (no left padding).
    num_slots, prefix_len: the pool's S and P; dtype, head_dim: the calls' q dtype and D (they pick the
    backend: "auto", "torch", "triton" or "native"). backward: also build the slot-use lists the pool
    gradient needs (default: when autograd is on); without them a backward builds its own.
    One host sync: IndexError for a slot id outside ``[-1, S)``, ValueError for lens outside ``[0, P]``,
    key_start below 0, a bad shape or dtype, or a backend that cannot run these. Returns an `AttentionPlan`.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    _check_tensors(dict(prefix_index=prefix_index))
    if prefix_index.numel() == 0:
        raise ValueError(f"prefix_index needs at least one row and one entry; got {_describe(prefix_index=prefix_index)}")
    batch = prefix_index.shape[0]
    _validate_index(batch, num_slots, prefix_index, prefix_lens, key_start)
    if num_slots < 1 or prefix_len < 1:
        raise ValueError(f"the pool needs at least one slot of at least one position; got S={num_slots}, "
                         f"P={prefix_len} (use prefix_index -1 for rows without memory)")
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be float32, float16, bfloat16 or float64; got {dtype}")
    device = prefix_index.device
    index, lens, starts = _int32_arguments(batch, num_slots, prefix_len, prefix_index, prefix_lens, key_start,
                                           device)
    max_key_start = _check_index_values(index, lens, starts, num_slots, prefix_len, None)
    name = backends.resolve(backend, device, dtype, head_dim)
    offsets = uses = None
    if torch.is_grad_enabled() if backward is None else backward:
        offsets, uses = slot_use_lists(index, num_slots)
    return AttentionPlan(index, lens, starts, offsets, uses, name, prefix_len, dtype, head_dim, max_key_start)


def prefix_attention(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
                     prefix_index: Tensor | None = None, prefix_lens: Tensor | None = None, *,
                     causal: bool = True, softmax_scale: float | None = None, key_start: Tensor | None = None,
                     backend: str = "auto", plan: AttentionPlan | None = None) -> Tensor:
    """Attention in which each row first attends to its own slots of a shared pool.

    q: ``[B, Tq, Hq, D]``; k, v: ``[B, Tk, Hkv, D]`` with ``Hq % Hkv == 0`` and ``Tk >= Tq``.
    prefix_k, prefix_v: the pool ``[S, P, Hkv, D]``.
    prefix_index: integer ``[B]`` or ``[B, M]``; row b attends to slots ``prefix_index[b]`` in order,
    ``-1`` meaning none. prefix_lens: integer ``[S]``, slot s contributes its first ``prefix_lens[s]``
    positions (all P when None).
    key_start: integer ``[B]`` or None; own keys ``j < key_start[b]`` are invisible (left padding).
    plan: an `AttentionPlan` from `plan_prefix_attention`, instead of prefix_index, prefix_lens, key_start and
    backend: what every layer of a forward shares, checked and converted once. Without one, this call
    checks and converts them itself (one host sync per call).

    Query i of row b sees every valid position of its slots, then its own keys j with
    ``j <= i + Tk - Tq`` when ``causal`` (bottom-right alignment), or all of them when not.
    A query that sees no key at all gets a zero output.
    softmax_scale defaults to ``D ** -0.5``. backend: "auto", "torch", "triton" or "native".
    Raises (before any kernel runs) TypeError / ValueError for bad shapes, dtypes or devices, or a plan
    built for other tensors, and IndexError / ValueError for out-of-range slot ids, lens or key_start.
    Returns ``[B, Tq, Hq, D]`` in q's dtype. Differentiable in q, k, v, prefix_k and prefix_v; a slot
    used several times receives the sum of its gradients, deterministically.
    """
    _validate_attention(q, k, v, prefix_k, prefix_v)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if plan is not None:
        if prefix_index is not None or prefix_lens is not None or key_start is not None:
            raise ValueError("pass either plan= or prefix_index / prefix_lens / key_start, not both: the plan "
                             "holds them")
        plan.check_fits(q, k, prefix_k)
        if q.numel() == 0:
            return q.new_zeros(q.shape)
        out, _ = _forward_op(q, k, v, prefix_k, prefix_v, plan.index, plan.lens, plan.key_start, plan.slot_offsets,
                             plan.slot_uses, bool(causal), scale, plan.backend, False)
        return out
    if prefix_index is None:
        raise TypeError("prefix_attention needs prefix_index (or a plan=)")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    num_slots, prefix_len = prefix_k.shape[:2]
    _validate_index(q.shape[0], num_slots, prefix_index, prefix_lens, key_start, q=q)
    index, lens, starts = _int32_arguments(q.shape[0], num_slots, prefix_len, prefix_index, prefix_lens, key_start,
                                           q.device)
    if q.numel() == 0:
        return q.new_zeros(q.shape)
    out, _ = _forward_op(q, k, v, prefix_k, prefix_v, index, lens, starts, None, None, bool(causal), scale, backend,
                         True)
    return out
