"""What users run today without fastmem: the baselines every figure of bench/throughput.py is compared to.

Attention: every function takes fastmem's layout (queries ``[B, Tq, Hq, D]``, keys and values
``[B, T, Hkv, D]``) and returns ``[B, Tq, Hq, D]``, so its output compares directly with
`fastmem.prefix_attention`.

Training, sampling and the online loop: Hugging Face models with a PEFT prompt-learning adapter (prompt
or prefix tuning), one problem at a time, since a PEFT model runs one adapter per forward. A problem's
memory is the adapter's one tensor (`prompt_weight`), loaded before and read after its problem.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fastmem.kernels.prefix_attention_ref import attention_mask, normalize_index

try:
    from flash_attn import flash_attn_func
except Exception:  # not installed (CPU machines), or a build that does not import
    flash_attn_func = None


def sdpa(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None = None,
         softmax_scale: float | None = None) -> Tensor:
    """SDPA on fastmem's layout, with grouped KV heads handled the fastest plain-torch way: SDPA's own
    ``enable_gqa`` where it keeps a fused kernel (CPU; CUDA without a mask), else KV heads repeated with
    `repeat_interleave` (what transformers does on CUDA with a mask, where masked GQA falls back to the
    math kernel). On CPU here ``enable_gqa`` beat `repeat_interleave` by ~20% (masked prefill, fwd and
    fwd+bwd) and ~4x (unmasked decode). mask: boolean ``[B, Tq, Tk]`` (True = visible) or None."""
    heads_first = q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
    attn_mask = None if mask is None else mask[:, None]
    if mask is None or not q.is_cuda:
        out = F.scaled_dot_product_attention(*heads_first, attn_mask=attn_mask, scale=softmax_scale,
                                             enable_gqa=True)
    else:
        query, key, value = heads_first
        group = q.shape[2] // keys.shape[2]
        out = F.scaled_dot_product_attention(query, key.repeat_interleave(group, dim=1),
                                             value.repeat_interleave(group, dim=1), attn_mask=attn_mask,
                                             scale=softmax_scale)
    return out.transpose(1, 2)


def with_prefix(prefix_k: Tensor, prefix_v: Tensor, k: Tensor, v: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's slots copied out of the pool, laid end to end and put before its own keys / values: the
    pool ``[S, P, Hkv, D]``, k and v ``[B, T, Hkv, D]``, index ``[B, M]`` -> ``[B, M * P + T, Hkv, D]`` each
    (``-1`` entries read slot 0; mask them). Differentiable in the pool."""
    batch, uses = index.shape

    def joined(pool: Tensor, own: Tensor) -> Tensor:
        gathered = pool[index.clamp(min=0)].reshape(batch, uses * pool.shape[1], *pool.shape[2:])
        return torch.cat([gathered, own], dim=1)

    return joined(prefix_k, k), joined(prefix_v, v)


def peft_prefix_attention(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
                          prefix_index: Tensor, prefix_lens: Tensor | None = None, *, causal: bool = True,
                          softmax_scale: float | None = None) -> Tensor:
    """Prefix attention the PEFT way: gather each row's prefix from the pool (``prefix_k[index]``),
    concatenate it onto K/V, build the boolean mask (valid prefix positions, causal own keys) and call
    SDPA with it (grouped KV heads as in `sdpa`).

    Same arguments and result as `fastmem.prefix_attention`; gradients reach the pool through the gather.
    One difference: a query that sees no key at all gets NaN (SDPA's convention) instead of zeros.
    """
    index = normalize_index(prefix_index).long()
    num_slots, prefix_len = prefix_k.shape[:2]
    lens = torch.full((num_slots,), prefix_len, device=q.device) if prefix_lens is None else prefix_lens
    mask = attention_mask(index, lens, prefix_len, q.shape[1], k.shape[1], causal)
    keys, values = with_prefix(prefix_k, prefix_v, k, v, index)
    return sdpa(q, keys, values, mask, softmax_scale)


def flash_attn_prefix_attention(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
                                prefix_index: Tensor) -> Tensor:
    """Causal prefix attention with flash-attn on the gathered and concatenated K/V (CUDA, fp16/bf16).

    flash-attn takes no mask, so every listed slot counts in full (no ``prefix_lens``); its causal mask
    aligns bottom-right, which leaves the prefix visible to every query. Needs ``flash_attn`` importable.
    """
    if flash_attn_func is None:
        raise RuntimeError("flash-attn is not importable here")
    keys, values = with_prefix(prefix_k, prefix_v, k, v, normalize_index(prefix_index).long())
    return flash_attn_func(q, keys, values, causal=True)


