"""fastmem.sample on tiny random models: greedy equals HF greedy generate under the same memory, token for
token; sampled log-probabilities equal teacher forcing; the temperature / top-k / top-p / min-p distribution
equals a plain-torch reference and transformers' warpers; seeds reproduce; bad input fails before computing."""
from __future__ import annotations

import contextlib

import pytest
import torch
from test_patch import ARCHS, KINDS, MIXED_INDEX, PlanCounter, make_model, mixed_bank

from fastmem import inject, patch
from fastmem.ops import native
from fastmem.sampling import _LockstepDecoder, _next_tokens, filtered_probs, sample, stream_seed

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning"),
              pytest.mark.usefixtures("one_thread")]

PROMPT_LENGTHS = [6, 4, 5, 3]               # one per row of MIXED_INDEX
MEMORY_KINDS = [None, *KINDS]


class LetterTokenizer:
    """Decodes token id i as the letter ``chr(97 + i % 26)``: enough for stop strings and text."""

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(chr(ord("a") + i % 26) for i in ids)


def make_prompts(lengths=PROMPT_LENGTHS, seed: int = 1) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=generator).tolist() for n in lengths]


def memory_args(model, kind):
    return {} if kind is None else {"bank": mixed_bank(model, kind), "index": MIXED_INDEX}


def under_memory(model, memory: dict, row: int):
    """`inject` with row ``row`` of the memory's index, or nothing without memory."""
    if not memory:
        return contextlib.nullcontext()
    return inject(model, memory["bank"], memory["index"][row:row + 1])


def generate_alone(model, prompt: list[int], memory: dict, row: int, **kwargs):
    """HF greedy generate for one prompt (batch of one, no padding), under its memory when there is one."""
    with under_memory(model, memory, row):
        return model.generate(torch.tensor([prompt]), do_sample=False, pad_token_id=0, output_scores=True,
                              return_dict_in_generate=True, **kwargs)


def continuation_logprob(model, prompt: list[int], tokens: list[int], memory: dict, row: int) -> torch.Tensor:
    """Sum of log p(token) over ``tokens`` after ``prompt``, from one full sequence under plain `inject` (the
    unshared computation); differentiable into the memory when autograd is on."""
    with under_memory(model, memory, row):
        logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0]
    predicted = logits[len(prompt) - 1:-1].float().log_softmax(dim=-1)
    return predicted.gather(1, torch.tensor(tokens)[:, None]).sum()


def count_few_row_linear_calls(monkeypatch):
    """Counts the native few-row linear kernel's calls from now on; returns the count's getter."""
    calls = []
    original = native.few_row_linear
    monkeypatch.setattr(native, "few_row_linear", lambda *args: calls.append(1) or original(*args))
    return lambda: len(calls)


@pytest.mark.parametrize("kind", MEMORY_KINDS)
@pytest.mark.parametrize("arch", [*ARCHS, "llama-eager", "gemma3_text-softcap"])
def test_greedy_equals_hf_generate(arch, kind, monkeypatch):
    """Per architecture; also eager attention, and Gemma 3 with final logit soft-capping (fastmem's own head).
    The decode steps' linears run the few-row kernel (fp32 CPU, at most MAX_ROWS rows), generate's do not."""
    name, _, variant = arch.partition("-")
    model = make_model(name, **({"final_logit_softcapping": 0.5} if variant == "softcap" else {}))
    if variant == "eager":
        model.set_attn_implementation("eager")
    model = patch(model)
    memory, prompts = memory_args(model, kind), make_prompts()
    kernel_calls = count_few_row_linear_calls(monkeypatch)
    result = sample(model, prompts, n=2, max_new_tokens=10, temperature=0, eos_token_id=(), **memory)
    assert kernel_calls() > 0 or not native.is_available()
    assert all("forward" not in module.__dict__ for module in model.modules())
    for row, prompt in enumerate(prompts):
        expected = generate_alone(model, prompt, memory, row, max_new_tokens=10, eos_token_id=None)
        tokens = expected.sequences[0, len(prompt):].tolist()
        logprob = sum(scores.log_softmax(-1)[0, token].item() for scores, token in zip(expected.scores, tokens))
        for drawn in result[row]:
            assert drawn.token_ids == tokens and drawn.finish_reason == "length" and drawn.text is None
            assert abs(drawn.logprob - logprob) < 1e-4


