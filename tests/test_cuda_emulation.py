"""The native backend's CUDA kernels, run on CPU through csrc/tools/cuda_emulator.cpp (no GPU needed).

The emulator compiles csrc/prefix_attention_cuda.cuh for the host and runs each block as blockDim.x
std::threads through the same launch plans (grids, kernel order, dtype and head-dim dispatch) as
prefix_attention_cuda.cu. A module-scoped fixture builds it with g++ into pytest's tmp dir; an autouse
fixture swaps its forward/backward in for fastmem._native's CPU entry points, so
``fastmem.prefix_attention(..., backend="native")`` on CPU tensors runs the emulated CUDA kernels.
This checks the kernels' indexing, tiling, masking, barriers and reductions, not nvcc's code generation.
It also runs the grid split of csrc/launch_grid.h (every launch cut to the CUDA grid limits) with the limits
lowered to one block, against the uncut launches.

The accuracy rule and inputs are those of test_prefix_attention.py. Besides its CASES (head dims 64,
128 and 40: -1 entries, lens 0, duplicate slots, key_start, causal off), two local cases cross the
kernels' tile and block boundaries (kRows = 64 rows per block, kTile = 4096 / DMAX rows per shared
tile) and cover the 256 head-dim bucket, which CASES never reach.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

import fastmem
from fastmem.kernels.slots import slot_use_lists, sum_into_slots
from fastmem.ops import native
try:
    from test_prefix_attention import CASES, Case, assert_within_rule, make_inputs, run
except ImportError:  # tests/ not on sys.path (e.g. --import-mode=importlib)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_prefix_attention import CASES, Case, assert_within_rule, make_inputs, run

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
EMULATOR_SOURCE = CSRC / "tools" / "cuda_emulator.cpp"


def _missing_requirement() -> str | None:
    if not native.is_available():
        return f"fastmem._native unavailable: {native.UNAVAILABLE_REASON}"
    if shutil.which("g++") is None:
        return "g++ not found on PATH (needed to build csrc/tools/cuda_emulator.cpp)"
    if importlib.util.find_spec("pybind11") is None:
        return "pybind11 is not installed (needed to build csrc/tools/cuda_emulator.cpp)"
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        return f"Python development headers (Python.h) not found in {sysconfig.get_paths()['include']}"
    if not EMULATOR_SOURCE.exists():
        return f"{EMULATOR_SOURCE} not found"
    return None


_MISSING = _missing_requirement()
if _MISSING is not None:
    pytest.skip(f"CUDA emulation tests need: {_MISSING}", allow_module_level=True)

# Cases beyond CASES (kept small: the emulator starts one std::thread per GPU thread):
#  * multi_tile_d128: D=128 -> kTile 32. Tq=70, Tk=72 (causal, Tk - Tq = 2) -> two row blocks of 64
#    (the second mostly idle threads) for queries and keys; slot 0's 35 positions -> two pool tiles
#    (32 + 3); key_start 37 -> the own-key loop starts at tile 32 with a partly masked tile, and key
#    block 0 mixes visible and invisible rows. GQA 2:1, slot 0 twice in both rows, a -1 entry.
#  * bucket256_d200_noncausal: D=200 (bucket 256, rows padded to 256) -> kTile 16; Tq=20, Tk=24, P=18
#    -> two query, key and pool tiles each; key_start 3 and 0; causal off; GQA 2:1; a -1 entry first.
EXTRA_CASES = [
    Case("multi_tile_d128", 2, 70, 72, 2, 1, 128, 2, 36, ((0, 1, 0), (1, -1, 0)),
         lens=(35, 6), key_start=(0, 37)),
    Case("bucket256_d200_noncausal", 2, 20, 24, 2, 1, 200, 2, 18, ((1, 0), (-1, 1)),
         lens=(18, 11), causal=False, key_start=(3, 0)),
]
ALL_CASES = CASES + EXTRA_CASES
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _build(out_dir: Path) -> Path:
    import pybind11

    target = out_dir / f"_cuda_emu{sysconfig.get_config_var('EXT_SUFFIX') or '.so'}"
    command = ["g++", "-std=c++17", "-O2", "-shared", "-fPIC", f"-I{CSRC}", f"-I{pybind11.get_include()}",
               f"-I{sysconfig.get_paths()['include']}", str(EMULATOR_SOURCE), "-o", str(target), "-lpthread"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        pytest.fail(f"building the CUDA emulator failed ({' '.join(command)}):\n{result.stderr[-6000:]}",
                    pytrace=False)
    return target


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """csrc/tools/cuda_emulator.cpp built and imported as `_cuda_emu`."""
    target = _build(tmp_path_factory.mktemp("cuda_emu"))
    spec = importlib.util.spec_from_file_location("_cuda_emu", target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # The emulator takes fastmem._native.Params, registered by the other module: both must share
    # pybind11's type registry (same pybind11 internals ABI). Default Params (kv_heads 0) make the plan
    # throw std::invalid_argument (-> ValueError); a TypeError means the types are not shared.
    try:
        module.forward(native._native.Params())
    except ValueError:
        pass
    except TypeError as error:
        pytest.skip(f"the emulator cannot take fastmem._native.Params (pybind11 ABI mismatch?): {error}")
    return module


@dataclasses.dataclass
class Calls:
    forward: int = 0
    backward: int = 0
    params: list = dataclasses.field(default_factory=list)

    def counts(self):
        return self.forward, self.backward


@pytest.fixture(autouse=True)
def emulated(emulator, monkeypatch):
    """Routes fastmem._native's CPU entry points to the emulated CUDA kernels; records the calls."""
    calls = Calls()

    def forward(params):
        calls.forward += 1
        calls.params.append(params)
        emulator.forward(params)

    def backward(params):
        calls.backward += 1
        calls.params.append(params)
        emulator.backward(params)

    monkeypatch.setattr(native._native, "forward_cpu", forward)
    monkeypatch.setattr(native._native, "backward_cpu", backward)
    return calls


