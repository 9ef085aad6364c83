"""`sample`: n answers per prompt, each prompt (with its memory) computed once and shared by its samples.

1. Prefill: the B prompts run in one right-padded forward, row b after its memory (``index[b]``), and
   their keys and values become a pool with one slot per prompt: the row's memory positions, then its
   prompt's (`fastmem.hf.shared_prefix`). Every sample's first token comes from the logits at
   its prompt's last token.
2. Decode: the B * n sample rows step in lockstep (`_LockstepDecoder`). Row r attends to pool slot
   r // n through `prefix_attention` (every layer and step with one `AttentionPlan`, built at the first
   step and again only when the rows are compacted), then to its own keys, kept in preallocated buffers
   ``[rows, max_new_tokens - 1, Hkv, D]`` per layer: each step writes one position and attends to views of
   the filled part, so neither the prompt nor earlier steps are ever copied, and no mask is built.
   Positions continue from each prompt's own length, memory included, as `inject` places them.
3. A row stops at an eos token, a stop string or ``max_new_tokens``; once at most half the rows still
   run, the buffers are compacted to the running rows.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
from torch import Tensor

from fastmem.hf.architectures import model_shape
from fastmem.hf.attention import check_patched
from fastmem.hf.context import InjectionContext
from fastmem.hf.pools import KVPool, Memory, checked_index, memory_lengths
from fastmem.hf.shared_prefix import output_logits, run_after_memory, shared_prefix
from fastmem.ops.linear import few_row_linears


@dataclass(frozen=True)
class Sample:
    """One sampled continuation of a prompt.

    token_ids: the new tokens, the eos token included when one ended the sample. text: their decoding with
    special tokens skipped (None without a tokenizer). logprob: the sum of the tokens' log-probabilities
    under the model's own distribution (temperature 1, no top-p; fp32 per token, summed in fp64).
    finish_reason: "eos", "stop" (a stop string appeared) or "length" (``max_new_tokens`` reached).
    """
    token_ids: list[int]
    text: str | None
    logprob: float
    finish_reason: str


def token_row(tokens, vocab_size: int, name: str, device) -> Tensor:
    """A non-empty sequence of token ids (list or 1-D integer tensor) -> 1-D long tensor on ``device``.

    ValueError naming ``name`` (e.g. "prompt 3") when it is empty, not 1-D integers, or holds an id
    outside ``[0, vocab_size)``.
    """
    try:
        row = torch.as_tensor(tokens)
    except (TypeError, ValueError, RuntimeError):
        row = None
    if row is None or row.dim() != 1 or (row.numel() and (row.dtype.is_floating_point or row.dtype.is_complex
                                                          or row.dtype == torch.bool)):
        raise ValueError(f"{name} must be a sequence of token ids (ints); got {type(tokens).__name__}")
    if row.numel() == 0:
        raise ValueError(f"{name} is empty")
    low, high = int(row.min()), int(row.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"{name} holds token id {low if low < 0 else high}, outside the vocabulary "
                         f"[0, {vocab_size})")
    return row.to(device=device, dtype=torch.long)


def check_fits(model, positions: int, name: str) -> None:
    """ValueError when ``positions`` exceed the model's context (``config.max_position_embeddings``)."""
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and positions > context:
        raise ValueError(f"{name} needs {positions} positions, more than the model's context of {context} "
                         "(config.max_position_embeddings)")


def _positive_int(value, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}")
    return value