@pytest.mark.parametrize("kind", MEMORY_KINDS)
def test_greedy_stops_at_eos_like_generate_and_compacts_rows(kind, monkeypatch):
    """Rows ending at different steps (eos) are dropped from the lockstep batch; the rest continue exactly."""
    model = patch(make_model("qwen2"))
    memory, prompts = memory_args(model, kind), make_prompts(seed=3)   # prompts 0, 1 can end early, 2, 3 not
    unstopped = sample(model, prompts, n=2, max_new_tokens=12, temperature=0, eos_token_id=(), **memory)
    late = {token for samples in unstopped[2:] for token in samples[0].token_ids}
    eos = [token for samples in unstopped[:2] for token in samples[0].token_ids[:6] if token not in late]
    kept_rows, keep = [], _LockstepDecoder.keep

    def counting_keep(decoder, rows):
        kept_rows.append(len(rows))
        keep(decoder, rows)

    monkeypatch.setattr(_LockstepDecoder, "keep", counting_keep)
    result = sample(model, prompts, n=2, max_new_tokens=12, temperature=0, eos_token_id=eos, **memory)

    for row, prompt in enumerate(prompts):
        expected = generate_alone(model, prompt, memory, row, max_new_tokens=12, eos_token_id=eos)
        tokens = expected.sequences[0, len(prompt):].tolist()
        ends = [t for t, token in enumerate(tokens) if token in eos]
        tokens = tokens[:ends[0] + 1] if ends else tokens
        for drawn in result[row]:
            assert drawn.token_ids == tokens
            assert drawn.finish_reason == ("eos" if ends else "length")
    assert {drawn.finish_reason for samples in result for drawn in samples} == {"eos", "length"}
    assert kept_rows, "rows finishing early should have been compacted away"


@pytest.mark.parametrize("kind", MEMORY_KINDS)
def test_sampled_logprobs_equal_teacher_forcing(kind):
    model = patch(make_model("llama"))
    memory, prompts = memory_args(model, kind), make_prompts()
    eos = list(range(3, 13))                              # frequent enough that some samples end early
    result = sample(model, prompts, n=3, max_new_tokens=8, temperature=0.8, top_p=0.9, eos_token_id=eos, seed=0,
                    tokenizer=LetterTokenizer(), **memory)
    assert len(result) == len(prompts) and all(len(samples) == 3 for samples in result)
    for row, prompt in enumerate(prompts):
        for drawn in result[row]:
            assert drawn.text == LetterTokenizer().decode(drawn.token_ids)
            assert not any(token in eos for token in drawn.token_ids[:-1])
            assert drawn.finish_reason == ("eos" if drawn.token_ids[-1] in eos else "length")
            assert drawn.finish_reason == "eos" or len(drawn.token_ids) == 8
            with torch.no_grad():
                expected = continuation_logprob(model, prompt, drawn.token_ids, memory, row).item()
            assert abs(drawn.logprob - expected) < 1e-4


def test_prefill_and_decode_steps_each_plan_at_most_once(monkeypatch):
    """`sample`: the prefill and every decode step hand both layers one plan; decode steps share theirs until
    the rows are compacted (no more plans than forwards, none built for a backward)."""
    model = patch(make_model("llama"))
    counter = PlanCounter(monkeypatch, model)
    sample(model, make_prompts(), n=2, max_new_tokens=6, seed=0, **memory_args(model, "prefix"))
    assert counter.forwards == 6 and counter.calls == 2 * counter.forwards
    assert 2 <= len(counter.plans) < counter.forwards
    assert all(plan.slot_offsets is None for plan in counter.plans)


def test_same_seed_same_samples():
    model = patch(make_model("gemma"))
    memory, prompts = memory_args(model, "prefix"), make_prompts()
    draws = [sample(model, prompts, n=4, max_new_tokens=6, seed=seed, **memory) for seed in (7, 7, 8)]
    assert draws[0] == draws[1]
    assert draws[0] != draws[2]


def test_a_prompts_samples_do_not_depend_on_its_batch():
    """With one seed per prompt, a prompt's samples are the same alone, at another index, in another batch, and
    whichever rows finish early (eos ids frequent: rows are compacted); an int seed names the per-prompt seeds
    ``stream_seed(seed, b)``."""
    model = patch(make_model("llama"))
    prompts, seeds = make_prompts(lengths=[5, 5, 5]), [11, 12, 2**64 - 1]   # equal lengths: the same padding
    options = dict(n=3, max_new_tokens=8, eos_token_id=list(range(3, 13)))

    def tokens(result):
        return [[(drawn.token_ids, drawn.finish_reason) for drawn in row] for row in result]

    together = tokens(sample(model, prompts, seed=seeds, **options))
    assert {reason for row in together for _, reason in row} == {"eos", "length"}
    assert together == [tokens(sample(model, [prompt], seed=[seed], **options))[0]
                        for prompt, seed in zip(prompts, seeds)]
    assert tokens(sample(model, prompts[::-1], seed=seeds[::-1], **options)) == together[::-1]
    assert tokens(sample(model, prompts, seed=7, **options)) == tokens(
        sample(model, prompts, seed=[stream_seed(7, b) for b in range(3)], **options))


