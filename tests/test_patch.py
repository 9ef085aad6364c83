"""fastmem.patch / inject / MemoryBank on tiny random models of every supported architecture.

Baselines: the unpatched model, PEFT's prompt and prefix tuning with the same adapter, and each row of a
mixed batch run alone. fp32 everywhere; exact equality where the same kernels run, else 2e-5.
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch
from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from fastmem import MemoryBank, inject, patch, unpatch
from fastmem.hf import ARCHITECTURES, KVPool

ATOL = 2e-5
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
EXTRA = {"qwen3": {"head_dim": 16}, "gemma": {"head_dim": 16},
         "gemma3_text": {"head_dim": 16, "layer_types": ["sliding_attention", "full_attention"], "sliding_window": 64}}
KINDS = {"soft_prompt": (MemoryBank.soft_prompts, PromptTuningConfig),
         "prefix": (MemoryBank.prefixes, PrefixTuningConfig)}
ARCHS = sorted(ARCHITECTURES)
VIRTUAL_TOKENS = 3

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning"),
              pytest.mark.usefixtures("one_thread")]




def make_model(arch: str, seed: int = 0, **overrides):
    """A frozen tiny random model in eval mode, SDPA attention; ``overrides`` replace config fields."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(arch, **{**TINY, **EXTRA.get(arch, {}), **overrides})
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    return model.requires_grad_(False)


def make_wider_llama():
    """A Llama whose hidden size and head dim differ from `make_model`'s."""
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", **{**TINY, "hidden_size": 32, "intermediate_size": 64})
    return AutoModelForCausalLM.from_config(config).eval()


def mixed_bank(model, kind: str):
    """Three slots of 4 positions, slot 1 holding only 2."""
    torch.manual_seed(3)
    bank = KINDS[kind][0](model, slots=3, length=4)
    bank.lengths[1] = 2
    return bank


MIXED_INDEX = torch.tensor([[0, 2], [1, -1], [-1, -1], [2, 0]])   # distinct, shared, -1 and repeated slots
MIXED_LENGTHS = [6, 4, 5, 3]                                        # real tokens per row (left padded)


def make_batch(lengths, seed: int = 1):
    """Left-padded ids, mask and labels (-100 on padding) ``[B, max(lengths)]``, plus the unpadded rows."""
    generator = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, TINY["vocab_size"], (n,), generator=generator) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        ids[b, width - len(row):] = row
        mask[b, width - len(row):] = 1
    return ids, mask, ids.masked_fill(mask == 0, -100), rows


def generate(model, ids, mask, **kwargs):
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                         **kwargs)
    return out[:, ids.shape[1]:]


def greedy_uncached(model, row: torch.Tensor, steps: int = 4) -> torch.Tensor:
    """``[1, steps]`` greedy tokens of one unpadded row by a full forward over the growing sequence at every
    step, no cache: the reference for ``generate`` (call it inside the row's own ``inject`` block)."""
    sequence = row[None]
    with torch.no_grad():
        for _ in range(steps):
            following = model(input_ids=sequence, use_cache=False).logits[:, -1].argmax(dim=-1)
            sequence = torch.cat([sequence, following[:, None]], dim=1)
    return sequence[:, row.shape[0]:]


def peft_baseline(model, kind: str):
    """PEFT's prompt or prefix tuning (random adapter, seeded) on a copy of the unpatched model."""
    torch.manual_seed(2)
    return get_peft_model(copy.deepcopy(model), KINDS[kind][1](task_type="CAUSAL_LM",
                                                               num_virtual_tokens=VIRTUAL_TOKENS))


def peft_gradient_in_bank_layout(peft_model, kind: str, shape) -> dict[str, torch.Tensor]:
    """PEFT's prompt-encoder gradient, rearranged like the bank's parameters (one slot)."""
    grad = peft_model.prompt_encoder["default"].embedding.weight.grad
    if kind == "soft_prompt":
        return {"embeddings": grad}
    per_layer = grad.view(VIRTUAL_TOKENS, shape.num_layers, 2, shape.num_kv_heads, shape.head_dim).transpose(0, 1)
    return {"keys": per_layer[:, :, 0], "values": per_layer[:, :, 1]}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("arch", ARCHS)
