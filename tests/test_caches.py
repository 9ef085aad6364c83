"""Memory injection on every cache and rotary embedding transformers can hand a layer (issue 10).

References: an uncached greedy recomputation (a full forward over the growing sequence at every step) of
each row alone, and the unpatched model for rows without memory. Never PEFT's `generate`.
"""
from __future__ import annotations

import inspect

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from fastmem import MemoryBank, inject, patch
from fastmem.hf.context import key_layout
from fastmem.hf.support import HANDLED_CACHE_LAYERS, REFUSED_CACHE_LAYERS
from test_patch import ATOL, KINDS, TINY, greedy_uncached, make_batch, make_model, max_diff

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning",
                                         "ignore::DeprecationWarning"),
              pytest.mark.usefixtures("one_thread")]

V5 = Version(transformers.__version__) >= Version("5.0.0")
NEW_TOKENS = 4
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="transformers offloads caches with CUDA streams")


def tiny(arch: str, **overrides):
    """`make_model` with config overrides, patched."""
    return patch(make_model(arch, **overrides))


def generate(model, ids, mask, **kwargs):
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                         pad_token_id=0, eos_token_id=None, **kwargs)
    return out[:, ids.shape[1]:]


def rows_alone(model, bank, index, rows) -> list[torch.Tensor]:
    """Each row's uncached greedy tokens, the row alone with its own memory."""
    expected = []
    for b, row in enumerate(rows):
        with inject(model, bank, index[b:b + 1]):
            expected.append(greedy_uncached(model, row, NEW_TOKENS))
    return expected


def bank_for(model, kind: str, seed: int = 3):
    torch.manual_seed(seed)
    bank = KINDS[kind][0](model, slots=3, length=3)
    bank.lengths[1] = 1
    return bank


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("keyword", ["cache", "past_key_values"])
def test_cache_under_either_keyword_continues_exactly(keyword, kind):
    """transformers 5.24 hands the cache to forward as ``cache=``; 5.23 and older as ``past_key_values=``."""
    model = tiny("llama")
    if keyword == "cache" and "cache" not in inspect.signature(model.forward).parameters:
        pytest.skip("this transformers has no cache= keyword")
    torch.manual_seed(3)
    bank = KINDS[kind][0](model, slots=1, length=1)
    with inject(model, bank, torch.tensor([0])), torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(input_ids=torch.tensor([[5, 6]]), use_cache=True, **{keyword: cache})
        step = model(input_ids=torch.tensor([[7]]), use_cache=True, **{keyword: cache}).logits[0, -1]
        full = model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=False).logits[0, -1]
    assert max_diff(step, full) < ATOL


