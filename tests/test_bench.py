"""bench/throughput.py: its smallest configuration reports every row, its baselines compute what fastmem
computes (attention, decode, training gradients, greedy sampling, the loop's retrieval keys), and bad
requests fail with one clear line. Nothing here is timed."""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `bench` is a folder of the repository, not part of the installed package

from bench import harness, learning, linear, ranks, real, throughput  # noqa: E402
from bench import store as bench_store  # noqa: E402
from bench.baselines import (concat_cache_decode, mean_hidden_state, peft_online_loop,  # noqa: E402
                             peft_prefix_attention, prompt_weight, trace_batch)
from bench.harness import CPU_PEAK_SUPPORTED, PEAK_RSS_ENV  # noqa: E402
from fastmem.kernels.prefix_attention_ref import prefix_attention_ref  # noqa: E402
from fastmem.ops import backends, native  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


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
    expected |= {("attention", provider, "fwd") for provider in (throughput.ONE_OFF, throughput.PLANNED)}
    expected |= {("decode", provider, "fwd") for provider in {"concat cache"} | fastmem_rows}
    end_to_end = {("train", "PEFT prompt tuning (one problem at a time)"),
                  ("train", "PEFT prefix tuning (one problem at a time)"), ("train", "fastmem MemoryTrainer"),
                  ("sample", "HF generate + PEFT prompt tuning (one prompt at a time)"), ("sample", "fastmem.sample"),
                  ("loop", "HF + PEFT prefix tuning loop (one problem at a time)"), ("loop", "fastmem OnlineLearner"),
                  ("loop", ranks.ONE_PROCESS), ("loop", ranks.TWO_PROCESSES)}
    expected |= {(section, provider, "end-to-end") for section, provider in end_to_end}
    linear_providers = (linear.BASELINE, linear.FASTMEM) if native.is_available() else ()
    expected |= {("linear", provider, "fwd") for provider in linear_providers}
    expected |= {("bandwidth", "torch", "fwd")}   # the linear section's roofline needs it
    assert {(row["section"], row["provider"], row["mode"]) for row in rows} == expected
    assert {row["case"] for row in rows if row["section"] == "attention"} == {
        "distinct slots", "2 rows/slot", throughput.LAYER_CALL_CASE}
    linear_rows = len(linear_providers) * len(linear.SMOKE_ROWS)
    assert len(rows) == 2 + 2 * 2 * (1 + len(fastmem_rows)) + 2 + (1 + len(fastmem_rows)) + linear_rows + 2 * 2 + 2 + 2 + 2
    host_line = [line for line in table.splitlines() if "host time per prefix_attention layer call" in line]
    assert len(host_line) == 1 and " µs one-off " in host_line[0] and " µs with the forward's plan reused " in host_line[0]
    assert ("CUDA: run with --device cuda" if torch.cuda.is_available() else "CUDA: not timed: no GPU") in host_line[0]
    for row in rows:
        assert f"| {row['section']} | {row['case']} | {row['provider']} | {row['mode']} |" in table
        assert row["median_ms"] > 0
        if row["mode"] == "end-to-end":  # a rate of work (problems or tokens per second), no FLOP count
            assert row["rate_per_s"] > 0 and row["rate_unit"] in ("problems", "tokens") and row["flops"] is None
            assert f" {row['rate_unit']}/s |" in table
        elif row["section"] == "bandwidth":  # a copy: bytes, no FLOPs
            assert row["gflops_per_s"] is None and row["roofline_fraction"] == pytest.approx(1.0)
        else:
            assert row["gflops_per_s"] > 0 and row["rate_per_s"] is None
        if row["baseline"] not in (None, row["provider"]) and row["section"] not in ("sample", "loop"):
            assert row["max_abs_diff_vs_baseline"] < 1e-4, row["id"]  # fastmem computed what its baseline did
        if row["provider"] == ranks.TWO_PROCESSES:  # the same per-problem random streams on 1 and 2 ranks
            assert row["max_abs_diff_vs_baseline"] == 0
        elif row["section"] in ("sample", "loop"):  # random samples: not compared
            assert row["max_abs_diff_vs_baseline"] is None
    assert {row["case"] for row in rows if row["section"] == "train"} == {
        "3 problems, soft prompt; random Llama 64x2", "3 problems, prefix; random Llama 64x2"}
    assert all(row["shape"]["model"]["name"] for row in rows if row["mode"] == "end-to-end")

    assert {row["provider"] for row in rows if row["targets"]} == {
        auto, "fastmem MemoryTrainer", "fastmem.sample", "fastmem OnlineLearner", ranks.TWO_PROCESSES,
        *linear_providers[1:]}
    # One summary line per target: speedup, ceiling and (on CPU) FLOP efficiency against SDPA's for 2 attention
    # workloads x 2 modes, speedup for decode, for both train workloads, for sample and for loop (against PEFT,
    # and 2 processes against 1), and for the few-row linear at each smoke row count (all within MAX_ROWS).
    summary = [line for line in table.splitlines() if line.startswith("- ") and "; target >=" in line]
    assert len(summary) == 2 * 2 * 3 + 1 + 2 + 1 + 2 + linear_rows // 2
    assert sum("the PEFT way's" in line and "on the FLOPs it executes" in line for line in summary) == 4
    assert sum("problems/s); target" in line for line in summary) == 4
    assert sum("tokens/s); target" in line for line in summary) == 1
    for name in ("train", "sample", "loop"):
        assert f"- {report['notes'][name]}." in table
    assert report["end_to_end_timing"]["threads"] == 1 and "(train, sample, loop): 1 thread(s)" in table
    for key in ("date", "device_name", "cpu_model", "threads", "torch", "triton", "transformers"):
        assert key in report["environment"]

    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [sweep["x_label"] for sweep in report["sweeps"]] == ["prefix length P", "rows per slot"]
    for sweep in report["sweeps"]:
        for point in sweep["points"]:
            assert {row["provider"] for row in point["rows"]} == {"PEFT way", auto}