def test_a_tiny_nucleus_is_greedy():
    model = patch(make_model("llama"))
    memory, prompts = memory_args(model, "soft_prompt"), make_prompts()
    greedy = sample(model, prompts, n=1, max_new_tokens=6, temperature=0, **memory)
    nucleus = sample(model, prompts, n=3, max_new_tokens=6, temperature=1.5, top_p=1e-6, seed=3, **memory)
    for expected, samples in zip(greedy, nucleus):
        assert all(drawn.token_ids == expected[0].token_ids for drawn in samples)


def reference_filtered_probs(logits: torch.Tensor, temperature: float, top_p: float, top_k: int,
                             min_p: float) -> torch.Tensor:
    """The sampling distribution written out token by token, in plain torch and Python (fp64)."""
    rows = []
    for row in logits.double():
        probs = torch.softmax(row / temperature, dim=0)
        keep = set(range(len(probs)))
        if top_k:
            kth = sorted(probs.tolist(), reverse=True)[min(top_k, len(probs)) - 1]
            keep = {t for t in keep if probs[t] >= kth}
        kept = torch.tensor([float(t in keep) for t in range(len(probs))], dtype=torch.float64)
        probs = probs * kept / (probs * kept).sum()
        if top_p < 1:
            mass, nucleus = 0.0, set()
            for token in sorted(keep, key=lambda t: -probs[t].item()):
                if mass >= top_p:
                    break
                nucleus.add(token)
                mass += probs[token].item()
            kept = torch.tensor([float(t in nucleus) for t in range(len(probs))], dtype=torch.float64)
            probs = probs * kept / (probs * kept).sum()
        if min_p:
            kept = (probs >= min_p * probs.max()).double()
            probs = probs * kept / (probs * kept).sum()
        rows.append(probs)
    return torch.stack(rows)


def hf_filtered_probs(logits: torch.Tensor, temperature: float, top_p: float, top_k: int,
                      min_p: float) -> torch.Tensor:
    """transformers' own warpers, in the order generate applies them."""
    from transformers.generation.logits_process import (LogitsProcessorList, MinPLogitsWarper, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        warpers.append(TopPLogitsWarper(top_p))
    if min_p:
        warpers.append(MinPLogitsWarper(min_p))
    return warpers(None, logits.clone()).softmax(dim=-1)


SETTINGS = [(1.0, 1.0, 0, 0.0), (0.7, 1.0, 5, 0.0), (1.3, 0.8, 0, 0.0), (1.0, 1.0, 0, 0.1), (0.5, 0.9, 20, 0.05),
            (1.0, 0.95, 3, 0.3), (2.0, 0.5, 1, 0.0), (0.8, 1.0, 100, 0.0)]


@pytest.mark.parametrize("temperature, top_p, top_k, min_p", SETTINGS)
def test_filtered_distribution_equals_reference_and_transformers(temperature, top_p, top_k, min_p):
    logits = torch.randn(6, 64, generator=torch.Generator().manual_seed(top_k)) * 3
    got = filtered_probs(logits, temperature, top_p, top_k, min_p)
    expected = reference_filtered_probs(logits, temperature, top_p, top_k, min_p)
    assert torch.equal(got > 0, expected > 0)
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got, hf_filtered_probs(logits, temperature, top_p, top_k, min_p), atol=1e-6, rtol=1e-5)
    support = (got > 0).sum(-1)
    if top_k:
        assert bool((support <= top_k).all())
    assert bool((support >= 1).all())


@pytest.mark.parametrize("temperature, top_p, top_k, min_p", SETTINGS[:5])
def test_drawn_tokens_follow_the_filtered_distribution(temperature, top_p, top_k, min_p):
    """200,000 draws from one row of logits: every token's frequency within 5 standard errors of the
    reference probability, no token outside the support, log-probabilities those of the unfiltered model."""
    draws = 200_000
    logits = torch.randn(1, 24, generator=torch.Generator().manual_seed(11)) * 2
    expected = reference_filtered_probs(logits, temperature, top_p, top_k, min_p)[0]
    tokens, logprobs = _next_tokens(logits.expand(draws, -1), temperature, top_p,
                                    torch.rand(draws, generator=torch.Generator().manual_seed(0)), top_k, min_p)
    frequency = torch.bincount(tokens, minlength=logits.shape[1]).double() / draws
    assert bool((frequency[expected == 0] == 0).all())
    standard_error = (expected * (1 - expected) / draws).sqrt()
    assert bool(((frequency - expected).abs() <= 5 * standard_error + 1e-12).all()), (frequency - expected).abs().max()
    torch.testing.assert_close(logprobs, logits.log_softmax(-1)[0, tokens], atol=1e-6, rtol=0)