@pytest.mark.parametrize("kind", KINDS)
def test_a_mask_over_the_new_tokens_only_is_refused_with_a_cache(kind):
    """With a cache, a 2-D mask must cover the cached and the new tokens (as generate builds it): one over the
    new tokens only gave silently wrong logits (plain transformers is wrong too), now a clear error; the
    right mask continues exactly."""
    model = tiny("llama")
    torch.manual_seed(3)
    bank = KINDS[kind][0](model, slots=1, length=2)
    with inject(model, bank, torch.tensor([0])), torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(input_ids=torch.tensor([[5, 6]]), attention_mask=torch.ones(1, 2, dtype=torch.long), use_cache=True,
              past_key_values=cache)
        with pytest.raises(ValueError, match="describes 0 earlier positions, but the cache holds 2"):
            model(input_ids=torch.tensor([[7]]), attention_mask=torch.ones(1, 1, dtype=torch.long), use_cache=True,
                  past_key_values=cache)
        step = model(input_ids=torch.tensor([[7]]), attention_mask=torch.ones(1, 3, dtype=torch.long),
                     use_cache=True, past_key_values=cache).logits[0, -1]
        full = model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=False).logits[0, -1]
    assert max_diff(step, full) < ATOL


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cache", ["dynamic", "static", pytest.param("offloaded", marks=NEEDS_CUDA),
                                   pytest.param("offloaded_static", marks=NEEDS_CUDA)])
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma3_text"])
def test_generate_under_each_cache_equals_rows_alone(arch, cache, kind):
    """Left-padded rows with distinct, shorter and no memory: greedy `generate` under the cache equals each
    row's uncached recomputation alone. Mistral's window (16) covers every row here; Gemma 3 has a sliding
    and a full layer (a hybrid cache)."""
    model = tiny(arch, sliding_window=16)
    bank = bank_for(model, kind)
    index = torch.tensor([0, -1, 1])
    ids, mask, _, rows = make_batch([2, 3, 1])
    with inject(model, bank, index):
        generated = generate(model, ids, mask, cache_implementation=cache)
    for b, expected in enumerate(rows_alone(model, bank, index, rows)):
        assert torch.equal(generated[b:b + 1], expected), f"row {b}"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_static_cache_without_padding_equals_uncached(arch, kind):
    """Unpadded rows (one row; two of equal length): the layers get no mask at the static cache's prefill, so the
    keys past the prompt are the buffer's unfilled slots, which must stay invisible."""
    model = tiny(arch, sliding_window=16)
    bank = bank_for(model, kind)
    for lengths, index in (([3], torch.tensor([0])), ([3, 3], torch.tensor([1, 0]))):
        ids, mask, _, rows = make_batch(lengths)
        with inject(model, bank, index):
            generated = generate(model, ids, mask, cache_implementation="static")
        for b, expected in enumerate(rows_alone(model, bank, index, rows)):
            assert torch.equal(generated[b:b + 1], expected), f"{lengths} row {b}"


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_sliding_window_without_memory_equals_unpatched(cache):
    """Mistral, window 3, rows of 2 and 1 tokens, no memory: past the window the patched model must still be the
    unpatched one (the cache hands only the window's keys; the padding offset must follow)."""
    torch.manual_seed(0)
    config = AutoConfig.for_model("mistral", **{**TINY, "sliding_window": 3})
    plain = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    ids, mask, _, _ = make_batch([2, 1])
    expected = generate(plain, ids, mask, cache_implementation=cache)
    patch(plain)
    bank = MemoryBank.prefixes(plain, slots=1, length=2)
    with inject(plain, bank, torch.tensor([-1, -1])):
        assert torch.equal(generate(plain, ids, mask, cache_implementation=cache), expected)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_sliding_window_mixed_batch(cache):
    """Window 8: a memory row that fits (2 memory + 2 tokens + 4 new) next to a row without memory that
    outgrows the window (6 + 4): each equals its reference alone; a memory row that would not fit is refused."""
    model = tiny("mistral", sliding_window=8)
    bank = MemoryBank.prefixes(model, slots=1, length=2)
    torch.manual_seed(4)
    with torch.no_grad():
        bank.keys.normal_()
        bank.values.normal_()
    index = torch.tensor([0, -1])
    ids, mask, _, rows = make_batch([2, 6])
    with inject(model, bank, index):
        generated = generate(model, ids, mask, cache_implementation=cache)
    for b, expected in enumerate(rows_alone(model, bank, index, rows)):
        assert torch.equal(generated[b:b + 1], expected), f"row {b}"
    long_ids, long_mask, _, _ = make_batch([4, 6])
    with inject(model, bank, index), pytest.raises(ValueError, match="sliding window of 8"):
        generate(model, long_ids, long_mask, cache_implementation=cache)