def test_patch_without_memory_changes_nothing(arch):
    model = make_model(arch)
    ids, mask, labels, _ = make_batch([6, 4])
    before = model(input_ids=ids, attention_mask=mask, labels=labels)
    generated = generate(model, ids, mask)

    assert patch(patch(model)) is model
    assert model.config._attn_implementation == "fastmem_sdpa"
    after = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert torch.equal(after.logits, before.logits) and torch.equal(after.loss, before.loss)
    assert torch.equal(generate(model, ids, mask), generated)

    unpatch(unpatch(model))
    assert model.config._attn_implementation == "sdpa"
    restored = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert torch.equal(restored.logits, before.logits) and torch.equal(restored.loss, before.loss)


@pytest.mark.parametrize("kind", KINDS)
def test_eager_attention_is_wrapped_too(kind):
    """Without memory the model's own eager attention runs; with memory the SDPA model's result."""
    eager = make_model("gemma")
    eager.set_attn_implementation("eager")
    ids, mask, labels, _ = make_batch(MIXED_LENGTHS)
    before = eager(input_ids=ids, attention_mask=mask, labels=labels)
    patch(eager)
    assert eager.config._attn_implementation == "fastmem_eager"
    assert torch.equal(eager(input_ids=ids, attention_mask=mask, labels=labels).logits, before.logits)
    sdpa = patch(make_model("gemma"))
    outputs = []
    for model in (eager, sdpa):
        with inject(model, mixed_bank(model, kind), MIXED_INDEX):
            outputs.append(model(input_ids=ids, attention_mask=mask).logits)
    real = mask.bool()                  # left-padding positions are unspecified (each attention fills its own)
    assert max_diff(outputs[0][real], outputs[1][real]) < ATOL  # soft prompts run through each model's attention
    assert unpatch(eager).config._attn_implementation == "eager"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_memory_equals_peft(arch, kind):
    """Logits, loss and bank gradients equal PEFT's with the same adapter; greedy generation equals an uncached
    recomputation (PEFT's own generate is wrong on transformers 5.24, so it is no reference)."""
    model = make_model(arch)
    peft_model = peft_baseline(model, kind)
    patch(model)
    bank = KINDS[kind][0](model, slots=2, length=VIRTUAL_TOKENS + 1).load_peft(peft_model, slot=1)
    ids, mask, labels, _ = make_batch([5, 5])
    index = torch.tensor([1, 1])

    expected = peft_model(input_ids=ids, attention_mask=mask, labels=labels)
    expected.loss.backward()
    with inject(model, bank, index):
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        generated = generate(model, ids, mask)

    virtual = VIRTUAL_TOKENS if kind == "soft_prompt" else 0
    assert out.logits.shape == ids.shape + (TINY["vocab_size"],)
    assert max_diff(out.logits, expected.logits[:, virtual:]) < ATOL
    assert max_diff(out.loss, expected.loss) < ATOL
    for name, grad in peft_gradient_in_bank_layout(peft_model, kind, bank.model_shape).items():
        bank_grad = getattr(bank, name).grad
        assert max_diff(bank_grad[bank.slot_selector(1, VIRTUAL_TOKENS)], grad) < ATOL
        bank_grad[bank.slot_selector(1, VIRTUAL_TOKENS)] = 0
        assert not bank_grad.any()      # unused slot 0 and positions beyond the adapter's length
    with inject(model, bank, index[:1]):
        for b in range(len(ids)):
            assert torch.equal(greedy_uncached(model, ids[b]), generated[b:b + 1])


class PlanCounter:
    """Counts the plans `fastmem.hf.context` builds, its `prefix_attention` calls and the decoder forwards;
    refuses a call without a plan."""

    def __init__(self, monkeypatch, model):
        from fastmem.hf import context
        self.plans, self.calls, self.forwards = [], 0, 0
        build, attend = context.plan_prefix_attention, context.prefix_attention

        def counted_build(*args, **kwargs):
            self.plans.append(build(*args, **kwargs))
            return self.plans[-1]

        def checked_attend(*args, plan=None, **kwargs):
            assert plan is self.plans[-1] and len(args) == 5 and "prefix_index" not in kwargs
            self.calls += 1
            return attend(*args, plan=plan, **kwargs)

        monkeypatch.setattr(context, "plan_prefix_attention", counted_build)
        monkeypatch.setattr(context, "prefix_attention", checked_attend)
        model.get_decoder().register_forward_pre_hook(lambda *_: setattr(self, "forwards", self.forwards + 1))