def sdpa_flash_prefix_attention(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
                                prefix_index: Tensor) -> Tensor:
    """What a CUDA user without flash-attn runs: torch SDPA restricted to its FlashAttention-2 kernel, on the
    gathered and concatenated K/V, causal aligned bottom-right (``causal_lower_right``), grouped KV heads by
    ``enable_gqa``. Like `flash_attn_prefix_attention`, every listed slot counts in full (no ``prefix_lens``)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right
    keys, values = with_prefix(prefix_k, prefix_v, k, v, normalize_index(prefix_index).long())
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                             enable_gqa=True, attn_mask=causal_lower_right(q.shape[1], keys.shape[1]))
    return out.transpose(1, 2)


def concat_cache_decode(q: Tensor, memory_k: Tensor, memory_v: Tensor, prompt_k: Tensor, prompt_v: Tensor,
                        cache_k: Tensor, cache_v: Tensor) -> Tensor:
    """One decode step the usual way: concatenate each row's memory, the shared prompt cache and the row's
    own cache (every step), SDPA without a mask (one query sees every key; grouped KV heads as in `sdpa`).

    q ``[B, 1, Hq, D]``; memory ``[B, Lm, Hkv, D]``; prompt ``[Lp, Hkv, D]`` (shared by all rows);
    cache ``[B, Lc, Hkv, D]``.
    """
    batch = q.shape[0]

    def concat(memory: Tensor, prompt: Tensor, cache: Tensor) -> Tensor:
        return torch.cat([memory, prompt.expand(batch, *prompt.shape), cache], dim=1)

    return sdpa(q, concat(memory_k, prompt_k, cache_k), concat(memory_v, prompt_v, cache_v))


# ------------------------------------------------------------------------------ PEFT, one problem at a time

IGNORE_INDEX = -100


def prompt_weight(peft_model) -> Tensor:
    """The trainable tensor of a PEFT prompt-learning adapter: ``[P, hidden]`` for prompt tuning;
    ``[P, layers * 2 * Hkv * D]`` for prefix tuning (per position, each layer's keys then its values)."""
    return peft_model.prompt_encoder[peft_model.active_adapter].embedding.weight


def trace_batch(prompt: Sequence[int], traces: Sequence[Sequence[int]], device,
                pad_id: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """One problem as one batch: row j = prompt + trace j, right padded. Returns ids, attention mask and
    labels (the trace tokens; -100 on the prompt and the padding), each ``[N, longest]``."""
    rows = [list(prompt) + list(trace) for trace in traces]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for j, row in enumerate(rows):
        ids[j, :len(row)] = torch.tensor(row)
        mask[j, :len(row)] = 1
        labels[j, len(prompt):len(row)] = ids[j, len(prompt):len(row)]
    return ids.to(device), mask.to(device), labels.to(device)


def peft_train(peft_model, prompt_ids: Tensor, traces: Sequence[Sequence[int]], steps: int,
               lr: float) -> list[Tensor]:
    """``steps`` Adam steps of the adapter on one problem: the mean token NLL of its traces after its
    prompt (``prompt_ids [1, T]``), all traces in one forward. Returns each step's loss (before its update)."""
    weight = prompt_weight(peft_model)
    optimizer = torch.optim.Adam([weight], lr=lr)
    ids, mask, labels = trace_batch(prompt_ids[0].tolist(), traces, weight.device)
    losses = []
    for _ in range(steps):
        loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return losses


def peft_train_one_at_a_time(peft_model, prompts: Sequence[Sequence[int]], traces: Sequence[Sequence[Sequence[int]]],
                             memories: Tensor, steps: int, lr: float) -> Tensor:
    """Train B problems' memories with PEFT, one problem after another: load problem i's starting memory
    (``memories[i]``, `prompt_weight`'s layout) into the adapter, then `peft_train` (a new Adam per
    problem). Returns the losses ``[B, steps]`` (fp32, on the model's device)."""
    weight = prompt_weight(peft_model)
    losses = []
    for prompt, problem_traces, start in zip(prompts, traces, memories, strict=True):
        with torch.no_grad():
            weight.copy_(start)
        prompt_ids = torch.tensor([list(prompt)], device=weight.device)
        losses += peft_train(peft_model, prompt_ids, problem_traces, steps, lr)
    return torch.stack(losses).float().view(len(prompts), steps)


def peft_sample_one_at_a_time(peft_model, prompts: Sequence[Sequence[int]], memories: Tensor, n: int,
                              max_new_tokens: int, *, do_sample: bool = True, seed: int = 0) -> Tensor:
    """``n`` samples of ``max_new_tokens`` tokens (no eos stop) per prompt with HF ``generate`` under the
    PEFT adapter, one prompt (one adapter value, ``memories[i]``) at a time: ``generate(num_return_sequences
    = n, do_sample=True)``, pure sampling at temperature 1 (no top-k, no top-p). ``do_sample=False``: greedy,
    with n = 1. Returns the new tokens ``[B, n, max_new_tokens]``."""
    weight = prompt_weight(peft_model)
    torch.manual_seed(seed)
    samples = []
    for prompt, memory in zip(prompts, memories, strict=True):
        with torch.no_grad():
            weight.copy_(memory)
        ids = torch.tensor([list(prompt)], device=weight.device)
        out = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=do_sample,
                                  num_return_sequences=n, max_new_tokens=max_new_tokens, top_k=None,
                                  top_p=None, temperature=None if not do_sample else 1.0, eos_token_id=[],
                                  pad_token_id=peft_model.config.pad_token_id or 0)
        samples.append(out[:, ids.shape[1]:])
    return torch.stack(samples)


def hf_generate_batch(model, prompts: Sequence[Sequence[int]], n: int, max_new_tokens: int, *,
                      seed: int = 0) -> Tensor:
    """The peer without memories: ``n`` samples of ``max_new_tokens`` tokens (no eos stop) for each of the B
    prompts in one HF ``generate`` call (left padded, ``num_return_sequences=n``, pure sampling at
    temperature 1). Returns the new tokens ``[B, n, max_new_tokens]``."""
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(list(prompt))
        mask[row, width - len(prompt):] = 1
    torch.manual_seed(seed)
    out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), do_sample=True,
                         num_return_sequences=n, max_new_tokens=max_new_tokens, top_k=None, top_p=None,
                         temperature=1.0, eos_token_id=[], pad_token_id=model.config.pad_token_id or 0)
    return out[:, width:].reshape(len(prompts), n, -1)