def test_quantized_fp8_cache_refused_with_memory_and_unchanged_without():
    """The fp8 cache quantizes the whole batch with one scale: refused before any compute when a row has memory;
    without memory the patched model equals the unpatched one under the same cache."""
    if "Fp8QuantizedLayer" not in dir(transformers.cache_utils):
        pytest.skip("this transformers has no fp8 cache")
    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **TINY), attn_implementation="sdpa").eval()
    ids, mask, _, _ = make_batch([3, 2])
    quantized = dict(cache_implementation="quantized", cache_config={"backend": "fp8"})
    expected = generate(plain, ids, mask, **quantized)
    model = patch(plain)
    bank = MemoryBank.prefixes(model, slots=1, length=2)
    with inject(model, bank, torch.tensor([-1, -1])):
        assert torch.equal(generate(model, ids, mask, **quantized), expected)
    calls = []
    handle = model.model.layers[0].register_forward_hook(lambda *args: calls.append(1))
    with inject(model, bank, torch.tensor([0, -1])), pytest.raises(ValueError, match="Fp8QuantizedLayer"):
        generate(model, ids, mask, **quantized)
    handle.remove()
    assert not calls
    assert "Fp8QuantizedLayer" in REFUSED_CACHE_LAYERS


@pytest.mark.parametrize("kind", KINDS)
def test_quanto_quantized_cache_rows_equal_rows_alone(kind):
    """2-bit group-wise quanto cache (residual 1): quantization moves the logits by ~2e-2, yet each row of a batch
    with memory equals the row alone under the same cache (groups never span rows), and no memory = unpatched."""
    pytest.importorskip("optimum.quanto")
    if not transformers.utils.is_optimum_quanto_available():
        pytest.skip("this transformers does not accept the installed optimum-quanto")
    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **TINY), attn_implementation="sdpa").eval()
    ids, mask, _, rows = make_batch([3, 2])
    settings = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, eos_token_id=None, output_scores=True,
                    return_dict_in_generate=True, cache_implementation="quantized",
                    cache_config={"backend": "quanto", "nbits": 2, "residual_length": 1, "q_group_size": 16})
    expected = plain.generate(input_ids=ids, attention_mask=mask, **settings).sequences
    model = patch(plain)
    bank = bank_for(model, kind)
    with inject(model, bank, torch.tensor([-1, -1])):
        assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **settings).sequences, expected)
    index = torch.tensor([0, 2])
    with inject(model, bank, index):
        batch = model.generate(input_ids=ids, attention_mask=mask, **settings)
    for b, row in enumerate(rows):
        with inject(model, bank, index[b:b + 1]):
            alone = model.generate(input_ids=row[None], attention_mask=torch.ones_like(row[None]), **settings)
        assert torch.equal(batch.sequences[b, ids.shape[1]:], alone.sequences[0, len(row):])
        for step, (scores, alone_scores) in enumerate(zip(batch.scores, alone.scores)):
            assert max_diff(scores[b], alone_scores[0]) < ATOL, f"row {b} step {step}"


def test_unknown_cache_layer_is_refused_by_name_before_any_compute():
    class ChunkedLayer(transformers.cache_utils.DynamicLayer):
        pass

    model = tiny("llama")
    bank = MemoryBank.prefixes(model, slots=1, length=2)
    cache = transformers.cache_utils.Cache(layers=[ChunkedLayer() for _ in range(TINY["num_hidden_layers"])])
    calls = []
    model.model.layers[0].register_forward_hook(lambda *args: calls.append(1))
    with inject(model, bank, torch.tensor([0])), pytest.raises(ValueError, match="ChunkedLayer layers"):
        model(input_ids=torch.tensor([[5, 6]]), past_key_values=cache, use_cache=True)
    assert not calls
    assert "ChunkedLayer" not in HANDLED_CACHE_LAYERS