def test_one_plan_per_forward_handed_to_every_layer(monkeypatch):
    """`inject`: each forward (training, and each step of generate) checks and converts the index once, into one
    plan that both layers' calls get; built for a backward (slot-use lists) only when the memory needs gradients."""
    model = patch(make_model("llama"))
    bank = mixed_bank(model, "prefix")
    ids, mask, labels, _ = make_batch(MIXED_LENGTHS)
    counter = PlanCounter(monkeypatch, model)
    with inject(model, bank, MIXED_INDEX):
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        assert (len(counter.plans), counter.calls, counter.forwards) == (1, 2, 1)
        assert counter.plans[0].slot_offsets is not None and counter.plans[0].batch == 3   # rows with memory
        assert all(p.grad is not None for p in bank.parameters())
        with torch.no_grad():
            generate(model, ids, mask)
    assert counter.forwards == 5 and len(counter.plans) == 5 and counter.calls == 10
    assert all(plan.slot_offsets is None for plan in counter.plans[1:])


def test_soft_prompt_pass_runs_outside_the_injection_hooks():
    """A soft-prompt bank runs its prompts through the decoder alone: inside `inject`, one model call is one
    forward of the model (its hooks run once) and two of the decoder (the prompts, then the tokens)."""
    model = patch(make_model("llama"))
    bank = mixed_bank(model, "soft_prompt")
    ids, mask, labels, _ = make_batch(MIXED_LENGTHS)
    calls = {"model": 0, "decoder": 0}
    model.register_forward_pre_hook(lambda *_: calls.__setitem__("model", calls["model"] + 1))
    model.get_decoder().register_forward_pre_hook(lambda *_: calls.__setitem__("decoder", calls["decoder"] + 1))
    with inject(model, bank, MIXED_INDEX):
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert calls == {"model": 1, "decoder": 2}
    assert bank.embeddings.grad is not None


def test_soft_prompt_logits_are_softcapped_like_the_model():
    """With ``final_logit_softcapping`` (Gemma 3 may set it), the last soft-prompt position's logits (they
    predict each row's first token) are capped as the model's forward caps every logit: the loss equals PEFT's."""
    model = make_model("gemma3_text", final_logit_softcapping=0.5)
    peft_model = peft_baseline(model, "soft_prompt")
    patch(model)
    bank = MemoryBank.soft_prompts(model, slots=1, length=VIRTUAL_TOKENS).load_peft(peft_model, slot=0)
    ids, mask, labels, _ = make_batch([5, 5])
    expected = peft_model(input_ids=ids, attention_mask=mask, labels=labels)
    with inject(model, bank, torch.tensor([0, 0])):
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert max_diff(out.logits, expected.logits[:, VIRTUAL_TOKENS:]) < ATOL
    assert max_diff(out.loss, expected.loss) < ATOL


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_batch_equals_rows_alone(arch, kind):
    """Different slots, shared slots, -1 entries, a shorter slot and left padding in one batch."""
    model = patch(make_model(arch))
    bank = mixed_bank(model, kind)
    ids, mask, labels, rows = make_batch(MIXED_LENGTHS)
    with inject(model, bank, MIXED_INDEX):
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        generated = generate(model, ids, mask)

    loss_sum, terms = 0.0, 0
    for b, row in enumerate(rows):
        has_memory = bool((MIXED_INDEX[b] >= 0).any())
        with inject(model, bank, MIXED_INDEX[b:b + 1]):
            alone = model(input_ids=row[None], labels=row[None])
            assert torch.equal(greedy_uncached(model, row), generated[b:b + 1])
        assert max_diff(out.logits[b, -len(row):], alone.logits[0]) < ATOL
        if not has_memory:
            assert max_diff(alone.logits, model(input_ids=row[None]).logits) < ATOL
        row_terms = len(row) - 1 + (kind == "soft_prompt" and has_memory)
        loss_sum, terms = loss_sum + alone.loss * row_terms, terms + row_terms
    assert max_diff(out.loss, loss_sum / terms) < ATOL


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_checkpointing_gives_same_gradients(arch, kind):
    model = patch(make_model(arch)).train()
    bank = mixed_bank(model, kind)
    ids, mask, labels, _ = make_batch(MIXED_LENGTHS)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            # non-reentrant: the default from transformers 5 on, explicit for 4.x
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        bank.zero_grad()
        with inject(model, bank, MIXED_INDEX):
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        grads.append([p.grad.clone() for p in bank.parameters()])
    for plain, checkpointed in zip(*grads):
        assert plain.abs().max() > 0
        assert max_diff(plain, checkpointed) < ATOL


