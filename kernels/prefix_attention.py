"""Triton backend of ``prefix_attention`` (FlashAttention-2 structure), forward and backward.

Row ``b`` attends to the first ``lens[s]`` positions of every slot ``s = index[b, m] >= 0`` of the pool, in
order, then to its own keys (causal with bottom-right alignment, and ``j >= key_start[b]``). The kernels walk
the slots in place (gather by slot id); the concatenation is never materialized. Semantics, shapes and the
host interface follow ``docs/backend_contract.md``; the spec is ``prefix_attention_ref.prefix_attention_ref``.

Kernels: ``_prefix_attn_fwd`` (fixed query block), ``_attn_bwd_preprocess`` (delta = rowsum(dO * O)),
``_prefix_attn_bwd_dq`` (fixed query block), ``_prefix_attn_bwd_dkdv`` (fixed key block; run once for the
own keys and once for every prefix use ``(b, m)``, writing fp32 per-use partials) and ``_sum_slot_partials``
(each slot sums its uses' partials in ascending ``(b, m)`` order: the bits of ``sum_into_slots``, with no
host sync). No atomics: every output element is written by one program, so results are bitwise
deterministic. Accumulation is fp32; every ``tl.dot`` uses ``input_precision="ieee"`` so fp32 inputs get exact
fp32 products (no TF32), while fp16 / bf16 inputs still run on tensor cores.

Layout: the launchers pass the batch / sequence / head strides of every tensor, so inputs may be
non-contiguous; a tensor whose last dim is not unit-stride is copied (``.contiguous()``) first. Outputs are
contiguous.

Grid limits: CUDA allows ``MAX_GRID`` programs per grid axis (2^31 - 1 along axis 0, 65535 along axes 1 and 2), and
axis 1 carries ``B * Hq`` (``B * Hkv`` for dk/dv; 256 prompts x 8 samples x 32 heads = 65536 already exceeds it).
Every launch goes through `_launch`, which cuts a grid exceeding a limit into launches that fit and passes each
launch's program-id offsets (``base0, base1, base2``) to the kernel, which adds them to ``tl.program_id`` through
`_program_id`. Programs are independent, so a split launch writes the bits of an unsplit one. Offsets into tensors
are int64 wherever a product of sizes can pass 2^31 (batch / head / row bases, slot rows, use rows); in-tile
offsets (row < BLOCK times a sequence stride) stay int32.
"""
from __future__ import annotations

import itertools
import os

import torch
import triton
import triton.language as tl

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)

# Programs per launch along grid axes 0, 1, 2 (CUDA's limits). `_launch` reads it at every call: tests lower it to
# split small launches under the interpreter.
MAX_GRID = (2**31 - 1, 65535, 65535)


