"""prefix_attention: every backend against an fp64 reference, plus determinism, bad input, compile."""
from __future__ import annotations

import itertools
import os
from collections import Counter
from dataclasses import dataclass

import pytest
import torch

import fastmem
from fastmem.kernels.prefix_attention_ref import prefix_attention_ref
from fastmem.kernels.slots import slot_use_lists, sum_into_slots
from fastmem.ops import backends

BACKENDS = [
    pytest.param(name, marks=pytest.mark.skipif(
        backends.unavailable_reason(name) is not None,
        reason=f"{name} backend unavailable: {backends.unavailable_reason(name)}"))
    for name in ("torch", "triton", "native")
]


@dataclass(frozen=True)
class Case:
    """One shape and masking configuration. index rows list slot ids (-1 = none)."""
    name: str
    batch: int
    q_len: int
    k_len: int
    q_heads: int
    kv_heads: int
    head_dim: int
    slots: int
    prefix_len: int
    index: tuple
    lens: tuple | None = None
    causal: bool = True
    key_start: tuple | None = None


CASES = [
    Case("decode_gqa4_d64", 1, 1, 7, 4, 1, 64, 3, 5, (2,)),
    Case("prefill_gqa4_m3_unused", 3, 5, 9, 4, 1, 64, 4, 6,
         ((0, -1, 2), (2, 2, -1), (-1, -1, -1)), lens=(6, 0, 3, 6)),
    Case("square_mha_d128_dup", 3, 8, 8, 2, 2, 128, 5, 4, ((1, 3), (3, 1), (1, 1)),
         lens=(4, 0, 2, 4, 1)),
    Case("noncausal_shared_slot", 3, 6, 6, 2, 2, 64, 2, 3, (0, 0, 0), causal=False),
    Case("left_padding_odd_dim", 3, 4, 8, 4, 2, 40, 3, 5, ((1,), (0,), (-1,)),
         lens=(5, 2, 0), key_start=(0, 3, 8)),
    Case("decode_d128_dup_rows", 3, 1, 5, 4, 1, 128, 4, 3, ((2, 2), (2, -1), (0, 3)),
         lens=(3, 1, 3, 0)),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_inputs(case: Case, dtype: torch.dtype, seed: int = 0):
    """Random q, k, v, pool, index, lens, key_start for ``case`` (float tensors in ``dtype``)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    tensors = dict(
        q=rand(case.batch, case.q_len, case.q_heads, case.head_dim),
        k=rand(case.batch, case.k_len, case.kv_heads, case.head_dim),
        v=rand(case.batch, case.k_len, case.kv_heads, case.head_dim),
        prefix_k=rand(case.slots, case.prefix_len, case.kv_heads, case.head_dim),
        prefix_v=rand(case.slots, case.prefix_len, case.kv_heads, case.head_dim),
    )
    extra = dict(
        prefix_index=torch.tensor(case.index),
        prefix_lens=None if case.lens is None else torch.tensor(case.lens),
        key_start=None if case.key_start is None else torch.tensor(case.key_start),
    )
    return tensors, extra


def run(tensors, extra, case: Case, backend: str, grad_out=None, upcast=True):
    """Output and, when grad_out is given, the five gradients; ``backend=None`` is the reference."""
    leaves = {n: t.detach().clone().requires_grad_() for n, t in tensors.items()}
    if backend is None:
        out = prefix_attention_ref(*leaves.values(), extra["prefix_index"], extra["prefix_lens"],
                                   causal=case.causal, key_start=extra["key_start"], upcast=upcast)
    else:
        out = fastmem.prefix_attention(*leaves.values(), extra["prefix_index"], extra["prefix_lens"],
                                       causal=case.causal, key_start=extra["key_start"], backend=backend)
    if grad_out is None:
        return out.detach(), None
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out.to(out.dtype))
    return out.detach(), grads


def max_error(actual, expected):
    return (actual.double() - expected.double()).abs().max().item()


def assert_within_rule(name, actual, expected, baseline, factor, dtype):
    """Error vs the fp64 reference at most ``factor`` x plain torch's error in ``dtype`` (+ a floor)."""
    floor = 2 * torch.finfo(dtype).eps * max(expected.abs().max().item(), 1.0) if dtype != torch.float32 \
        else 1e-6 * max(expected.abs().max().item(), 1.0)
    error, base = max_error(actual, expected), max_error(baseline, expected)
    assert error <= factor * base + floor, (
        f"{name}: error {error:.3g} > {factor} x torch-{dtype} error {base:.3g} + floor {floor:.2g}")


def dtype_runs_on(backend: str, dtype: torch.dtype) -> bool:
    # bf16 tl.dot is wrong in the Triton interpreter (shared NOTES): bf16 Triton is a GPU test.
    return not (backend == "triton" and dtype == torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_fp64_reference(case, dtype, backend):
    if not dtype_runs_on(backend, dtype):
        pytest.skip("bf16 tl.dot is wrong under TRITON_INTERPRET; covered by the CUDA test")
    tensors, extra = make_inputs(case, dtype)
    grad_out = torch.randn(case.batch, case.q_len, case.q_heads, case.head_dim,
                           generator=torch.Generator().manual_seed(1)).to(dtype)
    exact = {n: t.double() for n, t in tensors.items()}
    ref_out, ref_grads = run(exact, extra, case, None, grad_out.double())
    base_out, base_grads = run(tensors, extra, case, None, grad_out, upcast=False)
    out, grads = run(tensors, extra, case, backend, grad_out)

    assert out.dtype == dtype and out.shape == ref_out.shape
    assert_within_rule("out", out, ref_out, base_out, 2, dtype)
    for name, grad, ref, base in zip(tensors, grads, ref_grads, base_grads):
        assert grad.dtype == dtype and grad.shape == tensors[name].shape
        assert_within_rule(f"d{name}", grad, ref, base, 3, dtype)


def test_reference_matches_sdpa_on_concatenation():
    """The reference itself equals SDPA over the explicitly concatenated keys of one row."""
    case = CASES[2]
    tensors, extra = make_inputs(case, torch.float64)
    out = prefix_attention_ref(*tensors.values(), extra["prefix_index"], extra["prefix_lens"])
    for row, slots in enumerate(case.index):
        parts_k = [tensors["prefix_k"][s, :case.lens[s]] for s in slots] + [tensors["k"][row]]
        parts_v = [tensors["prefix_v"][s, :case.lens[s]] for s in slots] + [tensors["v"][row]]
        keys, values = torch.cat(parts_k), torch.cat(parts_v)
        prefix_total = keys.shape[0] - case.k_len
        mask = torch.ones(case.q_len, keys.shape[0], dtype=torch.bool)
        mask[:, prefix_total:] = torch.ones(case.q_len, case.k_len).tril(case.k_len - case.q_len).bool()
        expected = torch.nn.functional.scaled_dot_product_attention(
            tensors["q"][row].transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1), attn_mask=mask)
        torch.testing.assert_close(out[row], expected.transpose(0, 1))


# Several query tiles (32) and key tiles (64) per row, pool slots longer than a key tile, a head dim
# that leaves a column tail after the SIMD panels, GQA 4:1, left padding: the CPU builds' tiling paths.
MULTI_TILE = Case("multi_tile_gqa4_d72", 2, 70, 100, 8, 2, 72, 3, 70, ((0, 2), (1, -1)), lens=(70, 5, 64),
                  key_start=(0, 7))


def native_cpu_builds() -> list:
    if backends.unavailable_reason("native") is not None:
        return [pytest.param("none", marks=pytest.mark.skip(reason="native backend unavailable"))]
    from fastmem import _native
    return _native.cpu_isas()


@pytest.fixture
def cpu_build(request):
    """Runs the native CPU kernels of one ISA build (avx512 / avx2 / base, as this CPU allows)."""
    from fastmem import _native
    chosen = _native.cpu_isa()
    _native.set_cpu_isa(request.param)
    yield request.param
    _native.set_cpu_isa(chosen)


@pytest.mark.skipif(backends.unavailable_reason("triton") is not None, reason="needs Triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton_whole_and_partial_blocks_match_fp64_reference(dtype):
    """Rows long enough for unmasked whole key blocks between the masked key_start, diagonal and pool-tail
    blocks (the small CASES never leave the masked path)."""
    case = MULTI_TILE
    tensors, extra = make_inputs(case, dtype)
    grad_out = torch.randn(case.batch, case.q_len, case.q_heads, case.head_dim).to(dtype)
    device = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    ref_out, ref_grads = run({n: t.double() for n, t in tensors.items()}, extra, case, None, grad_out.double())
    base_out, base_grads = run(tensors, extra, case, None, grad_out, upcast=False)
    out, grads = run({n: t.to(device) for n, t in tensors.items()},
                     {n: None if t is None else t.to(device) for n, t in extra.items()}, case, "triton",
                     grad_out.to(device))
    assert_within_rule("out", out.cpu(), ref_out, base_out, 2, dtype)
    for name, grad, ref, base in zip(tensors, grads, ref_grads, base_grads):
        assert_within_rule(f"d{name}", grad.cpu(), ref, base, 3, dtype)


@pytest.mark.parametrize("cpu_build", native_cpu_builds(), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_cpu_build_matches_fp64_reference(cpu_build, dtype):
    case = MULTI_TILE
    tensors, extra = make_inputs(case, dtype)
    grad_out = torch.randn(case.batch, case.q_len, case.q_heads, case.head_dim).to(dtype)
    ref_out, ref_grads = run({n: t.double() for n, t in tensors.items()}, extra, case, None, grad_out.double())
    base_out, base_grads = run(tensors, extra, case, None, grad_out, upcast=False)
    out, grads = run(tensors, extra, case, "native", grad_out)
    assert_within_rule("out", out, ref_out, base_out, 2, dtype)
    for name, grad, ref, base in zip(tensors, grads, ref_grads, base_grads):
        assert_within_rule(f"d{name}", grad, ref, base, 3, dtype)


@pytest.mark.parametrize("cpu_build", native_cpu_builds(), indirect=True)
def test_cpu_build_bits_do_not_depend_on_thread_count(cpu_build):
    tensors, extra = make_inputs(MULTI_TILE, torch.float32)
    grad_out = torch.randn(MULTI_TILE.batch, MULTI_TILE.q_len, MULTI_TILE.q_heads, MULTI_TILE.head_dim)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 3, 8):
            torch.set_num_threads(count)
            results.append(run(tensors, extra, MULTI_TILE, "native", grad_out))
    finally:
        torch.set_num_threads(threads)
    for out, grads in results[1:]:
        assert torch.equal(out, results[0][0])
        for grad, first in zip(grads, results[0][1]):
            assert torch.equal(grad, first)


@pytest.mark.parametrize("cpu_build", native_cpu_builds(), indirect=True)
def test_cpu_build_reports_its_tiles(cpu_build):
    """Each build times its micro-tile height among its two choices (AVX-512: 4 or 8 rows; AVX2 and SSE:
    3 or 6) and reads a positive L2 size."""
    from fastmem.ops import native
    tiles = native.cpu_tiles()
    assert tiles["isa"] == cpu_build
    assert tiles["micro_rows"] in ((4, 8) if cpu_build == "avx512" else (3, 6))
    assert tiles["l2_bytes"] > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_deterministic(backend):
    case = CASES[2]
    tensors, extra = make_inputs(case, torch.float32)
    grad_out = torch.randn(case.batch, case.q_len, case.q_heads, case.head_dim)
    _, first = run(tensors, extra, case, backend, grad_out)
    _, second = run(tensors, extra, case, backend, grad_out)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_never_reads_outside_valid_slot_positions(backend):
    """Positions past a slot's length and slots nobody uses hold NaN; nothing of them may leak."""
    case = CASES[1]
    tensors, extra = make_inputs(case, torch.float32)
    clean_out, clean_grads = run(tensors, extra, case, "torch", torch.ones(case.batch, case.q_len,
                                                                           case.q_heads, case.head_dim))
    poisoned = dict(tensors)
    used = {s for row in case.index for s in row if s >= 0}
    for name in ("prefix_k", "prefix_v"):
        pool = tensors[name].clone()
        for slot in range(case.slots):
            pool[slot, (case.lens[slot] if slot in used else 0):] = float("nan")
        poisoned[name] = pool
    out, grads = run(poisoned, extra, case, backend, torch.ones_like(clean_out))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, clean_out, atol=1e-5, rtol=1e-5)
    for grad, clean in zip(grads, clean_grads):
        assert torch.isfinite(grad).all()
        torch.testing.assert_close(grad, clean, atol=1e-5, rtol=1e-5)


def test_pool_gradient_is_sum_over_uses():
    per_use = torch.arange(12.0).reshape(3, 2, 2)
    index = torch.tensor([[1, -1], [1, 1], [0, -1]])
    total = sum_into_slots(per_use, index, num_slots=3)
    torch.testing.assert_close(total, torch.stack([per_use[2, 0], per_use[0, 0] + per_use[1, 0] + per_use[1, 1],
                                                   torch.zeros(2)]))


@pytest.mark.skipif(backends.unavailable_reason("triton") is not None, reason="needs Triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton_slot_reduction_has_the_bits_of_sum_into_slots(dtype):
    """The kernel summing per-use partials per slot (CSR of uses, no host sync) = `sum_into_slots`, bit
    for bit; slots without a use get zeros, and a slot used by every row sums them all in (b, m) order."""
    from fastmem.kernels.prefix_attention import _sum_into_slots
    device = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"  # compiled Triton needs a GPU
    index = torch.tensor([[3, -1, 0], [3, 3, -1], [0, 2, 3], [-1, -1, -1], [3, 0, 2]], dtype=torch.int32)
    partial = torch.randn(5, 3, 7, 2, 24) * 1e3  # large values: a different order changes the low bits
    offsets, uses = slot_use_lists(index.to(device), num_slots=5)
    got = _sum_into_slots(partial.to(device), offsets, uses, 5, dtype)
    assert torch.equal(got.cpu(), sum_into_slots(partial, index, num_slots=5).to(dtype))


@pytest.mark.skipif(backends.unavailable_reason("triton") is not None, reason="needs Triton")
def test_triton_grid_chunks_cover_the_grid_once(monkeypatch):
    """`_grid_chunks` cuts a grid into launches within MAX_GRID that hold every program exactly once."""
    from fastmem.kernels import prefix_attention as triton_backend
    monkeypatch.setattr(triton_backend, "MAX_GRID", (3, 2, 4))
    for grid in [(7, 5, 1), (3, 2, 4), (1, 9, 9), (2, 1)]:
        seen = Counter()
        for offsets, chunk in triton_backend._grid_chunks(grid):
            assert len(offsets) == len(chunk) == len(grid)
            assert all(0 < size <= limit for size, limit in zip(chunk, triton_backend.MAX_GRID))
            seen.update(itertools.product(*(range(o, o + size) for o, size in zip(offsets, chunk))))
        assert seen == Counter(itertools.product(*map(range, grid))), grid
    assert triton_backend._grid_chunks((0, 4, 1)) == []


# Grids of every Triton launch (fp32 tiles: BLOCK_M = BLOCK_N = 32): forward / delta / dq (2, 4), own dk/dv
# (2, 2, 1), pool dk/dv (2, 2, 2), slot sums (2, 2); with MAX_GRID (1, 1, 1) every launch runs one program at a time.
SPLIT_GRID = Case("split_grid_gqa2_d32", 2, 40, 50, 2, 1, 32, 2, 40, ((0, 1), (1, -1)), lens=(40, 7),
                  key_start=(0, 5))


@pytest.mark.skipif(backends.unavailable_reason("triton") is not None, reason="needs Triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton_split_launches_match_unsplit_bitwise(dtype, monkeypatch):
    """With the grid limits lowered, every launch (forward, delta, dq, own and pool dk/dv, slot sums) is cut
    into several along each axis, and the results keep every bit of the unsplit launches (and the accuracy
    rule against the fp64 reference)."""
    from fastmem.kernels import prefix_attention as triton_backend
    case = SPLIT_GRID
    tensors, extra = make_inputs(case, dtype)
    grad_out = torch.randn(case.batch, case.q_len, case.q_heads, case.head_dim,
                           generator=torch.Generator().manual_seed(1)).to(dtype)
    device = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    on_device = {n: t.to(device) for n, t in tensors.items()}
    extra_device = {n: None if t is None else t.to(device) for n, t in extra.items()}
    whole_out, whole_grads = run(on_device, extra_device, case, "triton", grad_out.to(device))

    grids = []
    chunks = triton_backend._grid_chunks
    monkeypatch.setattr(triton_backend, "MAX_GRID", (1, 1, 1))
    monkeypatch.setattr(triton_backend, "_grid_chunks", lambda grid: grids.append(grid) or chunks(grid))
    split_out, split_grads = run(on_device, extra_device, case, "triton", grad_out.to(device))
    assert len(grids) == 7  # forward, delta, dq, own dk/dv, pool dk/dv, two slot sums
    for axis, limit in enumerate(triton_backend.MAX_GRID):
        assert any(len(grid) > axis and grid[axis] > limit for grid in grids), f"axis {axis} never split"

    assert torch.equal(split_out, whole_out)
    for name, split, whole in zip(tensors, split_grads, whole_grads):
        assert torch.equal(split, whole), f"d{name} changed when the launches were split"
    ref_out, ref_grads = run({n: t.double() for n, t in tensors.items()}, extra, case, None, grad_out.double())
    base_out, base_grads = run(tensors, extra, case, None, grad_out, upcast=False)
    assert_within_rule("out", split_out.cpu(), ref_out, base_out, 2, dtype)
    for name, grad, ref, base in zip(tensors, split_grads, ref_grads, base_grads):
        assert_within_rule(f"d{name}", grad.cpu(), ref, base, 3, dtype)


def test_fully_masked_query_is_zero_with_zero_gradient():
    case = CASES[4]  # row 2: no slot, key_start = Tk -> its queries see nothing
    tensors, extra = make_inputs(case, torch.float32)
    out, grads = run(tensors, extra, case, "auto", torch.ones(case.batch, case.q_len, case.q_heads,
                                                              case.head_dim))
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    assert torch.equal(grads[0][2], torch.zeros_like(grads[0][2]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_inputs(backend):
    case = CASES[0]
    tensors, extra = make_inputs(case, torch.float32)
    strided = {n: torch.cat([t, t], dim=-1)[..., ::2] if n == "q" else t.transpose(1, 2).contiguous().transpose(1, 2)
               for n, t in tensors.items()}
    expected, _ = run({n: t.contiguous() for n, t in strided.items()}, extra, case, "torch")
    actual, _ = run(strided, extra, case, backend)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_compiles_fullgraph():
    case = CASES[1]
    tensors, extra = make_inputs(case, torch.float32)

    def loss(q, k, v, prefix_k, prefix_v, index, lens):
        return fastmem.prefix_attention(q, k, v, prefix_k, prefix_v, index, lens).square().mean()

    compiled = torch.compile(loss, fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in tensors.values()]
    eager = [t.clone().requires_grad_() for t in tensors.values()]
    value = compiled(*leaves, extra["prefix_index"], extra["prefix_lens"])
    expected = loss(*eager, extra["prefix_index"], extra["prefix_lens"])
    torch.testing.assert_close(value, expected)
    for got, want in zip(torch.autograd.grad(value, leaves), torch.autograd.grad(expected, eager)):
        torch.testing.assert_close(got, want)


# ---- plans -----------------------------------------------------------------------------------


def plan_for(case: Case, extra, dtype=torch.float32, **options):
    return fastmem.plan_prefix_attention(extra["prefix_index"], extra["prefix_lens"], num_slots=case.slots,
                                         prefix_len=case.prefix_len, dtype=dtype, head_dim=case.head_dim,
                                         key_start=extra["key_start"], **options)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [CASES[1], CASES[4], CASES[5]], ids=lambda c: c.name)
def test_plan_reused_across_layers_equals_one_off_calls(case, backend):
    """One plan serving three "layers" (own q, k, v and pool each) gives the bits of three one-off calls,
    outputs and all five gradients, and the one-off calls match the fp64 reference."""
    plan = plan_for(case, make_inputs(case, torch.float32)[1], backend=backend)
    assert plan.backend == backend and plan.slot_offsets is not None
    for layer in range(3):
        tensors, extra = make_inputs(case, torch.float32, seed=layer)
        grad_out = torch.randn(case.batch, case.q_len, case.q_heads, case.head_dim,
                               generator=torch.Generator().manual_seed(10 + layer))
        leaves = [t.clone().requires_grad_() for t in tensors.values()]
        out = fastmem.prefix_attention(*leaves, causal=case.causal, plan=plan)
        planned = (out, *torch.autograd.grad(out, leaves, grad_out))
        one_off = run(tensors, extra, case, backend, grad_out)
        for got, want in zip(planned, (one_off[0], *one_off[1])):
            assert torch.equal(got, want), f"layer {layer}"
        ref_out, ref_grads = run({n: t.double() for n, t in tensors.items()}, extra, case, None, grad_out.double())
        torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
        for got, want in zip(planned[1:], ref_grads):
            torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def test_plan_without_slot_lists_still_has_the_gradients():
    """A plan built for inference (no slot-use lists) used under autograd: the backward builds them itself."""
    case = CASES[2]
    tensors, extra = make_inputs(case, torch.float32)
    plan = plan_for(case, extra, backward=False)
    assert plan.slot_offsets is None and plan.slot_uses is None
    leaves = [t.clone().requires_grad_() for t in tensors.values()]
    out = fastmem.prefix_attention(*leaves, plan=plan)
    grad_out = torch.ones_like(out)
    _, want = run(tensors, extra, case, "auto", grad_out)
    for got, expected in zip(torch.autograd.grad(out, leaves, grad_out), want):
        assert torch.equal(got, expected)


def test_plan_compiles_fullgraph():
    case = CASES[1]
    tensors, extra = make_inputs(case, torch.float32)
    plan = plan_for(case, extra)

    def loss(q, k, v, prefix_k, prefix_v):
        return fastmem.prefix_attention(q, k, v, prefix_k, prefix_v, plan=plan).square().mean()

    leaves = [t.clone().requires_grad_() for t in tensors.values()]
    eager = [t.clone().requires_grad_() for t in tensors.values()]
    value, expected = torch.compile(loss, fullgraph=True)(*leaves), loss(*eager)
    torch.testing.assert_close(value, expected)
    for got, want in zip(torch.autograd.grad(value, leaves), torch.autograd.grad(expected, eager)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("override, words", [
    (dict(q=torch.zeros(2, 5, 4, 64), k=torch.zeros(2, 9, 1, 64), v=torch.zeros(2, 9, 1, 64)), "B=2"),
    (dict(prefix_k=torch.zeros(5, 6, 1, 64), prefix_v=torch.zeros(5, 6, 1, 64)), "S=5"),
    (dict(prefix_k=torch.zeros(4, 7, 1, 64), prefix_v=torch.zeros(4, 7, 1, 64)), "P=7"),
    (dict(q=torch.zeros(3, 5, 4, 64, dtype=torch.float64), k=torch.zeros(3, 9, 1, 64, dtype=torch.float64),
          v=torch.zeros(3, 9, 1, 64, dtype=torch.float64), prefix_k=torch.zeros(4, 6, 1, 64, dtype=torch.float64),
          prefix_v=torch.zeros(4, 6, 1, 64, dtype=torch.float64)), "torch.float64"),
    (dict(q=torch.zeros(3, 5, 4, 32), k=torch.zeros(3, 9, 1, 32), v=torch.zeros(3, 9, 1, 32),
          prefix_k=torch.zeros(4, 6, 1, 32), prefix_v=torch.zeros(4, 6, 1, 32)), "head dim 32"),
    (dict(q=torch.zeros(3, 2, 4, 64), k=torch.zeros(3, 2, 1, 64), v=torch.zeros(3, 2, 1, 64)), "and 2 own keys"),
    (dict(prefix_index=torch.tensor([0, 1, 2])), "not both"),
])
def test_plan_refuses_tensors_it_was_not_built_for(override, words):
    case = CASES[1]
    tensors, extra = make_inputs(case, torch.float32)
    plan = plan_for(case, dict(extra, key_start=torch.tensor([0, 3, 1])))
    args = {**tensors, "prefix_index": None, **override}
    with pytest.raises(ValueError) as caught:
        fastmem.prefix_attention(args["q"], args["k"], args["v"], args["prefix_k"], args["prefix_v"],
                                 args["prefix_index"], plan=plan)
    assert words in str(caught.value)


def test_plan_refuses_another_device():
    case = CASES[1]
    tensors, extra = make_inputs(case, torch.float32)
    plan = plan_for(case, extra)
    on_meta = [t.to("meta") for t in tensors.values()]
    with pytest.raises(ValueError, match="meta"):
        fastmem.prefix_attention(*on_meta, plan=plan)


@pytest.mark.parametrize("override, error, words", [
    (dict(prefix_index=torch.tensor([[0, 4, -1], [0, 0, 0], [1, 1, 1]])), IndexError, "slot 4"),
    (dict(prefix_index=torch.tensor([0, -2, 1])), IndexError, "slot -2"),
    (dict(prefix_index=torch.tensor([0.0, 1.0, 1.0])), ValueError, "integer"),
    (dict(prefix_index=torch.zeros(0, dtype=torch.long)), ValueError, "at least one row"),
    (dict(prefix_lens=torch.tensor([6, 7, 0, 1])), ValueError, "prefix_lens must lie in [0, P=6]"),
    (dict(prefix_lens=torch.tensor([6, 1, 0])), ValueError, "prefix_lens must have shape [4]"),
    (dict(key_start=torch.tensor([0, -1, 0])), ValueError, "key_start must lie"),
    (dict(key_start=torch.tensor([0, 1])), ValueError, "key_start must have shape [3]"),
    (dict(backend="cudnn"), ValueError, "unknown backend 'cudnn'"),
])
def test_plan_build_refuses_bad_index_values(override, error, words):
    case = CASES[1]
    _, extra = make_inputs(case, torch.float32)
    options = {**extra, **override}
    with pytest.raises(error) as caught:
        fastmem.plan_prefix_attention(options["prefix_index"], options["prefix_lens"], num_slots=case.slots,
                                      prefix_len=case.prefix_len, dtype=torch.float32, head_dim=case.head_dim,
                                      key_start=options["key_start"], backend=options.get("backend", "auto"))
    assert words in str(caught.value)


# ---- bad input ------------------------------------------------------------------------------


def call(case=CASES[1], backend="auto", **override):
    tensors, extra = make_inputs(case, torch.float32)
    args = {**tensors, **extra, **override}
    return fastmem.prefix_attention(args["q"], args["k"], args["v"], args["prefix_k"], args["prefix_v"],
                                    args["prefix_index"], args["prefix_lens"],
                                    key_start=args["key_start"], backend=backend)


@pytest.mark.parametrize("override, error, words", [
    (dict(k=torch.zeros(3, 9, 2, 64)), ValueError, "k (3, 9, 2, 64)"),
    (dict(v=torch.zeros(3, 8, 1, 64)), ValueError, "v (3, 8, 1, 64)"),
    (dict(q=torch.zeros(3, 10, 4, 64)), ValueError, "Tk >= Tq"),
    (dict(q=torch.zeros(3, 5, 3, 64), k=torch.zeros(3, 9, 2, 64), v=torch.zeros(3, 9, 2, 64)),
     ValueError, "multiple of kv heads"),
    (dict(prefix_v=torch.zeros(4, 5, 1, 64)), ValueError, "prefix_v (4, 5, 1, 64)"),
    (dict(q=torch.zeros(3, 5, 4, 64, dtype=torch.float16)), ValueError, "q torch.float16"),
    (dict(q=torch.zeros(3, 5, 4, 64, device="meta")), ValueError, "q on meta"),
    (dict(prefix_index=torch.tensor([[0, 4, -1], [0, 0, 0], [1, 1, 1]])), IndexError, "slot 4"),
    (dict(prefix_index=torch.tensor([0, -2, 1])), IndexError, "slot -2"),
    (dict(prefix_index=torch.tensor([0, 1])), ValueError, "prefix_index must have shape"),
    (dict(prefix_index=torch.tensor([0.0, 1.0, 1.0])), ValueError, "integer"),
    (dict(prefix_lens=torch.tensor([6, 7, 0, 1])), ValueError, "prefix_lens must lie in [0, P=6]"),
    (dict(prefix_lens=torch.tensor([6, -1, 0, 1])), ValueError, "prefix_lens must lie"),
    (dict(prefix_lens=torch.tensor([6, 1, 0])), ValueError, "prefix_lens must have shape [4]"),
    (dict(key_start=torch.tensor([0, 10, 0])), ValueError, "key_start must lie in [0, Tk=9]"),
    (dict(prefix_k=torch.zeros(0, 6, 1, 64), prefix_v=torch.zeros(0, 6, 1, 64)), ValueError, "at least one slot"),
    (dict(q="q"), TypeError, "q must be a torch.Tensor"),
])
def test_bad_input_raises_clear_error(override, error, words):
    with pytest.raises(error) as caught:
        call(**override)
    assert words in str(caught.value)


def test_unknown_or_unsupported_backend():
    with pytest.raises(ValueError, match="unknown backend 'cudnn'"):
        call(backend="cudnn")
    if backends.unavailable_reason("native") is None:
        odd = Case("d12", 1, 2, 3, 1, 1, 12, 1, 2, (0,))
        with pytest.raises(ValueError, match="head dim 12"):
            call(odd, backend="native")


def test_backend_registry_loads_its_modules():
    """Each entry's load() imports the module its name and messages refer to; unknown names say the choices."""
    for name, backend in backends.BACKENDS.items():
        assert backend.name == name
        reason = backends.unavailable_reason(name)
        if reason is None or not reason.startswith(f"import of {backend.module} failed"):
            assert backend.load().__name__ == backend.module
        if reason is None:
            assert backends.load(name) is backend.load()
        else:
            with pytest.raises(RuntimeError, match=f"backend {name!r} is not available"):
                backends.load(name)
    with pytest.raises(ValueError, match="choose one of 'auto', 'torch', 'triton', 'native'"):
        backends.load("cudnn")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "native"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_cuda_matches_fp64_reference(case, dtype, backend):
    if backends.unavailable_reason(backend) is not None or not backends.supports(
            backend, torch.device("cuda"), dtype, case.head_dim):
        pytest.skip(f"{backend} cannot run on this CUDA build")
    tensors, extra = make_inputs(case, dtype)
    grad_out = torch.randn(case.batch, case.q_len, case.q_heads, case.head_dim).to(dtype)
    ref_out, ref_grads = run({n: t.double() for n, t in tensors.items()}, extra, case, None, grad_out.double())
    base_out, base_grads = run(tensors, extra, case, None, grad_out, upcast=False)
    on_gpu = {n: t.cuda() for n, t in tensors.items()}
    extra_gpu = {n: None if t is None else t.cuda() for n, t in extra.items()}
    out, grads = run(on_gpu, extra_gpu, case, backend, grad_out.cuda())
    assert_within_rule("out", out.cpu(), ref_out, base_out, 2, dtype)
    for name, grad, ref, base in zip(tensors, grads, ref_grads, base_grads):
        assert_within_rule(f"d{name}", grad.cpu(), ref, base, 3, dtype)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU interpreter switch")
def test_triton_interpreter_switch_is_read_as_triton_reads_it(monkeypatch):
    """`TRITON_INTERPRET=on` runs Triton's interpreter, so the backend must count as able to run on the CPU then
    (and not with 0); the check once compared the value with "1" only."""
    triton = pytest.importorskip("triton")
    kernels = backends.BACKENDS["triton"].load()
    for value, on in (("on", True), ("true", True), ("1", True), ("0", False)):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        if hasattr(triton, "knobs"):
            assert bool(triton.knobs.runtime.interpret) is on   # what Triton itself will do
        assert kernels.interpreting() is on and kernels.is_available() is on
        assert backends.supports("triton", torch.device("cpu"), torch.float32, 64) is on
