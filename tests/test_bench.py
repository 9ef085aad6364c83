"""bench/throughput.py: its smallest configuration reports every row, its baselines compute what fastmem
computes, and bad requests fail with one clear line. Nothing here is timed."""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `bench` is a folder of the repository, not part of the installed package

from bench import throughput  # noqa: E402
from bench.baselines import concat_cache_decode, peft_prefix_attention  # noqa: E402
from bench.harness import CPU_PEAK_SUPPORTED, PEAK_RSS_ENV  # noqa: E402
from fastmem.kernels.prefix_attention_ref import prefix_attention_ref  # noqa: E402
from fastmem.ops import backends  # noqa: E402


def fastmem_providers() -> set[str]:
    """The fastmem rows a CPU run must have: torch, and native when built (Triton's interpreter is no rival)."""
    return {f"fastmem[{name}]" for name in ("torch", "native") if backends.unavailable_reason(name) is None}


def test_smoke_run_reports_every_row(tmp_path):
    """The smoke configuration of every section, in this process: every row, target, figure and curve."""
    json_path, plot_path = tmp_path / "report.json", tmp_path / "sweeps.png"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        throughput.main(["--smoke", "--device", "cpu", "--threads", str(torch.get_num_threads()),
                         "--json", str(json_path), "--plot", str(plot_path)])
    report, table = json.loads(json_path.read_text()), stdout.getvalue()
    rows = report["rows"]

    fastmem_rows = fastmem_providers()
    auto = f"fastmem[{report['environment']['auto_backend']}]"
    assert "fastmem[torch]" in fastmem_rows and auto in fastmem_rows
    expected = {("ceiling", "torch", "fwd")}
    expected |= {("attention", provider, mode) for provider in {"PEFT way"} | fastmem_rows
                 for mode in ("fwd", "fwd+bwd")}
    expected |= {("decode", provider, "fwd") for provider in {"concat cache"} | fastmem_rows}
    assert {(row["section"], row["provider"], row["mode"]) for row in rows} == expected
    assert {row["case"] for row in rows if row["section"] == "attention"} == {"distinct slots", "2 rows/slot"}
    assert len(rows) == 1 + 2 * 2 * (1 + len(fastmem_rows)) + (1 + len(fastmem_rows))
    for row in rows:
        assert f"| {row['section']} | {row['case']} | {row['provider']} | {row['mode']} |" in table
        assert row["median_ms"] > 0 and row["gflops_per_s"] > 0
        if row["baseline"] not in (None, row["provider"]):  # fastmem computed what its baseline computed
            assert row["max_abs_diff_vs_baseline"] < 1e-4, row["id"]

    assert {row["provider"] for row in rows if row["targets"]} == {auto}
    # One summary line per target: speedup and ceiling for 2 attention workloads x 2 modes, speedup for decode.
    summary = [line for line in table.splitlines() if line.startswith("- ") and "; target >=" in line]
    assert len(summary) == 2 * 2 * 2 + 1
    for key in ("date", "device_name", "cpu_model", "threads", "torch", "triton", "transformers"):
        assert key in report["environment"]

    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [sweep["x_label"] for sweep in report["sweeps"]] == ["prefix length P", "rows per slot"]
    for sweep in report["sweeps"]:
        for point in sweep["points"]:
            assert {row["provider"] for row in point["rows"]} == {"PEFT way", auto}


def _float64_leaves(*shapes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator, dtype=torch.float64, requires_grad=True) for shape in shapes]


@pytest.mark.parametrize("prefix_index, prefix_lens", [
    ([[3], [3], [0], [1]], None),                                     # shared slots, full lens
    ([[0, 2], [2, -1], [-1, 1], [1, 1]], [5, 0, 3, 5]),               # two uses, unused entries, short slots
])
def test_peft_way_matches_the_reference(prefix_index, prefix_lens):
    batch, seq_len, q_heads, kv_heads, head_dim, slots, prefix_len = 4, 6, 4, 2, 16, 4, 5
    leaves = _float64_leaves((batch, seq_len, q_heads, head_dim), (batch, seq_len, kv_heads, head_dim),
                             (batch, seq_len, kv_heads, head_dim), (slots, prefix_len, kv_heads, head_dim),
                             (slots, prefix_len, kv_heads, head_dim))
    index = torch.tensor(prefix_index)
    lens = None if prefix_lens is None else torch.tensor(prefix_lens)
    grad_out = torch.randn(batch, seq_len, q_heads, head_dim, dtype=torch.float64)
    results = []
    for attention in (peft_prefix_attention, prefix_attention_ref):
        out = attention(*leaves, index, lens, causal=True)
        results.append((out, *torch.autograd.grad(out, leaves, grad_out)))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


def test_decode_baseline_matches_the_reference_on_the_benchmarks_pool():
    settings = throughput.Settings(torch.device("cpu"), torch.float64)
    x = throughput.decode_workload(settings, throughput.SMOKE_DECODE_SHAPE).make_inputs()
    baseline = concat_cache_decode(x["q"], x["memory_k"], x["memory_v"], x["prompt_k"], x["prompt_v"],
                                   x["cache_k"], x["cache_v"])
    reference = prefix_attention_ref(x["q"], x["cache_k"], x["cache_v"], x["pool_k"], x["pool_v"],
                                     x["pool_index"], x["pool_lens"])
    torch.testing.assert_close(baseline, reference)


def test_unknown_section_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        throughput.main(["--only", "attention,bogus"])
    assert exit_info.value.code != 0
    error = capsys.readouterr().err
    assert "'bogus'" in error and "sections: attention, decode" in error


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error a machine without a GPU gives")
def test_cuda_without_a_gpu_is_one_line():
    with pytest.raises(SystemExit) as exit_info:
        throughput.main(["--device", "cuda"])
    message = exit_info.value.code  # printed to stderr by Python, exit status 1, no traceback
    assert isinstance(message, str) and "\n" not in message and "needs a CUDA GPU" in message


@pytest.mark.skipif(not CPU_PEAK_SUPPORTED, reason="CPU peak memory is read from Linux's /proc")
def test_memory_child_prints_the_peak_of_one_case():
    """The CPU ceiling case, a 2048 x 2048 fp32 matmul, adds its 16 MiB output (RSS counting lags by a few
    hundred KiB: too coarse for the smoke shapes)."""
    done = subprocess.run([sys.executable, str(REPO / "bench" / "throughput.py"), "--device", "cpu",
                           "--measure-memory", "ceiling:matmul 2048x2048 float32:torch:fwd"],
                          env={**os.environ, **PEAK_RSS_ENV}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert abs(int(done.stdout) - 16 * 2**20) < 2**20
