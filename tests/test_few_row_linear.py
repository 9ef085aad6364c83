"""The few-row linear kernel (csrc/few_row_linear_cpu.cpp, every CPU build this machine runs) against
``F.linear`` in fp64, its thread pool, and the `few_row_linears` context on a plain torch model."""
from __future__ import annotations

import copy
import multiprocessing
import threading

import pytest
import torch
import torch.nn.functional as F
from test_prefix_attention import cpu_build, native_cpu_builds  # noqa: F401  (fixture)

from fastmem.ops import native
from fastmem.ops.linear import MAX_ROWS, few_row_linear, few_row_linears

pytestmark = pytest.mark.skipif(not native.is_available(), reason="native backend unavailable")

# (rows, in, out): tails of every kind (rows % 4, in % 16 and % 8, out % 4 and % 64), 1s, the model's sizes
SHAPES = [(1, 1, 1), (3, 7, 5), (4, 16, 4), (5, 100, 130), (8, 576, 192), (17, 64, 65), (MAX_ROWS, 40, 9),
          (2, 1536, 576)]


def error_bound(x, weight, bias):
    """What torch's own fp32 F.linear errs by against fp64 on these inputs: the kernel may err twice that
    (plus a floor of a few ulps of the output's size for the shapes where torch happens to be exact)."""
    exact = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    torch_error = (F.linear(x, weight, bias).double() - exact).abs().max().item()
    scale = (x.double().abs() @ weight.double().abs().T).max().item()
    return exact, 2 * torch_error + 4 * torch.finfo(torch.float32).eps * scale


@pytest.mark.parametrize("cpu_build", native_cpu_builds(), indirect=True)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
def test_matches_fp64_reference(cpu_build, shape, with_bias):
    rows, features_in, features_out = shape
    generator = torch.Generator().manual_seed(rows * 1000 + features_in)
    x = torch.randn(rows, features_in, generator=generator)
    weight = torch.randn(features_out, features_in, generator=generator)
    bias = torch.randn(features_out, generator=generator) if with_bias else None
    exact, bound = error_bound(x, weight, bias)
    out = few_row_linear(x, weight, bias)
    assert out.shape == (rows, features_out) and out.dtype == torch.float32
    assert (out.double() - exact).abs().max().item() <= bound


def test_strided_inputs_and_leading_dims():
    """x as a [B, T, in] slice of a wider tensor, the weight as a slice of a wider one: strides honoured."""
    base = torch.randn(3, 2, 50)
    x = base[:, :, 5:45]                           # row stride 50, not 40
    weight_base = torch.randn(11, 64)
    weight = weight_base[:, 8:48]                  # row stride 64
    exact, bound = error_bound(x.reshape(-1, 40), weight, None)
    out = few_row_linear(x, weight)
    assert out.shape == (3, 2, 11)
    assert (out.reshape(-1, 11).double() - exact).abs().max().item() <= bound


def test_bits_do_not_depend_on_threads_or_on_the_other_rows():
    x = torch.randn(9, 300)
    weight = torch.randn(700, 300)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = few_row_linear(x, weight)
        torch.set_num_threads(4)
        four = few_row_linear(x, weight)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, four)
    assert torch.equal(few_row_linear(x[3:4], weight), one[3:4])


def test_bad_input_is_refused():
    x, weight = torch.randn(2, 8), torch.randn(3, 8)
    with pytest.raises(TypeError, match="fp32 CPU"):
        few_row_linear(x.double(), weight)
    with pytest.raises(TypeError, match="fp32 CPU"):
        few_row_linear(x, weight.half())
    with pytest.raises(ValueError, match="do not match"):
        few_row_linear(torch.randn(2, 9), weight)
    with pytest.raises(ValueError, match="bias"):
        few_row_linear(x, weight, torch.randn(4))
    with pytest.raises(ValueError, match="not differentiable"):
        few_row_linear(x, weight.requires_grad_())
    assert few_row_linear(torch.randn(0, 8), torch.randn(3, 8)).shape == (0, 3)