def check_sampling_options(temperature, top_p, top_k, min_p) -> None:
    """ValueError naming the first of temperature (>= 0), top_p ((0, 1]), top_k (int >= 0), min_p ([0, 1))
    that is out of range."""
    def number(value):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    if not (number(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0; got {temperature!r}")
    if not (number(top_p) and 0 < top_p <= 1):
        raise ValueError(f"top_p must lie in (0, 1]; got {top_p!r}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0: no top-k); got {top_k!r}")
    if not (number(min_p) and 0 <= min_p < 1):
        raise ValueError(f"min_p must lie in [0, 1) (0: no min-p); got {min_p!r}")


def _eos_ids(model, eos_token_id) -> frozenset[int]:
    """eos ids as a set; None takes ``model.generation_config.eos_token_id`` (as ``generate`` does)."""
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos_token_id is None:
        return frozenset()
    return frozenset([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id)


def _stop_strings(stop, tokenizer) -> tuple[str, ...]:
    if stop is None:
        return ()
    strings = (stop,) if isinstance(stop, str) else tuple(stop)
    if not all(isinstance(s, str) and s for s in strings):
        raise ValueError(f"stop must be a non-empty string or a list of them; got {stop!r}")
    if tokenizer is None:
        raise ValueError("stop strings need a tokenizer (pass tokenizer=...)")
    return strings


def _nucleus(probs: Tensor, top_p: float) -> Tensor:
    """``probs [R, V]`` (each row summing to 1) with every token outside the smallest most-likely set of mass
    >= top_p zeroed."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p     # the tokens before it already reach top_p
    return probs.scatter(1, order, sorted_probs.masked_fill(outside, 0.0))


def filtered_probs(logits: Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0,
                   min_p: float = 0.0) -> Tensor:
    """The distribution ``[R, V]`` (fp32, rows summing to 1) that tokens are drawn from at ``temperature > 0``.

    In the order of transformers' ``generate``: ``softmax(logits / temperature)``, then the ``top_k`` most
    likely tokens (0: all; ties with the k-th kept), then the top-p nucleus of what is left, then only the
    tokens at least ``min_p`` times as likely as the most likely one (0: all), renormalized after each.
    """
    probs = (logits.float() / temperature).softmax(dim=-1)
    if 0 < top_k < probs.shape[-1]:
        kth = probs.topk(top_k, dim=-1).values[:, -1:]
        probs = probs.masked_fill(probs < kth, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    if top_p < 1:
        probs = _nucleus(probs, top_p)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    if min_p > 0:
        probs = probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def _next_tokens(logits: Tensor, temperature: float, top_p: float, uniform: Tensor,
                 top_k: int = 0, min_p: float = 0.0) -> tuple[Tensor, Tensor]:
    """Per row of ``logits [R, V]``: the chosen token ``[R]`` (long) and its fp32 log-probability under the
    model (temperature 1, no filters).

    A draw is one pass of inverse-CDF sampling: the row's unnormalized weights (``exp((logits - max) /
    temperature)``, or `filtered_probs` when a filter is on), their running sum, and the first token whose
    running sum exceeds ``u * total`` for the row's uniform ``u`` (``uniform [R]`` fp32 in [0, 1), unused
    when greedy). At temperature 1 without filters the running sum's total is also the log-probability's
    normalizer, so a step costs one exponential, one running sum and one search over the vocabulary
    (``torch.multinomial`` of a softmax plus a log-softmax cost three normalizations: 6x slower at 128 rows
    x 49,152 tokens on one CPU core). The running sum is stored in fp32 (CPU torch accumulates it in fp64),
    so each token's probability is exact to within one fp32 rounding of the cumulative mass before it; a
    token of zero weight is never drawn.
    """
    logits = logits.float()
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    exponentials = shifted.exp()
    filtered = bool(top_k or top_p < 1 or min_p > 0)
    plain = temperature == 1 and not filtered
    if temperature == 0:
        tokens = logits.argmax(dim=-1)
    else:
        if filtered:
            weights = filtered_probs(logits, temperature, top_p, top_k, min_p)
        else:
            weights = exponentials if plain else (shifted / temperature).exp()
        cumulative = weights.cumsum(dim=-1)
        total = cumulative[:, -1:]
        # u * total < total also after rounding, so the search never runs past the last token of nonzero weight
        threshold = torch.minimum(uniform[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
        tokens = torch.searchsorted(cumulative, threshold, right=True).squeeze(1)
    log_normalizer = (total if plain else exponentials.sum(dim=-1, keepdim=True)).log()
    return tokens, (shifted.gather(1, tokens[:, None]) - log_normalizer).squeeze(1)


_MASK64 = (1 << 64) - 1


def _splitmix64(state: int) -> int:
    state = (state + 0x9E3779B97F4A7C15) & _MASK64
    state = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    state = ((state ^ (state >> 27)) * 0x94D049BB133111EB) & _MASK64
    return state ^ (state >> 31)


def stream_seed(*parts: int) -> int:
    """The seed, in ``[0, 2**63)``, of the random stream named by the integers ``parts`` (any sign and size;
    e.g. a run's seed, a problem's position in its stream, a purpose): one SplitMix64 step per part, so
    tuples that differ anywhere name unrelated streams. Plain integer arithmetic: the same on every machine."""
    state = 0
    for part in parts:
        state = _splitmix64(state ^ (operator.index(part) & _MASK64))
    return state >> 1


def _prompt_seeds(seed, prompts: int) -> list[int]:
    """Each prompt's stream seed (see `sample`); ValueError unless ``seed`` is None, an int, or one int in
    ``[0, 2**64)`` per prompt."""
    if seed is None:
        return torch.randint(1 << 62, (prompts,)).tolist()
    if isinstance(seed, int) and not isinstance(seed, bool):
        return [stream_seed(seed, b) for b in range(prompts)]
    seeds = list(seed) if isinstance(seed, (list, tuple)) else None
    if seeds is None or len(seeds) != prompts or not all(
            isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= _MASK64 for s in seeds):
        raise ValueError(f"seed must be None, an int, or a list of {prompts} ints in [0, 2**64) (one per prompt); "
                         f"got {seed!r}")
    return seeds


class _Uniforms:
    """One uniform in [0, 1) per sample and decoding step. The n samples of prompt b read the generator seeded
    ``seeds[b]`` on the host, `BLOCK` steps at a time (``[n, BLOCK]`` per draw), so a sample's draws depend
    on its prompt's seed and its own index only: not on the other prompts of the batch, not on which rows
    still run, not on the device."""

    BLOCK = 32

    def __init__(self, seeds: list[int], n: int, device):
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        self.n, self.device = n, device
        self.samples = torch.arange(len(seeds) * n, device=device)   # the sample each decoding row draws for

    def keep(self, rows: Tensor) -> None:
        """Keep only decoding ``rows`` (as `_LockstepDecoder.keep`)."""
        self.samples = self.samples[rows]

    def at(self, step: int) -> Tensor:
        """The running rows' draws at ``step`` ``[R]`` fp32; steps are asked for in order from 0."""
        if step % self.BLOCK == 0:
            self.block = torch.cat([torch.rand(self.n, self.BLOCK, generator=generator)
                                    for generator in self.generators]).to(self.device)
        return self.block[self.samples, step % self.BLOCK]