def test_memory_beyond_a_sliding_window_is_refused():
    torch.manual_seed(0)
    config = AutoConfig.for_model("mistral", **{**TINY, "sliding_window": 8})
    model = patch(AutoModelForCausalLM.from_config(config).eval())
    bank = MemoryBank.prefixes(model, slots=1, length=4)
    with inject(model, bank, torch.tensor([0])):
        model(input_ids=torch.ones(1, 4, dtype=torch.long))
        with pytest.raises(ValueError, match="sliding window of 8"):
            model(input_ids=torch.ones(1, 5, dtype=torch.long))


def test_reentrant_checkpointing_is_refused():
    model = patch(make_model("llama")).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    bank = mixed_bank(model, "prefix")
    ids, mask, labels, _ = make_batch(MIXED_LENGTHS)
    with inject(model, bank, MIXED_INDEX), pytest.raises(ValueError, match="use_reentrant"):
        model(input_ids=ids, attention_mask=mask, labels=labels)


@pytest.mark.parametrize("kind", KINDS)
def test_peft_adapter_directory_loads_like_the_live_adapter(kind, tmp_path):
    model = make_model("llama")
    peft_model = peft_baseline(model, kind)
    peft_model.save_pretrained(tmp_path)
    patch(model)
    live = KINDS[kind][0](model, slots=1, length=VIRTUAL_TOKENS).load_peft(peft_model, slot=0)
    saved = KINDS[kind][0](model, slots=1, length=VIRTUAL_TOKENS).load_peft(tmp_path, slot=0)
    for a, b in zip(live.parameters(), saved.parameters()):
        assert torch.equal(a, b)


def test_beam_search_with_expanded_rows():
    model = patch(make_model("llama"))
    bank = mixed_bank(model, "prefix")
    ids, mask, _, rows = make_batch([5, 3])
    index = torch.tensor([0, 1])
    with inject(model, bank, index, expand=2):
        generated = generate(model, ids, mask, num_beams=2, num_return_sequences=2)
    for b, row in enumerate(rows):
        with inject(model, bank, index[b:b + 1], expand=2):
            alone = generate(model, row[None], torch.ones_like(row[None]), num_beams=2, num_return_sequences=2)
        assert torch.equal(alone, generated[2 * b:2 * b + 2])


def test_prompt_cache_as_pool_slot():
    """A prompt's KV cache injected as a pool slot continues it exactly (the shared-prefix building block)."""
    model = patch(make_model("qwen2"))
    prompts = torch.randint(3, 128, (2, 5))
    continuation = torch.randint(3, 128, (3, 4))
    cache = DynamicCache(config=model.config)
    model(input_ids=prompts, past_key_values=cache, use_cache=True)
    pool = KVPool.from_cache(cache, lengths=torch.tensor([5, 3]))
    index = torch.tensor([1, 0, -1])
    with inject(model, pool, index):
        out = model(input_ids=continuation)
    expected = [model(input_ids=torch.cat([prompts[1, :3], continuation[0]])[None]).logits[0, 3:],
                model(input_ids=torch.cat([prompts[0], continuation[1]])[None]).logits[0, 5:],
                model(input_ids=continuation[2:]).logits[0]]
    for b, logits in enumerate(expected):
        assert max_diff(out.logits[b], logits) < ATOL


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip_is_bit_exact(kind, tmp_path):
    model = patch(make_model("gemma"))
    bank = mixed_bank(model, kind)
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    loaded = MemoryBank.load(path, model)
    assert type(loaded) is type(bank) and torch.equal(loaded.lengths, bank.lengths)
    for (name, a), (name_b, b) in zip(bank.named_parameters(), loaded.named_parameters()):
        assert name == name_b and a.dtype == b.dtype and torch.equal(a, b) and b.requires_grad
    ids, mask, _, _ = make_batch(MIXED_LENGTHS)
    with torch.no_grad():
        with inject(model, bank, MIXED_INDEX):
            before = model(input_ids=ids, attention_mask=mask).logits
        with inject(model, loaded, MIXED_INDEX):
            assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)