def test_concurrent_calls_from_threads_are_each_right():
    """Two Python threads call the kernel at once (the GIL is released): one uses the worker pool, the
    other runs on its own thread; both results are right."""
    weights = [torch.randn(4096, 256) for _ in range(2)]
    xs = [torch.randn(8, 256) for _ in range(2)]
    expected = [few_row_linear(x, w) for x, w in zip(xs, weights)]
    failures = []

    def call(i):
        for _ in range(20):
            if not torch.equal(few_row_linear(xs[i], weights[i]), expected[i]):
                failures.append(i)

    workers = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert not failures


def _call_in_child(queue):
    torch.set_num_threads(2)
    x, weight = torch.ones(2, 64), torch.ones(300, 64)
    queue.put(bool((few_row_linear(x, weight) == 64).all()))


def test_a_forked_child_gets_its_own_worker_pool():
    """The parent's pool threads do not exist in a forked child: the child starts its own (a child that
    waited on the parent's would hang)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        few_row_linear(torch.ones(2, 64), torch.ones(300, 64))   # the parent's pool exists
    finally:
        torch.set_num_threads(threads)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_call_in_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0 and queue.get(timeout=5) is True


class _Counting:
    def __init__(self, monkeypatch):
        self.calls = 0
        original = native.few_row_linear

        def counted(*args):
            self.calls += 1
            return original(*args)
        monkeypatch.setattr(native, "few_row_linear", counted)


def test_context_runs_the_kernel_at_few_rows_only_and_restores_the_layers(monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(48, 96), torch.nn.GELU(), torch.nn.Linear(96, 32, bias=False),
                                torch.nn.Linear(32, 16).to(torch.bfloat16)).eval().requires_grad_(False)
    fp32 = model[:3]
    counting = _Counting(monkeypatch)
    few = torch.randn(5, 48)
    many = torch.randn(MAX_ROWS + 1, 48)
    with few_row_linears(model):
        assert "forward" in model[0].__dict__ and "forward" not in model[3].__dict__   # bf16 layer left alone
        out_few = fp32(few)
        assert counting.calls == 2
        out_many = fp32(many)
        assert counting.calls == 2                                                    # above MAX_ROWS: F.linear
    assert all("forward" not in layer.__dict__ for layer in model)
    exact = copy.deepcopy(fp32).double()(few.double())
    assert (out_few.double() - exact).abs().max().item() < 1e-4
    assert torch.equal(out_many, fp32(many))


def test_context_leaves_gradients_and_other_forwards_alone(monkeypatch):
    layer = torch.nn.Linear(16, 8)                       # trainable: its weight requires grad
    hooked = torch.nn.Linear(16, 8).requires_grad_(False)
    own_forward = hooked.forward
    hooked.forward = lambda x: own_forward(x) * 0        # a wrapper of another library
    counting = _Counting(monkeypatch)
    x = torch.randn(2, 16, requires_grad=True)
    with few_row_linears(torch.nn.ModuleList([layer, hooked])):
        layer(x).sum().backward()                        # records a gradient: F.linear
        assert counting.calls == 0 and x.grad is not None
        assert not hooked(x.detach()).any()
        with torch.inference_mode():                     # the trainable layer, nothing to record: the kernel
            out = layer(x.detach())
        assert counting.calls == 1
    assert torch.allclose(out, F.linear(x.detach(), layer.weight, layer.bias), atol=1e-6)
    assert hooked.__dict__["forward"] is not own_forward   # the wrapper is still there


def test_a_layer_changed_inside_the_context_falls_back(monkeypatch):
    """A layer moved to another dtype after the context installed its forward is never handed to the kernel
    (which would read bf16 memory as fp32)."""
    layer = torch.nn.Linear(32, 8).requires_grad_(False)
    counting = _Counting(monkeypatch)
    with few_row_linears(layer), torch.no_grad():
        layer.to(torch.bfloat16)
        out = layer(torch.randn(2, 32, dtype=torch.bfloat16))
    assert counting.calls == 0 and out.dtype == torch.bfloat16


def test_context_restores_the_layers_after_an_error():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4)).requires_grad_(False)
    with pytest.raises(RuntimeError, match="boom"):
        with few_row_linears(model):
            raise RuntimeError("boom")
    assert "forward" not in model[0].__dict__