def rope_model(rope_type: str):
    """Tiny Phi-3 with longrope (partial rotary 0.5, switching to long factors past 4 positions), or a tiny
    Llama with dynamic NTK scaling (rescaling past 8 positions)."""
    if rope_type == "longrope":
        factors = dict(short_factor=[1.0, 1.0, 1.0, 1.0], long_factor=[2.0, 3.0, 4.0, 5.0])
        if V5:
            overrides = dict(partial_rotary_factor=0.5, original_max_position_embeddings=4, rope_parameters=dict(
                rope_type="longrope", rope_theta=10000.0, original_max_position_embeddings=4, **factors))
        else:
            overrides = dict(partial_rotary_factor=0.5, original_max_position_embeddings=4,
                             rope_scaling=dict(type="longrope", **factors))
        return tiny("phi3", **overrides), 4
    scaling = dict(rope_type="dynamic", factor=4.0)
    overrides = (dict(rope_parameters={**scaling, "rope_theta": 10000.0}) if V5 else dict(rope_scaling=scaling))
    return tiny("llama", max_position_embeddings=8, **overrides), 7


@pytest.mark.parametrize("rope_type", ["longrope", "dynamic"])
def test_batch_dependent_rope_rows_stay_independent_or_are_refused(rope_type):
    """Below the switch point every row equals itself alone; a batch whose memory reaches past it is refused
    before a row can change another's rotary embedding, in a forward and in a cached generation."""
    model, limit = rope_model(rope_type)
    bank = MemoryBank.prefixes(model, slots=2, length=limit)
    torch.manual_seed(5)
    with torch.no_grad():
        bank.keys.normal_()
        bank.values.normal_()
    bank.lengths[1] = 1
    index = torch.tensor([1, -1])
    ids, mask, _, rows = make_batch([2, 2])                     # row 0: positions 0..2 with its 1 memory position
    with inject(model, bank, index):
        out = model(input_ids=ids, attention_mask=mask).logits
    for b, row in enumerate(rows):
        with inject(model, bank, index[b:b + 1]):
            assert max_diff(out[b], model(input_ids=row[None]).logits[0]) < ATOL
    with inject(model, bank, torch.tensor([0, -1])), pytest.raises(ValueError, match=rope_type):
        model(input_ids=ids, attention_mask=mask)               # memory of `limit` positions + 2 tokens
    with inject(model, bank, index), pytest.raises(ValueError, match=rope_type):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=limit, do_sample=False, pad_token_id=0)


def test_key_layout_reads_static_padding_windows_and_flash_masks():
    """The layout fastmem reads off a layer's mask: used keys of a static buffer, left padding, a 2-D flash
    mask, and a custom mask that is not one run of keys (flagged for memory rows only)."""
    q_len, k_len = 2, 6
    keys, queries = torch.arange(k_len), torch.arange(q_len)
    own = queries + 2                                     # 4 filled keys: positions 0..3, the queries at 2 and 3
    starts = torch.tensor([0, 2])
    visible = (keys >= starts[:, None, None]) & (keys <= own[:, None])      # [B, Tq, Tk], slots 4, 5 unfilled
    layout = key_layout(visible[:, None], 2, q_len, k_len, torch.tensor([3, 0]))
    assert layout.used == 4 and layout.key_start.tolist() == [0, 2] and not layout.mismatched
    assert layout.longest_span == 3 + 4
    float_mask = torch.where(visible, 0.0, torch.finfo(torch.float32).min)[:, None]
    assert key_layout(float_mask, 2, q_len, k_len, torch.tensor([3, 0])).key_start.tolist() == [0, 2]
    flash = key_layout(torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]]), 2, q_len, k_len, torch.tensor([1, 1]))
    assert flash.used == k_len and flash.key_start.tolist() == [0, 2] and not flash.mismatched
    holed = visible.clone()
    holed[1, 1, 2] = False                                # a hole inside row 1's keys
    assert not key_layout(holed[:, None], 2, q_len, k_len, torch.tensor([3, 0])).mismatched
    assert key_layout(holed[:, None], 2, q_len, k_len, torch.tensor([3, 2])).mismatched
    with pytest.raises(TypeError, match="dense attention mask"):
        key_layout(object(), 2, q_len, k_len, torch.tensor([1, 1]))