def test_load_rejects_truncated_foreign_and_mismatched_files(tmp_path):
    model = patch(make_model("llama"))
    path = tmp_path / "bank.safetensors"
    MemoryBank.prefixes(model, slots=2, length=3).save(path)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[:len(data) - 100])
    with pytest.raises(ValueError, match="cannot read"):
        MemoryBank.load(truncated, model)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read"):
        MemoryBank.load(garbage, model)
    with pytest.raises(ValueError, match="another model"):
        MemoryBank.load(path, make_wider_llama())
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="not a fastmem memory bank"):
        MemoryBank.load(foreign, model)
    with safe_open(path, framework="pt") as handle:
        header, tensors = handle.metadata(), {name: handle.get_tensor(name) for name in handle.keys()}
    tensors["keys"] = tensors["keys"][:, :1].contiguous()
    save_file(tensors, tmp_path / "mismatched.safetensors", metadata=header)
    with pytest.raises(ValueError, match="do not match a prefix bank"):
        MemoryBank.load(tmp_path / "mismatched.safetensors", model)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_prefix_from_tokens_is_the_soft_prompt_of_those_tokens(arch):
    """init="tokens": each slot holds the keys and values of random tokens at positions 0..P-1, so it
    gives the logits of a soft prompt of the same tokens' embeddings (the same generator draws both)."""
    model = patch(make_model(arch))
    ids = torch.randint(model.config.vocab_size, (3, 5), generator=torch.Generator().manual_seed(1))
    outputs = []
    for make in (MemoryBank.soft_prompts, functools.partial(MemoryBank.prefixes, init="tokens")):
        torch.manual_seed(4)
        bank = make(model, slots=3, length=4)
        with torch.no_grad(), inject(model, bank, torch.tensor([2, 0, 1])):
            outputs.append(model(input_ids=ids).logits)
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="init must be one of normal, tokens"):
        MemoryBank.prefixes(model, slots=1, length=2, init="zeros")
    with pytest.raises(ValueError, match="patch"):
        MemoryBank.prefixes(make_model(arch), slots=1, length=2, init="tokens")


@pytest.mark.parametrize("make", [MemoryBank.soft_prompts, MemoryBank.prefixes,
                                  functools.partial(MemoryBank.prefixes, init="tokens")])
def test_a_slot_with_its_own_generator_does_not_depend_on_the_others(make):
    """One generator per slot: a slot's initial values are its generator's, whatever the other slots are."""
    model = patch(make_model("llama"))

    def generators(*seeds):
        return [torch.Generator().manual_seed(seed) for seed in seeds]

    together, alone = make(model, slots=3, length=4, generator=generators(5, 6, 7)), make(
        model, slots=1, length=4, generator=generators(6))
    for name, parameter in together.named_parameters():
        slot = together.slot_selector(slice(1, 2))
        torch.testing.assert_close(parameter.detach()[slot], getattr(alone, name).detach(), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="one generator per slot: 2 slots, 1 generators"):
        make(model, slots=2, length=4, generator=generators(1))


def test_bad_input_is_refused_before_any_computation():
    model = make_model("llama")
    bank = MemoryBank.soft_prompts(model, slots=2, length=3)
    ids, mask, labels, _ = make_batch([4, 4])
    calls = []
    model.get_input_embeddings().register_forward_hook(lambda *args: calls.append(1))

    with pytest.raises(ValueError, match="not patched"):
        with inject(model, bank, torch.tensor([0, 1])):
            pass
    patch(model)
    with pytest.raises(IndexError, match=r"slots \[2\]"):
        with inject(model, bank, torch.tensor([0, 2])):
            pass
    with pytest.raises(ValueError, match=r"B, M >= 1"):
        with inject(model, bank, torch.zeros(2, 0, dtype=torch.long)):
            pass
    with pytest.raises(TypeError, match="integer"):
        with inject(model, bank, torch.tensor([0.0, 1.0])):
            pass
    with inject(model, bank, torch.tensor([0, 1, 1])), pytest.raises(ValueError, match="3 rows"):
        model(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match="another model"):
        with inject(model, MemoryBank.prefixes(patch(make_wider_llama()), slots=2, length=3), torch.tensor([0, 1])):
            pass
    bank.lengths[0] = 4                      # a soft-prompt slot longer than the bank would read slot 1
    with pytest.raises(ValueError, match=r"slots \[0\] have lengths \[4\], outside \[0, 3\]"):
        with inject(model, bank, torch.tensor([0, 1])):
            pass
    bank.lengths[0] = 3
    with torch.no_grad():
        bank.embeddings[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"slots \[1\] hold non-finite"):
        with inject(model, bank, torch.tensor([0, 1])):
            pass
    with pytest.raises(ValueError, match="PROMPT_TUNING"):
        bank.load_peft(peft_baseline(make_model("llama"), "prefix"), slot=0)
    assert not calls


def test_unsupported_architecture_lists_the_supported_ones():
    config = AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=2, vocab_size=64)
    with pytest.raises(TypeError, match="supported: llama"):
        patch(AutoModelForCausalLM.from_config(config))