def test_real_section_smoke_reports_every_row_and_target(tmp_path):
    """`--only real --smoke` (on the shipped tiny model, never the real one): the ceiling and copy-bandwidth
    probes, the decode steps judged against their roofline, sample against both baselines, train with its
    utilization, the loop; every target line; the section's own threads and timing."""
    json_path = tmp_path / "report.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        throughput.main(["--smoke", "--only", "real", "--device", "cpu", "--threads", "1", "--json", str(json_path)])
    report, table = json.loads(json_path.read_text()), stdout.getvalue()
    rows = report["rows"]
    assert [(row["section"], row["provider"]) for row in rows] == [
        ("ceiling", "torch"), ("bandwidth", "torch"),
        ("real", real.FASTMEM_DECODE), ("real", real.FASTMEM_DECODE),
        ("real", real.PEFT_SAMPLE), ("real", real.BATCH_SAMPLE), ("real", real.FASTMEM_SAMPLE),
        ("real", "PEFT prefix tuning (one problem at a time)"), ("real", "fastmem MemoryTrainer"),
        ("real", "HF + PEFT prefix tuning loop (one problem at a time)"), ("real", "fastmem OnlineLearner")]
    assert all(row["shape"]["model"]["name"] == "default model (Llama 128x3, 0.45M)" for row in rows[2:])
    assert report["copy_bandwidth_gb_per_s"] > 0 and report["ceiling_gflops_per_s"] > 0
    decode = [row for row in rows if row["provider"] == real.FASTMEM_DECODE]
    assert [row["shape"]["rows"] for row in decode] == list(real.SMOKE.decode_rows)
    for row in decode:
        bound_ms = max(row["bytes_read"] / report["copy_bandwidth_gb_per_s"] / 1e6,
                       row["flops"] / report["ceiling_gflops_per_s"] / 1e6)
        assert row["bound_ms"] == pytest.approx(bound_ms)
        assert row["roofline_fraction"] == pytest.approx(bound_ms / row["median_ms"])
        assert [t["metric"] for t in row["targets"]] == ["roofline"]
    sample = {row["provider"]: row for row in rows if row["case"].startswith("sample")}
    fastmem_sample = sample[real.FASTMEM_SAMPLE]
    assert fastmem_sample["baseline"] == real.PEFT_SAMPLE
    assert [(t["metric"], t["against"]) for t in fastmem_sample["targets"]] == [
        ("speedup", None), ("speedup", real.BATCH_SAMPLE)]
    assert fastmem_sample["targets"][1]["value"] == pytest.approx(
        sample[real.BATCH_SAMPLE]["median_ms"] / fastmem_sample["median_ms"])
    train = next(row for row in rows if row["provider"] == "fastmem MemoryTrainer")
    assert [t["metric"] for t in train["targets"]] == ["speedup", "ceiling"] and train["flops"] > 0
    summary = [line for line in table.splitlines() if line.startswith("- real /") and "; target >=" in line]
    assert len(summary) == 2 + 2 + 2 + 1
    assert "MISSED" in table or "met" in table
    assert report["section_timing"]["real"]["threads"] == 1 and f"- {report['notes']['real']}." in table
    assert "copy bandwidth" in table and "% of roofline" in table