@torch.no_grad()
def mean_hidden_state(model, input_ids: Tensor) -> Tensor:
    """A question's key: the mean over its tokens of the model's last hidden states, fp32 ``[hidden]``
    (``input_ids [1, T]``, no padding)."""
    return model(input_ids=input_ids, output_hidden_states=True).hidden_states[-1][0].float().mean(dim=0)


def peft_online_loop(peft_model, tokenizer, questions: Sequence[str], keys: Tensor, memories: Tensor, *,
                     fresh_memory: Callable[[], Tensor], n: int, steps: int, lr: float, top_k: int,
                     min_similarity: float, max_new_tokens: int, temperature: float,
                     extract_answer: Callable[[str], str | None], vote: Callable,
                     seed: int = 0, encode: Callable[[str], list[int]] | None = None
                     ) -> tuple[list[str | None], Tensor, Tensor]:
    """The online loop with HF and PEFT, one question at a time.

    Per question: embed it (`mean_hidden_state` of the base model); retrieve the ``top_k`` stored keys
    most cosine-similar (``keys [N, d]``, ``memories [N, *prompt_weight shape]``); start the adapter from
    the similarity-weighted mean of those at least ``min_similarity`` similar and sample ``n`` answers
    under it with ``generate(num_return_sequences=n, do_sample=True)``, or, with nothing similar, start
    from ``fresh_memory()`` and sample from the base model; extract the answers and take the majority
    vote (``vote(answers)`` -> an object with ``answer`` and ``agrees``); train the adapter ``steps``
    Adam steps on the majority-consistent traces (`peft_train`); store its key and memory.

    encode: a question's prompt token ids (e.g. `fastmem.prompting.PromptFormat.encode`, as the learner
    encodes); None: ``tokenizer(question)``.

    Returns the majority answers and the grown ``keys`` and ``memories``.
    """
    base, weight = peft_model.get_base_model(), prompt_weight(peft_model)
    device, eos_id = weight.device, tokenizer.eos_token_id
    torch.manual_seed(seed)
    answers = []
    for question in questions:
        prompt_ids = (tokenizer(question, return_tensors="pt").input_ids if encode is None
                      else torch.tensor([encode(question)])).to(device)
        key = mean_hidden_state(base, prompt_ids)
        start, use = fresh_memory(), False
        if len(keys):
            scores, found = F.cosine_similarity(key[None], keys, dim=1).topk(min(top_k, len(keys)))
            similar = scores >= min_similarity
            if bool(similar.any()):
                weights = scores[similar] / scores[similar].sum()
                start = (memories[found[similar]].float() * weights.view(-1, *[1] * (memories.dim() - 1))).sum(0)
                use = True
        with torch.no_grad():
            weight.copy_(start)
            out = (peft_model if use else base).generate(
                input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids), do_sample=True,
                num_return_sequences=n, max_new_tokens=max_new_tokens, temperature=temperature, top_k=None,
                top_p=None, eos_token_id=eos_id, pad_token_id=tokenizer.pad_token_id)
        traces = []
        for row in out[:, prompt_ids.shape[1]:].tolist():
            traces.append(row[:row.index(eos_id) + 1] if eos_id in row else row)
        result = vote([extract_answer(text) for text in tokenizer.batch_decode(traces, skip_special_tokens=True)])
        kept = [trace for trace, agrees in zip(traces, result.agrees) if agrees]
        if kept and steps:
            peft_train(peft_model, prompt_ids, kept, steps, lr)
        keys = torch.cat([keys, key[None]])
        memories = torch.cat([memories, weight.detach().to(memories.dtype)[None]])
        answers.append(result.answer)
    return answers, keys, memories