def _grad_out(case: Case, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(case.batch, case.q_len, case.q_heads, case.head_dim,
                       generator=torch.Generator().manual_seed(1)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ALL_CASES, ids=lambda c: c.name)
def test_emulated_kernels_match_fp64_reference(case, dtype, emulated):
    tensors, extra = make_inputs(case, dtype)
    grad_out = _grad_out(case, dtype)
    ref_out, ref_grads = run({n: t.double() for n, t in tensors.items()}, extra, case, None, grad_out.double())
    base_out, base_grads = run(tensors, extra, case, None, grad_out, upcast=False)
    out, grads = run(tensors, extra, case, "native", grad_out)
    assert emulated.counts() == (1, 1), "the emulated CUDA kernels did not run"

    assert out.dtype == dtype and out.shape == ref_out.shape
    assert_within_rule("out", out, ref_out, base_out, 2, dtype)
    for name, grad, ref, base in zip(tensors, grads, ref_grads, base_grads):
        assert grad.dtype == dtype and grad.shape == tensors[name].shape
        assert_within_rule(f"d{name}", grad, ref, base, 3, dtype)


@pytest.mark.parametrize("case", [CASES[1], CASES[2]], ids=lambda c: c.name)
def test_emulated_backward_deterministic(case, emulated):
    tensors, extra = make_inputs(case, torch.float32)
    grad_out = _grad_out(case, torch.float32)
    first_out, first = run(tensors, extra, case, "native", grad_out)
    second_out, second = run(tensors, extra, case, "native", grad_out)
    assert emulated.counts() == (2, 2)
    assert torch.equal(first_out, second_out)
    for name, a, b in zip(tensors, first, second):
        assert torch.equal(a, b), f"d{name} differs between two identical backward runs"


def _visible(case: Case):
    """Per pool slot, the number of positions some row sees (0 for a slot nobody uses)."""
    lens = case.lens or (case.prefix_len,) * case.slots
    index = case.index if isinstance(case.index[0], tuple) else tuple((s,) for s in case.index)
    used = {s for row in index for s in row if s >= 0}
    return [lens[s] if s in used else 0 for s in range(case.slots)]


@pytest.mark.parametrize("case, dtype", [(CASES[1], torch.bfloat16), (CASES[2], torch.float16),
                                         (EXTRA_CASES[0], torch.float32)], ids=lambda x: getattr(x, "name", str(x)))
def test_pool_gradient_is_fixed_order_sum_of_partials(case, dtype, emulated):
    """dprefix = sum_into_slots(fp32 per-use partials) cast to dtype, bit for bit; partials of unused
    entries and of positions past a slot's length are exactly zero."""
    tensors, extra = make_inputs(case, dtype)
    index = extra["prefix_index"].reshape(case.batch, -1).to(torch.int32)
    lens = extra["prefix_lens"].to(torch.int32)
    key_start = (extra["key_start"] if extra["key_start"] is not None
                 else torch.zeros(case.batch, dtype=torch.int32)).to(torch.int32)
    scale = case.head_dim ** -0.5
    args = (tensors["q"], tensors["k"], tensors["v"], tensors["prefix_k"], tensors["prefix_v"], index, lens,
            key_start)
    out, lse = native.forward(*args, case.causal, scale)
    grads, partial_k, partial_v = native._backward(_grad_out(case, dtype), *args, out, lse, case.causal, scale,
                                                   *slot_use_lists(index, case.slots))
    assert emulated.counts() == (1, 1)

    for name, grad, partial in (("dprefix_k", grads[3], partial_k), ("dprefix_v", grads[4], partial_v)):
        assert torch.equal(grad, sum_into_slots(partial, index, case.slots).to(dtype)), name
        for b in range(case.batch):
            for m in range(index.shape[1]):
                slot = int(index[b, m])
                length = 0 if slot < 0 else int(lens[slot])
                assert torch.count_nonzero(partial[b, m, length:]) == 0, f"{name} partial ({b}, {m})"
                if length:
                    assert torch.count_nonzero(partial[b, m, :length]) > 0, f"{name} partial ({b}, {m})"


@pytest.mark.parametrize("case", [CASES[1], CASES[4], EXTRA_CASES[0]], ids=lambda c: c.name)
def test_emulated_kernels_never_read_masked_positions(case, emulated):
    """NaN in every position nobody may see (pool positions past the used length, unused slots, own keys
    before key_start) changes no bit of out or the gradients; their own gradients are exactly zero."""
    tensors, extra = make_inputs(case, torch.float32)
    grad_out = _grad_out(case, torch.float32)
    clean_out, clean_grads = run(tensors, extra, case, "native", grad_out)
    poisoned = {n: t.clone() for n, t in tensors.items()}
    visible = _visible(case)
    for name in ("prefix_k", "prefix_v"):
        for slot, length in enumerate(visible):
            poisoned[name][slot, length:] = float("nan")
    starts = case.key_start or (0,) * case.batch
    for name in ("k", "v"):
        for b, start in enumerate(starts):
            poisoned[name][b, :start] = float("nan")
    out, grads = run(poisoned, extra, case, "native", grad_out)

    assert torch.equal(out, clean_out)
    for name, grad, clean in zip(tensors, grads, clean_grads):
        assert torch.equal(grad, clean), f"d{name} changed when masked positions hold NaN"
    _, dk, dv, dprefix_k, dprefix_v = grads
    for b, start in enumerate(starts):
        assert torch.count_nonzero(dk[b, :start]) == 0 and torch.count_nonzero(dv[b, :start]) == 0
    for slot, length in enumerate(visible):
        assert torch.count_nonzero(dprefix_k[slot, length:]) == 0
        assert torch.count_nonzero(dprefix_v[slot, length:]) == 0


@pytest.mark.parametrize("case", [CASES[4], EXTRA_CASES[1]], ids=lambda c: c.name)
def test_emulated_kernels_honour_strides(case, emulated):
    """Inputs in padded [B, H, T, D] / [S, H, P, D] memory (non-default strides, unit last stride, passed
    to the kernels as is) give the same bits as contiguous inputs, forward and backward."""
    tensors, extra = make_inputs(case, torch.float16)
    grad_out = _grad_out(case, torch.float16)
    # dims 1 and 2 swapped in memory, and each row padded with 8 NaNs the kernels must not read.
    strided = {n: torch.nn.functional.pad(t.transpose(1, 2), (0, 8), value=float("nan")).transpose(1, 2)
               [..., :case.head_dim] for n, t in tensors.items()}
    assert all(not t.is_contiguous() and t.stride(-1) == 1 for t in strided.values())
    results = []
    for inputs in (tensors, strided):
        leaves = {n: t.detach().requires_grad_() for n, t in inputs.items()}
        out = fastmem.prefix_attention(*leaves.values(), extra["prefix_index"], extra["prefix_lens"],
                                       causal=case.causal, key_start=extra["key_start"], backend="native")
        results.append((out.detach(), torch.autograd.grad(out, list(leaves.values()), grad_out)))
    assert emulated.counts() == (2, 2)
    # The strided run's kernels got the strides, not contiguous copies.
    layout = strided["q"].stride()[:3]
    assert all((p.q.stride0, p.q.stride1, p.q.stride2) == layout for p in emulated.params[2:])
    (out_a, grads_a), (out_b, grads_b) = results
    assert torch.equal(out_a, out_b)
    for name, a, b in zip(tensors, grads_a, grads_b):
        assert torch.equal(a, b), f"d{name} depends on the input strides"


@pytest.mark.parametrize("grid, limits", [((7, 2), (3, 1)), ((5, 5), (5, 2)), ((1, 1), (1, 1)), ((4, 0), (2, 2)),
                                          ((2**31 + 5, 1), (2**31 - 1, 65535))])
def test_grid_chunks_cover_the_grid_once(emulator, grid, limits):
    """for_each_grid_chunk (launch_grid.h, the split every CUDA launch goes through) cuts a grid into pieces
    within the limits that hold every block exactly once."""
    chunks = emulator.grid_chunks(*grid, *limits)
    assert all(0 < nx <= limits[0] and 0 < ny <= limits[1] for _, _, nx, ny in chunks)
    if grid[0] * grid[1] > 100:  # too many blocks to list: pieces tile [0, grid) along each axis
        assert [(x0, nx) for x0, _, nx, _ in chunks] == [(0, limits[0]), (limits[0], grid[0] - limits[0])]
        return
    blocks = [b for x0, y0, nx, ny in chunks for b in itertools.product(range(x0, x0 + nx), range(y0, y0 + ny))]
    assert sorted(blocks) == list(itertools.product(range(grid[0]), range(grid[1])))
    with pytest.raises(ValueError):
        emulator.grid_chunks(*grid, 0, 1)


def test_emulated_split_launches_match_unsplit_bitwise(emulator, emulated, monkeypatch):
    """With the grid limits lowered to 1 x 1 block, every kernel's grid runs as several launches (the reduce
    kernel's y axis too); out and every gradient keep the bits of the uncut launches and the accuracy rule."""
    case, dtype = EXTRA_CASES[0], torch.float32
    tensors, extra = make_inputs(case, dtype)
    grad_out = _grad_out(case, dtype)
    whole_out, whole_grads = run(tensors, extra, case, "native", grad_out)
    assert emulated.counts() == (1, 1)

    launches = []
    monkeypatch.setattr(native._native, "forward_cpu", lambda params: launches.extend(emulator.forward(params, 1, 1)))
    monkeypatch.setattr(native._native, "backward_cpu",
                        lambda params: launches.extend(emulator.backward(params, 1, 1)))
    split_out, split_grads = run(tensors, extra, case, "native", grad_out)
    per_kernel = {}
    for name, x0, y0, nx, ny in launches:
        assert nx == ny == 1
        per_kernel.setdefault(name, []).append((x0, y0))
    assert set(per_kernel) == {"forward_kernel", "delta_kernel", "dq_kernel", "dkdv_own_kernel", "dkdv_pool_kernel",
                               "reduce_slots_kernel"}
    assert all(len(offsets) > 1 for offsets in per_kernel.values()), per_kernel
    assert {y0 for _, y0 in per_kernel["reduce_slots_kernel"]} == {0, 1}

    assert torch.equal(split_out, whole_out)
    for name, split, whole in zip(tensors, split_grads, whole_grads):
        assert torch.equal(split, whole), f"d{name} changed when the launches were split"
    ref_out, ref_grads = run({n: t.double() for n, t in tensors.items()}, extra, case, None, grad_out.double())
    base_out, base_grads = run(tensors, extra, case, None, grad_out, upcast=False)
    assert_within_rule("out", split_out, ref_out, base_out, 2, dtype)
    for name, grad, ref, base in zip(tensors, split_grads, ref_grads, base_grads):
        assert_within_rule(f"d{name}", grad, ref, base, 3, dtype)