def test_store_section_smoke_reports_every_row(tmp_path):
    """`--only store --smoke`: fill, save, search, load (and RSS for fastmem) of the new store and the old one
    (from git), with a rate of adds; an absolute target renders as met or missed."""
    json_path = tmp_path / "report.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        throughput.main(["--smoke", "--only", "store", "--device", "cpu", "--threads", "1", "--json", str(json_path)])
    report, table = json.loads(json_path.read_text()), stdout.getvalue()
    rows = [row for row in report["rows"] if row["section"] == "store"]
    steps = ["fill, save per 100", "save 100 new", "search 1 query, top 2", "load"]
    assert [(row["provider"], row["case"].split(": ")[1]) for row in rows] == [
        *(("fastmem", step) for step in steps), ("fastmem", "RSS growth / keys index (0.1 MB)"),
        *((f"old store ({bench_store.OLD_STORE_REV})", step) for step in steps), ("fastmem", steps[2])]
    assert rows[-1]["case"].startswith("2,000 keys [128], index='ivf'")
    assert all(row["median_ms"] > 0 for row in rows if "RSS" not in row["case"])
    assert rows[0]["rate_unit"] == "adds" and rows[0]["rate_per_s"] == pytest.approx(300 / rows[0]["median_ms"] * 1e3)
    assert rows[4]["peak_mb"] > 0 and "recall@10" in report["notes"]["store"]
    assert f"| store | {rows[0]['case']} | fastmem | end-to-end |" in table
    met, missed = (bench_store.row("x", "fastmem", [1.0], targets=[bench_store.limit("search p50", value, 5, "ms")])
                   for value in (4, 7))
    assert [line.split("; ")[-1] for line in harness.target_lines([met, missed])] == [
        "target <=5 ms: met", "target <=5 ms: MISSED by 2 ms"]