@pytest.mark.parametrize("filters", [dict(top_k=1), dict(min_p=0.999), dict(top_k=4, top_p=1e-6)])
def test_filters_that_leave_one_token_are_greedy(filters):
    model = patch(make_model("llama"))
    memory, prompts = memory_args(model, "prefix"), make_prompts()
    greedy = sample(model, prompts, n=1, max_new_tokens=6, temperature=0, **memory)
    filtered = sample(model, prompts, n=3, max_new_tokens=6, temperature=1.5, seed=5, **filters, **memory)
    for expected, samples in zip(greedy, filtered):
        assert all(drawn.token_ids == expected[0].token_ids for drawn in samples)


def test_top_k_samples_only_the_k_most_likely_tokens():
    model = patch(make_model("qwen2"))
    prompts = make_prompts()
    result = sample(model, prompts, n=6, max_new_tokens=1, temperature=1.0, top_k=3, seed=2)
    with torch.no_grad():
        for prompt, samples in zip(prompts, result):
            top3 = set(model(input_ids=torch.tensor([prompt])).logits[0, -1].topk(3).indices.tolist())
            assert {drawn.token_ids[0] for drawn in samples} <= top3


def test_stop_strings_end_samples():
    model = patch(make_model("mistral"))
    tokenizer, stop = LetterTokenizer(), ["a", "bc"]
    result = sample(model, make_prompts(), n=4, max_new_tokens=20, seed=1, eos_token_id=(), stop=stop,
                    tokenizer=tokenizer)
    reasons = {drawn.finish_reason for samples in result for drawn in samples}
    assert "stop" in reasons
    for drawn in (drawn for samples in result for drawn in samples):
        assert any(s in drawn.text for s in stop) == (drawn.finish_reason == "stop")
        assert not any(s in tokenizer.decode(drawn.token_ids[:-1]) for s in stop)


def test_bad_input_is_refused_before_any_computation():
    model = make_model("llama")
    bank = mixed_bank(model, "prefix")
    prompts = make_prompts()
    calls = []
    model.get_input_embeddings().register_forward_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match="not patched"):
        sample(model, prompts)
    patch(model)
    cases = [
        (ValueError, "non-empty list of prompts", dict(input_ids=[])),
        (ValueError, "prompt 1 is empty", dict(input_ids=[[5], []])),
        (ValueError, "prompt 0 holds token id 128", dict(input_ids=[[5, 128]])),
        (ValueError, "prompt 0 must be a sequence of token ids", dict(input_ids=[[[5]]])),
        (ValueError, "bank and index together", dict(bank=bank)),
        (ValueError, "index has 2 rows but there are 4 prompts", dict(bank=bank, index=torch.tensor([0, 1]))),
        (IndexError, r"slots \[3\]", dict(bank=bank, index=torch.tensor([0, 1, 2, 3]))),
        (ValueError, "prompt 0 .* more than the model's context of 256", dict(max_new_tokens=251)),
        (ValueError, "stop strings need a tokenizer", dict(stop="x")),
        (ValueError, "temperature", dict(temperature=-1.0)),
        (ValueError, "top_p", dict(top_p=0.0)),
        (ValueError, "top_k must be an int >= 0", dict(top_k=-1)),
        (ValueError, "top_k must be an int >= 0", dict(top_k=2.5)),
        (ValueError, "min_p must lie in", dict(min_p=1.0)),
        (ValueError, "min_p must lie in", dict(min_p=-0.1)),
        (ValueError, "n must be a positive int", dict(n=0)),
        (ValueError, "seed must be None, an int, or a list of 4 ints", dict(seed=[1, 2, 3])),
        (ValueError, "seed must be None, an int, or a list of 4 ints", dict(seed=[1, 2, 3, -1])),
    ]
    for error, message, kwargs in cases:
        with pytest.raises(error, match=message):
            sample(model, **{"input_ids": prompts, "max_new_tokens": 4, **kwargs})
    assert not calls