# Why `is_available()` is False, when it is (read by fastmem.ops.backends).
UNAVAILABLE_REASON = "no CUDA device, and the Triton interpreter is off (set TRITON_INTERPRET=1 to run on CPU)"


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter: ``TRITON_INTERPRET`` as Triton itself reads it (its
    runtime knob, read at every call), so fastmem and Triton never disagree about a value like ``on``."""
    knobs = getattr(triton, "knobs", None)   # Triton >= 3.4
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def is_available() -> bool:
    """True when the kernels can run: a CUDA device, or the Triton interpreter (`interpreting`)."""
    return interpreting() or torch.cuda.is_available()


def _grid_chunks(grid: tuple) -> list:
    """The launches covering ``grid`` with at most ``MAX_GRID[a]`` programs along each axis ``a``: a list of
    (offsets, chunk grid), each program of ``grid`` in exactly one chunk; empty when an axis is 0."""
    per_axis = [[(start, min(limit, size - start)) for start in range(0, size, limit)]
                for size, limit in zip(grid, MAX_GRID)]
    return [tuple(zip(*parts)) for parts in itertools.product(*per_axis)]


def _launch(kernel, grid: tuple, *args, **meta) -> None:
    """``kernel[grid](*args, **meta)``, split by `_grid_chunks`; the kernel takes one runtime argument
    ``base<a>`` per grid axis ``a`` (that launch's program-id offset, read through `_program_id`)."""
    for offsets, chunk in _grid_chunks(grid):
        kernel[chunk](*args, **meta, **{f"base{axis}": offset for axis, offset in enumerate(offsets)})


@triton.jit
def _program_id(axis: tl.constexpr, base):
    """This program's index along grid ``axis`` in the whole (unsplit) grid: ``base`` is the offset `_launch`
    gave this launch along that axis."""
    return base + tl.program_id(axis)


@triton.jit
def _load(Ptrs, mask, UPCAST: tl.constexpr):
    """Masked tile load (0 outside); fp32 when UPCAST (bf16 in the interpreter, whose bf16 tl.dot is wrong)."""
    x = tl.load(Ptrs, mask=mask, other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, lo, hi, key_lo, key_hi, offs_m,
                    causal_shift, qk_scale,
                    CAUSAL: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Online-softmax update over keys ``[lo, hi)`` of one key sequence.

    acc ``[BLOCK_M, BLOCK_D]`` fp32; l_i, m_i ``[BLOCK_M]`` (m_i in the log2 domain); q ``[BLOCK_M, BLOCK_D]``.
    K, V point at key ``lo`` of the sequence (one head). Key ``j`` is visible iff ``key_lo <= j < key_hi``
    and, if CAUSAL, ``j <= offs_m + causal_shift``. Without MASKED the caller guarantees that every key of
    ``[lo, hi)`` is visible to every row (whole blocks inside the visible range): no masks are built.
    """
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k_offs = offs_n[:, None] * stride_kt + offs_d[None, :]
    v_offs = offs_n[:, None] * stride_vt + offs_d[None, :]
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if MASKED:
            kv_mask = (cols[:, None] < key_hi) & (offs_d[None, :] < HEAD_DIM)
        else:
            kv_mask = offs_d[None, :] < HEAD_DIM
        k = _load(K + k_offs, kv_mask, UPCAST)
        qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        if MASKED:
            visible = ((cols >= key_lo) & (cols < key_hi))[None, :]
            if CAUSAL:
                visible = visible & (cols[None, :] <= offs_m[:, None] + causal_shift)
            qk = tl.where(visible, qk * qk_scale, float("-inf"))
            m_ij = tl.maximum(m_i, tl.max(qk, 1))
            m_safe = tl.where(m_ij == float("-inf"), 0.0, m_ij)  # rows with nothing visible yet: no NaN
        else:
            qk = qk * qk_scale
            m_ij = tl.maximum(m_i, tl.max(qk, 1))
            m_safe = m_ij
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load(V + v_offs, kv_mask, UPCAST)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
        m_i = m_ij
        K += BLOCK_N * stride_kt
        V += BLOCK_N * stride_vt
    return acc, l_i, m_i


@triton.jit
def _own_key_runs(key_lo, start_m, Tq, Tk, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Own keys of a query block in three runs of key blocks ``[lo, first_end)``, ``[first_end, whole_end)``,
    ``[whole_end, hi)``: the block holding key_start (masked), whole blocks every row of the query block sees
    (no mask needed), then the causal diagonal and tail (masked). Returns lo, first_end, whole_end, hi."""
    lo = key_lo // BLOCK_N * BLOCK_N
    if CAUSAL:
        hi = tl.minimum(Tk, start_m + BLOCK_M + Tk - Tq)
        seen_by_all = tl.minimum(Tk, start_m + Tk - Tq + 1)
    else:
        hi = Tk
        seen_by_all = Tk
    first_end = tl.minimum((key_lo + BLOCK_N - 1) // BLOCK_N * BLOCK_N, hi)
    whole_end = tl.maximum(tl.minimum(seen_by_all // BLOCK_N * BLOCK_N, hi), first_end)
    return lo, first_end, whole_end, hi


@triton.jit
def _run_bounds(run: tl.constexpr, lo, first_end, whole_end, hi):
    """``[start, end)`` of run 0 (masked), 1 (unmasked) or 2 (masked) of three consecutive block runs."""
    if run == 0:
        start = lo
        end = first_end
    elif run == 1:
        start = first_end
        end = whole_end
    else:
        start = whole_end
        end = hi
    return start, end


@triton.jit
def _prefix_attn_fwd(Q, K, V, PK, PV, Index, Lens, KeyStart, Out, LSE,
                     stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                     stride_vb, stride_vt, stride_vh, stride_pks, stride_pkt, stride_pkh,
                     stride_pvs, stride_pvt, stride_pvh, stride_ob, stride_ot, stride_oh,
                     sm_scale, Tq, Tk, M, HQ, GROUP, base0, base1,
                     CAUSAL: tl.constexpr, UPCAST: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Out ``[B, Tq, HQ, D]`` and LSE ``[B, HQ, Tq]`` (fp32, natural log) for one query block of one (b, h).

    Grid ``(cdiv(Tq, BLOCK_M), B * HQ)`` through `_launch` (base0, base1: program-id offsets).
    Q ``[B, Tq, HQ, D]``, K/V ``[B, Tk, HKV, D]``, PK/PV (the pool) ``[S, P, HKV, D]``, Index ``[B, M]``,
    Lens ``[S]``, KeyStart ``[B]`` (int32, contiguous).
    """
    start_m = _program_id(0, base0) * BLOCK_M
    off_bh = _program_id(1, base1)
    b = off_bh // HQ
    h = off_bh % HQ
    b64 = tl.cast(b, tl.int64)
    h64 = tl.cast(h, tl.int64)
    m64 = tl.cast(start_m, tl.int64)
    hk64 = tl.cast(h // GROUP, tl.int64)
    qk_scale = sm_scale * _LOG2E
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    local = tl.arange(0, BLOCK_M)[:, None]  # in-tile row, so int32 offsets never overflow
    q_mask = (offs_m[:, None] < Tq) & (offs_d[None, :] < HEAD_DIM)
    q = _load(Q + b64 * stride_qb + h64 * stride_qh + m64 * stride_qt + local * stride_qt + offs_d[None, :],
              q_mask, UPCAST)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for m in range(M):
        slot = tl.load(Index + b64 * M + m)
        row = tl.maximum(slot, 0)
        n_len = tl.where(slot >= 0, tl.load(Lens + row), 0)
        pool_k = PK + tl.cast(row, tl.int64) * stride_pks + hk64 * stride_pkh
        pool_v = PV + tl.cast(row, tl.int64) * stride_pvs + hk64 * stride_pvh
        whole = n_len // BLOCK_N * BLOCK_N  # whole blocks unmasked, then the partial one
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, pool_k, pool_v, stride_pkt, stride_pvt,
                                        0, whole, 0, n_len, offs_m, 0, qk_scale,
                                        False, False, UPCAST, HEAD_DIM, BLOCK_N, BLOCK_D)
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, pool_k + tl.cast(whole, tl.int64) * stride_pkt,
                                        pool_v + tl.cast(whole, tl.int64) * stride_pvt, stride_pkt, stride_pvt,
                                        whole, n_len, 0, n_len, offs_m, 0, qk_scale,
                                        False, True, UPCAST, HEAD_DIM, BLOCK_N, BLOCK_D)
    key_lo = tl.load(KeyStart + b)
    lo, first_end, whole_end, hi = _own_key_runs(key_lo, start_m, Tq, Tk, CAUSAL, BLOCK_M, BLOCK_N)
    own_k = K + b64 * stride_kb + hk64 * stride_kh
    own_v = V + b64 * stride_vb + hk64 * stride_vh
    for run in tl.static_range(3):
        start, end = _run_bounds(run, lo, first_end, whole_end, hi)
        start64 = tl.cast(start, tl.int64)
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, own_k + start64 * stride_kt, own_v + start64 * stride_vt,
                                        stride_kt, stride_vt, start, end, key_lo, Tk, offs_m, Tk - Tq,
                                        qk_scale, CAUSAL, run != 1, UPCAST, HEAD_DIM, BLOCK_N, BLOCK_D)

    seen = l_i > 0.0  # a query that sees no key: out 0, lse -inf
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * _LN2, float("-inf"))
    tl.store(Out + b64 * stride_ob + h64 * stride_oh + m64 * stride_ot + local * stride_ot + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=q_mask)
    tl.store(LSE + tl.cast(off_bh, tl.int64) * Tq + offs_m, lse, mask=offs_m < Tq)


@triton.jit
def _attn_bwd_preprocess(O, DO, Delta, stride_ob, stride_ot, stride_oh, stride_dob, stride_dot, stride_doh,
                         Tq, HQ, base0, base1, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    """Delta ``[B, HQ, Tq]`` fp32 = rowsum(dO * O) for one query block of one (b, h).

    Grid ``(cdiv(Tq, BLOCK_M), B * HQ)`` through `_launch`; O, DO ``[B, Tq, HQ, D]``.
    """
    start_m = _program_id(0, base0) * BLOCK_M
    off_bh = _program_id(1, base1)
    b64 = tl.cast(off_bh // HQ, tl.int64)
    h64 = tl.cast(off_bh % HQ, tl.int64)
    m64 = tl.cast(start_m, tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    local = tl.arange(0, BLOCK_M)[:, None]
    mask = (offs_m[:, None] < Tq) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + b64 * stride_ob + h64 * stride_oh + m64 * stride_ot + local * stride_ot + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b64 * stride_dob + h64 * stride_doh + m64 * stride_dot + local * stride_dot + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + tl.cast(off_bh, tl.int64) * Tq + offs_m, tl.sum(o * do, 1), mask=offs_m < Tq)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse2, delta, K, V, stride_kt, stride_vt, lo, hi, key_lo, key_hi, offs_m,
                       causal_shift, qk_scale,
                       CAUSAL: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr, HEAD_DIM: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Add to dq ``[BLOCK_M, BLOCK_D]`` (fp32, unscaled) the keys ``[lo, hi)`` of one key sequence.

    q, do ``[BLOCK_M, BLOCK_D]``; lse2 (log2 domain), delta ``[BLOCK_M]``; K, V point at key ``lo``.
    Visibility and MASKED as in `_attn_fwd_inner`.
    """
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k_offs = offs_n[:, None] * stride_kt + offs_d[None, :]
    v_offs = offs_n[:, None] * stride_vt + offs_d[None, :]
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if MASKED:
            kv_mask = (cols[:, None] < key_hi) & (offs_d[None, :] < HEAD_DIM)
        else:
            kv_mask = offs_d[None, :] < HEAD_DIM
        k = _load(K + k_offs, kv_mask, UPCAST)
        v = _load(V + v_offs, kv_mask, UPCAST)
        qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        if MASKED:
            visible = ((cols >= key_lo) & (cols < key_hi))[None, :]
            if CAUSAL:
                visible = visible & (cols[None, :] <= offs_m[:, None] + causal_shift)
            p = tl.where(visible, tl.math.exp2(qk * qk_scale - lse2[:, None]), 0.0)
        else:
            p = tl.math.exp2(qk * qk_scale - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision="ieee")
        K += BLOCK_N * stride_kt
        V += BLOCK_N * stride_vt
    return dq


@triton.jit
def _prefix_attn_bwd_dq(Q, K, V, PK, PV, Index, Lens, KeyStart, DO, LSE, Delta, DQ,
                        stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                        stride_vb, stride_vt, stride_vh, stride_pks, stride_pkt, stride_pkh,
                        stride_pvs, stride_pvt, stride_pvh, stride_dob, stride_dot, stride_doh,
                        stride_dqb, stride_dqt, stride_dqh,
                        sm_scale, Tq, Tk, M, HQ, GROUP, base0, base1,
                        CAUSAL: tl.constexpr, UPCAST: tl.constexpr, HEAD_DIM: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """DQ ``[B, Tq, HQ, D]`` for one query block of one (b, h): slots in order, then the own keys.

    Grid ``(cdiv(Tq, BLOCK_M), B * HQ)`` through `_launch`; operands as in `_prefix_attn_fwd`, DO like Q,
    LSE/Delta ``[B, HQ, Tq]``.
    """
    start_m = _program_id(0, base0) * BLOCK_M
    off_bh = _program_id(1, base1)
    b = off_bh // HQ
    h = off_bh % HQ
    b64 = tl.cast(b, tl.int64)
    h64 = tl.cast(h, tl.int64)
    m64 = tl.cast(start_m, tl.int64)
    hk64 = tl.cast(h // GROUP, tl.int64)
    qk_scale = sm_scale * _LOG2E
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    local = tl.arange(0, BLOCK_M)[:, None]
    row_ok = offs_m < Tq
    mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = _load(Q + b64 * stride_qb + h64 * stride_qh + m64 * stride_qt + local * stride_qt + offs_d[None, :],
              mask, UPCAST)
    do = _load(DO + b64 * stride_dob + h64 * stride_doh + m64 * stride_dot + local * stride_dot + offs_d[None, :],
               mask, UPCAST)
    lse2 = tl.load(LSE + tl.cast(off_bh, tl.int64) * Tq + offs_m, mask=row_ok, other=0.0) * _LOG2E
    delta = tl.load(Delta + tl.cast(off_bh, tl.int64) * Tq + offs_m, mask=row_ok, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for m in range(M):
        slot = tl.load(Index + b64 * M + m)
        row = tl.maximum(slot, 0)
        n_len = tl.where(slot >= 0, tl.load(Lens + row), 0)
        pool_k = PK + tl.cast(row, tl.int64) * stride_pks + hk64 * stride_pkh
        pool_v = PV + tl.cast(row, tl.int64) * stride_pvs + hk64 * stride_pvh
        whole = n_len // BLOCK_N * BLOCK_N
        dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, pool_k, pool_v, stride_pkt, stride_pvt,
                                0, whole, 0, n_len, offs_m, 0, qk_scale,
                                False, False, UPCAST, HEAD_DIM, BLOCK_N, BLOCK_D)
        dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, pool_k + tl.cast(whole, tl.int64) * stride_pkt,
                                pool_v + tl.cast(whole, tl.int64) * stride_pvt, stride_pkt, stride_pvt,
                                whole, n_len, 0, n_len, offs_m, 0, qk_scale,
                                False, True, UPCAST, HEAD_DIM, BLOCK_N, BLOCK_D)
    key_lo = tl.load(KeyStart + b)
    lo, first_end, whole_end, hi = _own_key_runs(key_lo, start_m, Tq, Tk, CAUSAL, BLOCK_M, BLOCK_N)
    own_k = K + b64 * stride_kb + hk64 * stride_kh
    own_v = V + b64 * stride_vb + hk64 * stride_vh
    for run in tl.static_range(3):
        start, end = _run_bounds(run, lo, first_end, whole_end, hi)
        start64 = tl.cast(start, tl.int64)
        dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, own_k + start64 * stride_kt, own_v + start64 * stride_vt,
                                stride_kt, stride_vt, start, end, key_lo, Tk, offs_m, Tk - Tq, qk_scale,
                                CAUSAL, run != 1, UPCAST, HEAD_DIM, BLOCK_N, BLOCK_D)
    tl.store(DQ + b64 * stride_dqb + h64 * stride_dqh + m64 * stride_dqt + local * stride_dqt + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=mask)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, Q, DO, LSE, Delta, stride_qt, stride_dot, lo, hi, offs_n, key_lo, key_hi,
                         causal_shift, qk_scale, Tq,
                         CAUSAL: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr,
                         HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Add to dk, dv ``[BLOCK_N, BLOCK_D]`` (fp32, dk unscaled) the query rows ``[lo, hi)`` of one query head.

    k, v ``[BLOCK_N, BLOCK_D]`` hold keys offs_n; Q, DO point at row ``lo`` of the head, LSE, Delta at row 0.
    Key ``j`` is visible iff ``key_lo <= j < key_hi`` and, if CAUSAL, ``j <= row + causal_shift``. Without
    MASKED the caller guarantees whole query blocks below Tq that see every key of the block.
    """
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_offs = offs_m[:, None] * stride_qt + offs_d[None, :]
    do_offs = offs_m[:, None] * stride_dot + offs_d[None, :]
    key_ok = ((offs_n >= key_lo) & (offs_n < key_hi))[:, None]
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        if MASKED:
            row_ok = rows < Tq
            mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
            lse2 = tl.load(LSE + rows, mask=row_ok, other=float("inf")) * _LOG2E  # rows past Tq: p = 0
            delta = tl.load(Delta + rows, mask=row_ok, other=0.0)
        else:
            mask = offs_d[None, :] < HEAD_DIM
            lse2 = tl.load(LSE + rows) * _LOG2E
            delta = tl.load(Delta + rows)
        q = _load(Q + q_offs, mask, UPCAST)
        do = _load(DO + do_offs, mask, UPCAST)
        qk_t = tl.dot(k, tl.trans(q), input_precision="ieee")
        if MASKED:
            visible = key_ok
            if CAUSAL:
                visible = visible & (offs_n[:, None] <= rows[None, :] + causal_shift)
            p_t = tl.where(visible, tl.math.exp2(qk_t * qk_scale - lse2[None, :]), 0.0)
        else:
            p_t = tl.math.exp2(qk_t * qk_scale - lse2[None, :])
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision="ieee")
        dp_t = tl.dot(v, tl.trans(do), input_precision="ieee")
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision="ieee")
        Q += BLOCK_M * stride_qt
        DO += BLOCK_M * stride_dot
    return dk, dv


@triton.jit
def _prefix_attn_bwd_dkdv(Q, DO, LSE, Delta, K, V, Index, Lens, KeyStart, DK, DV,
                          stride_qb, stride_qt, stride_qh, stride_dob, stride_dot, stride_doh,
                          stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                          stride_dkb, stride_dkt, stride_dkh, stride_dvb, stride_dvt, stride_dvh,
                          sm_scale, Tq, Tk, N, M, HKV, GROUP, base0, base1, base2,
                          PREFIX: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
                          HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    """dK, dV of one key block of one (b, kv head), summed over the GROUP query heads and all query blocks.

    Own keys (not PREFIX): grid ``(cdiv(Tk, BLOCK_N), B * HKV, 1)``, K/V ``[B, Tk, HKV, D]``, N = Tk,
    writes DK/DV ``[B, Tk, HKV, D]``. PREFIX: grid ``(cdiv(P, BLOCK_N), B * HKV, M)``, K/V the pool
    ``[S, P, HKV, D]``, N = P; program ``(., ., m)`` handles use ``(b, m)`` and writes the fp32 partials
    DK/DV ``[B * M, P, HKV, D]`` (zeros for an unused entry and past ``lens[slot]``), no causal mask.
    Q, DO ``[B, Tq, HQ, D]``; LSE, Delta ``[B, HQ, Tq]`` fp32. Grids go through `_launch` (base0..2: offsets).
    """
    start_n = _program_id(0, base0) * BLOCK_N
    off_bh = _program_id(1, base1)
    b = off_bh // HKV
    hk = off_bh % HKV
    if PREFIX:
        use = tl.cast(b, tl.int64) * M + _program_id(2, base2)
        slot = tl.load(Index + use)
        kv_row = tl.maximum(slot, 0)
        key_lo = 0
        key_hi = tl.where(slot >= 0, tl.load(Lens + kv_row), 0)
        out_row = use
    else:
        kv_row = b
        key_lo = tl.load(KeyStart + b)
        key_hi = Tk
        out_row = b
    b64 = tl.cast(b, tl.int64)
    hk64 = tl.cast(hk, tl.int64)
    n64 = tl.cast(start_n, tl.int64)
    qk_scale = sm_scale * _LOG2E
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    local = tl.arange(0, BLOCK_N)[:, None]
    kv_row64 = tl.cast(kv_row, tl.int64)
    kv_mask = (offs_n[:, None] < key_hi) & (offs_d[None, :] < HEAD_DIM)
    k = _load(K + kv_row64 * stride_kb + hk64 * stride_kh + n64 * stride_kt + local * stride_kt + offs_d[None, :],
              kv_mask, UPCAST)
    v = _load(V + kv_row64 * stride_vb + hk64 * stride_vh + n64 * stride_vt + local * stride_vt + offs_d[None, :],
              kv_mask, UPCAST)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    causal_shift = Tk - Tq
    if CAUSAL:
        lo = tl.maximum(start_n - causal_shift, 0) // BLOCK_M * BLOCK_M  # earlier rows see none of these keys
    else:
        lo = 0
    hi = tl.where((start_n < key_hi) & (start_n + BLOCK_N > key_lo), Tq, lo)  # no visible key: no work
    # Query blocks in three runs: masked, whole blocks below Tq that see every key of this block (when the
    # key block lies inside [key_lo, key_hi)), masked tail.
    if CAUSAL:
        seen_from = (tl.maximum(start_n + BLOCK_N - 1 - causal_shift, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    else:
        seen_from = lo
    inside = (start_n >= key_lo) & (start_n + BLOCK_N <= key_hi)
    first_end = tl.where(inside, tl.minimum(tl.maximum(seen_from, lo), hi), hi)
    whole_end = tl.maximum(tl.minimum(Tq // BLOCK_M * BLOCK_M, hi), first_end)
    for h in range(hk * GROUP, hk * GROUP + GROUP):
        h64 = tl.cast(h, tl.int64)
        bh64 = b64 * (HKV * GROUP) + h64
        for run in tl.static_range(3):
            start, end = _run_bounds(run, lo, first_end, whole_end, hi)
            start64 = tl.cast(start, tl.int64)
            dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Q + b64 * stride_qb + h64 * stride_qh + start64 * stride_qt,
                                          DO + b64 * stride_dob + h64 * stride_doh + start64 * stride_dot,
                                          LSE + bh64 * Tq, Delta + bh64 * Tq, stride_qt, stride_dot,
                                          start, end, offs_n, key_lo, key_hi, causal_shift, qk_scale, Tq,
                                          CAUSAL, run != 1, UPCAST, HEAD_DIM, BLOCK_M, BLOCK_D)
    out_row64 = tl.cast(out_row, tl.int64)
    store_mask = (offs_n[:, None] < N) & (offs_d[None, :] < HEAD_DIM)
    tl.store(DK + out_row64 * stride_dkb + hk64 * stride_dkh + n64 * stride_dkt + local * stride_dkt + offs_d[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=store_mask)
    tl.store(DV + out_row64 * stride_dvb + hk64 * stride_dvh + n64 * stride_dvt + local * stride_dvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=store_mask)


@triton.jit
def _sum_slot_partials(Partial, Offsets, Uses, Out, use_numel, base0, base1, BLOCK: tl.constexpr):
    """Out[s] = sum of Partial[u] over slot s's uses u (CSR Offsets / Uses), in order, fp32, cast on store.

    Grid ``(S, cdiv(use_numel, BLOCK))`` through `_launch`; Partial ``[B * M, use_numel]`` fp32,
    Out ``[S, use_numel]``.
    """
    slot = _program_id(0, base0)
    offs = tl.cast(_program_id(1, base1), tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < use_numel
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for e in range(tl.load(Offsets + slot), tl.load(Offsets + slot + 1)):
        use = tl.load(Uses + e).to(tl.int64)
        acc += tl.load(Partial + use * use_numel + offs, mask=mask, other=0.0)
    tl.store(Out + slot.to(tl.int64) * use_numel + offs, acc.to(Out.dtype.element_ty), mask=mask)


def _sum_into_slots(partial: torch.Tensor, offsets: torch.Tensor, uses: torch.Tensor, num_slots: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """``[B, M, P, Hkv, D]`` fp32 per-use partials -> ``[S, P, Hkv, D]`` in ``dtype`` (see `_sum_slot_partials`)."""
    out = torch.empty((num_slots, *partial.shape[2:]), dtype=dtype, device=partial.device)
    use_numel = out[0].numel()
    block = 1024
    _launch(_sum_slot_partials, (num_slots, triton.cdiv(use_numel, block)), partial, offsets, uses, out, use_numel,
            BLOCK=block)
    return out


# BLOCK_D -> (BLOCK_M, BLOCK_N, num_warps): 16-bit inputs (tensor cores), then fp32 inputs (exact fp32 dots, which
# run on the FMA units and need much smaller tiles to stay in registers). Checked with ptxas for sm_90.
# 16-bit tiles for D <= 128 and the pipelining depth were picked on an H100 (bf16; scripts/gpu_check.sh):
# (64, 64, 4) with 3 stages beat (64, 32, 8), (128, 64, 8), (128, 32, 8), (64, 64, 8), (128, 128, 8)
# forward and forward+backward at D = 64 and 128 (B=16 T=1024 D=128: 220 TF/s fwd vs 128 for the old tiles).
_TILES = {
    64: ((64, 64, 4), (32, 32, 8)),
    128: ((64, 64, 4), (16, 32, 8)),
    256: ((32, 32, 8), (16, 16, 8)),
}
_STAGES = {64: 3, 128: 3, 256: 2}  # 16-bit inputs; fp32 tiles use 2


def _config(head_dim: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Pinned launch config (no autotune, reproducible runs): tiles shrink as the head dim grows.

    BLOCK_D = next power of two >= D (tail masked). UPCAST: bf16 tiles go through fp32 in the interpreter
    (CPU tensors), whose bf16 ``tl.dot`` is wrong.
    """
    block_d = triton.next_power_of_2(head_dim)
    block_m, block_n, num_warps = _TILES[max(block_d, 64)][dtype == torch.float32]
    stages = 2 if dtype == torch.float32 else _STAGES[max(block_d, 64)]
    return dict(HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps,
                num_stages=stages, UPCAST=dtype == torch.bfloat16 and device.type == "cpu")


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    """x, copied to contiguous if its last dim is not unit-stride (the kernels index D directly)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _strides(x: torch.Tensor) -> tuple:
    """Strides of dims -4, -3, -2 of a ``[..., T, H, D]`` tensor (batch / slot / use, sequence, head)."""
    return tuple(x.stride())[-4:-1]


def forward(q, k, v, prefix_k, prefix_v, index, lens, key_start, causal: bool, softmax_scale: float):
    """Prefix attention forward.

    q ``[B, Tq, Hq, D]``; k, v ``[B, Tk, Hkv, D]``; prefix_k, prefix_v ``[S, P, Hkv, D]``; index int32 ``[B, M]``
    (-1 = unused); lens int32 ``[S]``; key_start int32 ``[B]``. Returns out ``[B, Tq, Hq, D]`` (q's dtype) and
    lse ``[B, Hq, Tq]`` (fp32, natural log; -inf for a query that sees no key).
    """
    q, k, v, prefix_k, prefix_v = (_unit_last(x) for x in (q, k, v, prefix_k, prefix_v))
    batch, q_len, q_heads, head_dim = q.shape
    k_len, kv_heads = k.shape[1], k.shape[2]
    cfg = _config(head_dim, q.dtype, q.device)
    out = torch.empty((batch, q_len, q_heads, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, q_heads, q_len), dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(q_len, cfg["BLOCK_M"]), batch * q_heads)
    _launch(_prefix_attn_fwd, grid, q, k, v, prefix_k, prefix_v, index, lens, key_start, out, lse,
            *_strides(q), *_strides(k), *_strides(v), *_strides(prefix_k), *_strides(prefix_v),
            *_strides(out), softmax_scale, q_len, k_len, index.shape[1], q_heads,
            q_heads // kv_heads, CAUSAL=causal, **cfg)
    return out, lse


def backward(grad_out, q, k, v, prefix_k, prefix_v, index, lens, key_start, out, lse, causal: bool,
             softmax_scale: float, slot_offsets, slot_uses):
    """Prefix attention backward (inputs as in `forward`; out, lse from it; grad_out like out; slot_offsets,
    slot_uses: `slot_use_lists` of index).

    Returns dq ``[B, Tq, Hq, D]``, dk, dv ``[B, Tk, Hkv, D]`` and dprefix_k, dprefix_v ``[S, P, Hkv, D]``, all in
    the input dtype. The pool gradients sum per-use fp32 partials ``[B, M, P, Hkv, D]`` per slot in a fixed
    order (the bits of `sum_into_slots`), with no host sync.
    """
    grad_out, q, k, v, prefix_k, prefix_v, out = (_unit_last(x) for x in (grad_out, q, k, v, prefix_k, prefix_v, out))
    lse = lse.contiguous()
    batch, q_len, q_heads, head_dim = q.shape
    k_len, kv_heads = k.shape[1], k.shape[2]
    num_slots, prefix_len = prefix_k.shape[:2]
    uses = index.shape[1]
    group = q_heads // kv_heads
    cfg = _config(head_dim, q.dtype, q.device)
    tiles = {key: cfg[key] for key in ("HEAD_DIM", "BLOCK_M", "BLOCK_D", "num_warps")}
    q_grid = (triton.cdiv(q_len, cfg["BLOCK_M"]), batch * q_heads)

    delta = torch.empty_like(lse)
    _launch(_attn_bwd_preprocess, q_grid, out, grad_out, delta, *_strides(out), *_strides(grad_out), q_len, q_heads,
            **tiles)

    dq = torch.empty((batch, q_len, q_heads, head_dim), dtype=q.dtype, device=q.device)
    _launch(_prefix_attn_bwd_dq, q_grid, q, k, v, prefix_k, prefix_v, index, lens, key_start, grad_out, lse, delta,
            dq, *_strides(q), *_strides(k), *_strides(v), *_strides(prefix_k), *_strides(prefix_v),
            *_strides(grad_out), *_strides(dq), softmax_scale, q_len, k_len, uses, q_heads, group,
            CAUSAL=causal, **cfg)

    dk = torch.empty((batch, k_len, kv_heads, head_dim), dtype=k.dtype, device=k.device)
    dv = torch.empty_like(dk)
    _launch(_prefix_attn_bwd_dkdv, (triton.cdiv(k_len, cfg["BLOCK_N"]), batch * kv_heads, 1),
            q, grad_out, lse, delta, k, v, index, lens, key_start, dk, dv,
            *_strides(q), *_strides(grad_out), *_strides(k), *_strides(v), *_strides(dk), *_strides(dv),
            softmax_scale, q_len, k_len, k_len, uses, kv_heads, group, PREFIX=False, CAUSAL=causal, **cfg)

    dpk_use = torch.empty((batch, uses, prefix_len, kv_heads, head_dim), dtype=torch.float32, device=q.device)
    dpv_use = torch.empty_like(dpk_use)
    if uses * prefix_len > 0:
        _launch(_prefix_attn_bwd_dkdv, (triton.cdiv(prefix_len, cfg["BLOCK_N"]), batch * kv_heads, uses),
                q, grad_out, lse, delta, prefix_k, prefix_v, index, lens, key_start, dpk_use, dpv_use,
                *_strides(q), *_strides(grad_out), *_strides(prefix_k), *_strides(prefix_v),
                *_strides(dpk_use), *_strides(dpv_use),
                softmax_scale, q_len, k_len, prefix_len, uses, kv_heads, group, PREFIX=True, CAUSAL=False, **cfg)
    dprefix_k = _sum_into_slots(dpk_use, slot_offsets, slot_uses, num_slots, prefix_k.dtype)
    dprefix_v = _sum_into_slots(dpv_use, slot_offsets, slot_uses, num_slots, prefix_v.dtype)
    return dq, dk, dv, dprefix_k, dprefix_v