class _LockstepDecoder:
    """Rows decoding in lockstep, row r continuing pool slot ``owner[r]``; the attention handler of its steps.

    Own keys and values live in preallocated buffers ``[rows, capacity, Hkv, D]`` per layer: a step writes
    position ``filled`` and attends (through an `InjectionContext` on the pool) to views ``[:, :filled + 1]``.
    """

    def __init__(self, model, pool: KVPool, owner: Tensor, capacity: int):
        shape = model_shape(model)
        size = (len(owner), capacity, shape.num_kv_heads, shape.head_dim)
        keys = pool.layers[0][0]
        self.model, self.pool, self.filled = model, pool, 0
        self.buffers = [(keys.new_empty(size), keys.new_empty(size)) for _ in range(shape.num_layers)]
        self._continue(owner)

    def _continue(self, owner: Tensor) -> None:
        self.memory = Memory(self.pool, owner[:, None])
        self.context = InjectionContext.for_memory(self.memory)

    def keep(self, rows: Tensor) -> None:
        """Keep only ``rows`` (indices into the current rows), in that order: one copy of their buffers."""
        self.buffers = [(keys[rows], values[rows]) for keys, values in self.buffers]
        self._continue(self.memory.index[rows, 0])

    def step(self, tokens: Tensor) -> Tensor:
        """Feed one token per row (``[R]``); returns the logits of the next one ``[R, V]``."""
        hidden = run_after_memory(self.model, self.memory, tokens[:, None], past=self.filled, handler=self)
        self.filled += 1
        return output_logits(self.model, hidden[:, 0])

    def attend(self, original, module, query: Tensor, key: Tensor, value: Tensor, attention_mask, **kwargs):
        """key/value ``[R, Hkv, 1, D]``: written into the buffers, then the pool and the filled views attended.

        The mask the model made describes its one new key, not the buffers: every filled key is visible (no mask)."""
        keys, values = self.buffers[module.layer_idx]
        keys[:, self.filled] = key[:, :, 0]
        values[:, self.filled] = value[:, :, 0]
        end = self.filled + 1
        return self.context.attend(original, module, query, keys[:, :end].transpose(1, 2),
                                   values[:, :end].transpose(1, 2), None, **kwargs)