def test_real_flop_count_of_a_token():
    """`ModelCounts` of a tiny Llama: its decoder's linear weights, its head, every parameter's bytes once."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, tie_word_embeddings=True)
    counts = real.ModelCounts.of(LlamaForCausalLM(config))
    per_layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128
    assert (counts.linear, counts.head, counts.layers, counts.kv_heads, counts.head_dim) == (2 * per_layer, 6400, 2, 2, 16)
    assert counts.weight_bytes == 4 * (2 * per_layer + 6400 + 2 * 2 * 64 + 64)   # tied head counted once; norms
    assert counts.token_flops(10) == 2 * (2 * per_layer + 6400) + 4 * 4 * 16 * 10 * 2
    assert counts.kv_bytes(3) == 2 * 3 * 2 * 2 * 16 * 4


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


SMOKE_SETTINGS = throughput.Settings(torch.device("cpu"), torch.float32, smoke=True)


@pytest.mark.parametrize("kind", ["soft_prompt", "prefix"])
def test_train_baseline_gradients_equal_the_trainers(kind):
    """The first step of the train section: each problem's loss and memory gradient from PEFT, one problem at
    a time, equal the batched `MemoryTrainer.gradients` of the same memories and traces."""
    from fastmem import MemoryTrainer

    shape = learning.SMOKE_TRAIN_SHAPE
    x = learning.train_workload(SMOKE_SETTINGS, shape, kind, learning.SMOKE_LLAMA).make_inputs()
    bank = learning.bank_of(x["model"], kind, x["memories"])
    result = MemoryTrainer(x["model"], bank).gradients(
        x["prompts"], x["traces"], [[1.0] * shape.traces] * shape.problems, list(range(shape.problems)))
    weight = prompt_weight(x["peft_model"])
    for problem, (prompt, traces) in enumerate(zip(x["prompts"], x["traces"])):
        with torch.no_grad():
            weight.copy_(x["memories"][problem])
        weight.grad = None
        ids, mask, labels = trace_batch(prompt, traces, weight.device)
        loss = x["peft_model"](input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        expected = {"embeddings": weight.grad[None]} if kind == "soft_prompt" else {}
        if kind == "prefix":
            layers = weight.grad.view(1, *weight.shape[:1], bank.model_shape.num_layers, 2,
                                      bank.model_shape.num_kv_heads, bank.model_shape.head_dim)
            expected = {"keys": layers[:, :, :, 0].permute(2, 0, 1, 3, 4),
                        "values": layers[:, :, :, 1].permute(2, 0, 1, 3, 4)}
        torch.testing.assert_close(result.losses[problem], loss.detach(), rtol=2e-5, atol=1e-6)
        for name, grad in expected.items():
            got = bank.take_slots(result.grads[name], torch.tensor([problem]))
            torch.testing.assert_close(got, grad, rtol=2e-5, atol=2e-5 * grad.abs().max().item())


def test_greedy_sampling_equals_uncached_greedy_under_peft():
    """Greedy `fastmem.sample` equals greedy decoding by full uncached forwards of the sample section's PEFT
    model under the same memories (PEFT's forward is right; its cached `generate` is not on transformers
    5.24, so the timed baseline's tokens are not the reference)."""
    import fastmem

    shape = replace(learning.SMOKE_SAMPLE_SHAPE, new_tokens=6)
    x = learning.sample_workload(SMOKE_SETTINGS, shape, learning.SMOKE_LLAMA).make_inputs()
    weight = prompt_weight(x["peft_model"])
    expected = []
    for prompt, memory in zip(x["prompts"], x["memories"], strict=True):
        with torch.no_grad():
            weight.copy_(memory)
            sequence = torch.tensor([list(prompt)])
            for _ in range(shape.new_tokens):
                following = x["peft_model"](input_ids=sequence).logits[:, -1].argmax(dim=-1)
                sequence = torch.cat([sequence, following[:, None]], dim=1)
        expected.append([sequence[0, len(prompt):].tolist()])
    got = fastmem.sample(x["model"], x["prompts"], bank=x["bank"], index=torch.arange(shape.problems), n=1,
                         max_new_tokens=shape.new_tokens, temperature=0, eos_token_id=())
    assert [[s.token_ids for s in row] for row in got] == expected


def test_loop_baseline_keys_equal_the_learners_and_it_stores_every_question():
    """The loop baseline retrieves with the learner's keys (mean-pooled last hidden states of the base model,
    each question embedded alone) and stores one key and one memory per question."""
    from fastmem.data import extract_answer
    from fastmem.learner import OnlineLearner
    from fastmem.store import MemoryStore
    from fastmem.voting import majority_vote

    shape = learning.SMOKE_LOOP_SHAPE
    x = learning.loop_workload(SMOKE_SETTINGS, shape).make_inputs()
    learner = OnlineLearner(x["model"], x["tokenizer"], MemoryStore(), kind="prefix")
    questions = x["questions"]
    memory_shape = x["memories"].shape[1:]
    answers, keys, memories = peft_online_loop(
        x["peft_model"], x["tokenizer"], questions, x["keys"], x["memories"],
        fresh_memory=lambda: torch.randn(memory_shape), n=shape.samples, steps=shape.steps, lr=shape.lr,
        top_k=shape.top_k, min_similarity=shape.min_similarity, max_new_tokens=shape.max_new_tokens,
        temperature=shape.temperature, extract_answer=extract_answer, vote=majority_vote)
    assert len(answers) == len(questions)
    assert keys.shape[0] == memories.shape[0] == shape.stored + len(questions)
    stored = [x["store"].meta(entry_id).question for entry_id in x["store"].ids]
    for question, key in zip(stored + questions, keys):
        torch.testing.assert_close(key, learner.embed([question])[0], rtol=1e-5, atol=1e-5)
    tokens = x["tokenizer"](questions[0], return_tensors="pt").input_ids
    torch.testing.assert_close(mean_hidden_state(x["peft_model"].get_base_model(), tokens), keys[shape.stored])


def test_unknown_section_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        throughput.main(["--only", "attention,bogus"])
    assert exit_info.value.code != 0
    error = capsys.readouterr().err
    assert "'bogus'" in error and "sections: attention, decode, linear, train, sample, loop, real" in error


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