class _Progress:
    """Each sample's tokens, summed log-probability and finish reason, and the sample of each decoding row."""

    def __init__(self, samples: int, eos: frozenset[int], stop: tuple[str, ...], tokenizer):
        self.tokens: list[list[int]] = [[] for _ in range(samples)]
        self.logprobs = [0.0] * samples
        self.reasons: list[str | None] = [None] * samples
        self.rows = list(range(samples))
        self.eos, self.stop, self.tokenizer = eos, stop, tokenizer
        # a stop string spans at most its length in tokens; a few more for tokens that decode to nothing
        self.stop_window = max(map(len, stop), default=0) + 4

    def record(self, tokens: list[int], logprobs: list[float], last: bool) -> list[bool]:
        """Append each running row's token; returns which decoding rows still run."""
        running = []
        for sample_id, token, logprob in zip(self.rows, tokens, logprobs):
            if self.reasons[sample_id] is None:
                self.tokens[sample_id].append(token)
                self.logprobs[sample_id] += logprob
                self.reasons[sample_id] = self._finish_reason(self.tokens[sample_id], token, last)
            running.append(self.reasons[sample_id] is None)
        return running

    def _finish_reason(self, tokens: list[int], token: int, last: bool) -> str | None:
        if token in self.eos:
            return "eos"
        if self.stop:
            tail = self.tokenizer.decode(tokens[-self.stop_window:])
            if any(s in tail for s in self.stop):
                return "stop"
        return "length" if last else None

    def keep(self, rows: list[int]) -> None:
        self.rows = [self.rows[row] for row in rows]

    def samples(self, n: int) -> list[list[Sample]]:
        """``result[b][j]``: the samples, n per prompt."""
        texts = [None if self.tokenizer is None else self.tokenizer.decode(ids, skip_special_tokens=True)
                 for ids in self.tokens]
        flat = [Sample(*fields) for fields in zip(self.tokens, texts, self.logprobs, self.reasons)]
        return [flat[start:start + n] for start in range(0, len(flat), n)]


def sample(model, input_ids, *, bank=None, index=None, n: int = 8, max_new_tokens: int = 256,
           temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0, eos_token_id=None,
           stop=None, seed: int | list[int] | None = None, tokenizer=None) -> list[list[Sample]]:
    """``n`` samples for each of B prompts, each prompt computed once (with its memory) and shared.

    model: patched with `fastmem.patch`. input_ids: B prompts, each a non-empty list (or 1-D tensor) of token
    ids; lengths may differ. bank, index: the memory, as in `fastmem.inject` (a `MemoryBank` or `KVPool`,
    and slot ids ``[B]`` or ``[B, M]``, ``-1`` = none); both or neither. temperature 0 is greedy (equal to
    ``generate(do_sample=False)`` under the same memory, whatever the filters below); otherwise tokens are drawn
    from ``softmax(logits / temperature)``, restricted (in this order, as ``generate`` does) to the ``top_k``
    most likely tokens when ``top_k > 0``, to the top-p nucleus when ``top_p < 1``, and to the tokens at least
    ``min_p`` times as likely as the most likely one when ``min_p > 0`` (`filtered_probs`). eos_token_id:
    an id or ids that end a sample (None: ``model.generation_config.eos_token_id``, as ``generate``;
    ``()`` for none). stop: a string or strings that end a sample once its text contains one (needs
    ``tokenizer``; the tokens that complete it are kept). seed: prompt b's samples draw from their own random
    stream (`_Uniforms`), seeded by ``seed[b]`` when ``seed`` is a list of B ints in ``[0, 2**64)``, by
    ``stream_seed(seed, b)`` when it is an int, from torch's global generator when None: with per-prompt
    seeds, a prompt's samples do not depend on which other prompts share its batch (up to the rounding of
    batched kernels), and the same seeds and inputs give the same samples. tokenizer: decodes ``Sample.text``.

    Memory + prompt + ``max_new_tokens`` must fit the model's context. Returns ``result[b][j]``, the j-th
    `Sample` of prompt b. Every argument is checked before anything is computed.
    """
    check_patched(model)
    if isinstance(input_ids, (str, bytes)) or not hasattr(input_ids, "__len__") or len(input_ids) == 0:
        raise ValueError("input_ids must be a non-empty list of prompts (token id lists)")
    n, max_new_tokens = _positive_int(n, "n"), _positive_int(max_new_tokens, "max_new_tokens")
    check_sampling_options(temperature, top_p, top_k, min_p)
    if (bank is None) != (index is None):
        raise ValueError("pass bank and index together (or neither, for no memory)")
    device, vocab_size = model.device, model.config.vocab_size
    # prompts stay on the host: `shared_prefix` pads them there and copies the batch once
    prompts = [token_row(ids, vocab_size, f"prompt {b}", "cpu") for b, ids in enumerate(input_ids)]
    memory_positions = [0] * len(prompts)
    if bank is not None:
        bank.validate(model)
        index = checked_index(index, bank.num_slots, device)
        if index.shape[0] != len(prompts):
            raise ValueError(f"index has {index.shape[0]} rows but there are {len(prompts)} prompts")
        memory_positions = memory_lengths(bank.lengths, index).tolist()
    for b, (prompt, memory) in enumerate(zip(prompts, memory_positions)):
        check_fits(model, memory + len(prompt) + max_new_tokens,
                   f"prompt {b} ({memory} memory + {len(prompt)} prompt + {max_new_tokens} new tokens)")
    progress = _Progress(len(prompts) * n, _eos_ids(model, eos_token_id), _stop_strings(stop, tokenizer), tokenizer)
    uniforms = _Uniforms(_prompt_seeds(seed, len(prompts)), n, device)

    with torch.inference_mode():
        prefix = shared_prefix(model, None if bank is None else bank.memory_for(model, index), prompts)
        owner = torch.arange(len(prompts), device=device).repeat_interleave(n)
        logits = output_logits(model, prefix.last_hidden)[owner]
        decoder = _LockstepDecoder(model, prefix.pool, owner, max_new_tokens - 1)
        with few_row_linears(model):   # the steps' linears, at few rows, run the few-row kernel
            for step in range(max_new_tokens):
                tokens, logprobs = _next_tokens(logits, temperature, top_p, uniforms.at(step), top_k, min_p)
                running = progress.record(tokens.tolist(), logprobs.tolist(), last=step == max_new_tokens - 1)
                if not any(running):
                    break
                if 2 * sum(running) <= len(running):
                    rows = [row for row, runs in enumerate(running) if runs]
                    kept = torch.tensor(rows, device=device)
                    decoder.keep(kept)
                    uniforms.keep(kept)
                    progress.keep(rows)
                    tokens = tokens[kept]
                logits = decoder.step(tokens)
    return progress.samples(n)
