"""Shared prefixes: B prompts run once under their memory and become a pool with one slot per prompt.

Many rows then continue those slots (the samples of `fastmem.sample`, the traces of
`fastmem.MemoryTrainer`). These forwards call the decoder directly with an explicit handler and explicit
positions: no cache, no padding mask (every batch is right padded, which causal attention needs no mask
for). `output_logits` and `token_logprobs` turn final hidden states into logits and log-probabilities as the
model's own forward would (soft prompts use the former for their decoder-only pass).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from fastmem.hf.attention import CONTEXT_KEYWORD
from fastmem.hf.context import InjectionContext, KVRecorder
from fastmem.hf.pools import KVPool, Memory
from fastmem.kernels.slots import valid_slot_positions


LOGITS_CHUNK_ELEMENTS = 2 ** 26     # `token_logprobs` materializes at most this many logits at once


def right_pad(rows: list[Tensor], value: int = 0) -> tuple[Tensor, Tensor]:
    """1-D token rows -> ids ``[B, max length]`` right padded with ``value``, and lengths ``[B]``."""
    lengths = torch.tensor([len(row) for row in rows], dtype=torch.long, device=rows[0].device)
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=value), lengths


def run_after_memory(model, memory: Memory | None, input_ids: Tensor, *, past: int = 0, handler=None) -> Tensor:
    """Final hidden states ``[B, T, hidden]`` (after the last norm) of right-padded rows ``input_ids [B, T]``.

    Row b's tokens sit at positions ``n_b + past + t`` (``n_b`` = its memory positions, 0 without memory),
    and every layer attends through ``handler``: by default an `InjectionContext` for ``memory`` (row b
    sees its memory, then its own tokens); a handler that wraps one may also keep keys and values.
    """
    offset = past if memory is None else memory.row_lengths()[:, None] + past
    positions = offset + torch.arange(input_ids.shape[1], device=input_ids.device)[None]
    if handler is None and memory is not None:
        handler = InjectionContext.for_memory(memory)
    out = model.get_decoder()(input_ids=input_ids, position_ids=positions.expand(input_ids.shape[0], -1),
                              use_cache=False, **{CONTEXT_KEYWORD: handler})
    return out.last_hidden_state


def output_logits(model, hidden: Tensor) -> Tensor:
    """``[..., hidden]`` final hidden states -> ``[..., V]`` logits in the head's dtype, as the model's forward
    makes them: the output head, then ``tanh(logits / cap) * cap`` when the config sets a
    ``final_logit_softcapping`` cap (Gemma 3 may); the supported models do nothing else."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def token_logprobs(model, hidden: Tensor, targets: Tensor) -> Tensor:
    """fp32 ``[N]`` log-probabilities of ``targets [N]`` given final hidden states ``[N, hidden]``.

    Logits are made in chunks of at most `LOGITS_CHUNK_ELEMENTS`; under autograd each chunk is
    checkpointed, so no ``[N, V]`` logits are kept for backward (they are recomputed, chunk by chunk).
    """
    def chunk_logprobs(chunk_hidden: Tensor, chunk_targets: Tensor) -> Tensor:
        logprobs = output_logits(model, chunk_hidden).float().log_softmax(dim=-1)
        return logprobs.gather(1, chunk_targets[:, None]).squeeze(1)

    rows = max(1, LOGITS_CHUNK_ELEMENTS // model.config.vocab_size)
    checkpointed = torch.is_grad_enabled() and hidden.requires_grad
    pieces = [checkpoint(chunk_logprobs, h, t, use_reentrant=False) if checkpointed
              else chunk_logprobs(h, t) for h, t in zip(hidden.split(rows), targets.split(rows))]
    return torch.cat(pieces)


def prepend_memory(memory: Memory, prompts: KVPool) -> KVPool:
    """A pool whose slot b holds row b's memory (slots ``memory.index[b]`` in order), then slot b of ``prompts``.

    ``prompts``: one slot per row of ``memory``. One gather per layer (a copy), differentiable into both;
    each position is read once per row, so gradients sum deterministically.
    """
    memory_keys = memory.pool.layers[0][0]
    num_slots, slot_len = memory_keys.shape[:2]
    batch, prompt_len = prompts.layers[0][0].shape[:2]
    device = memory_keys.device
    memory_flat = (memory.index.clamp(min=0)[..., None] * slot_len + torch.arange(slot_len, device=device)).flatten(1)
    memory_valid = valid_slot_positions(memory.index, memory.pool.lengths, slot_len).flatten(1)
    own = torch.arange(prompt_len, device=device)
    prompt_flat = num_slots * slot_len + torch.arange(batch, device=device)[:, None] * prompt_len + own
    valid = torch.cat([memory_valid, own < prompts.lengths[:, None]], dim=1)
    order = torch.argsort((~valid).to(torch.uint8), dim=1, stable=True)       # valid positions first, in order
    lengths = valid.sum(dim=1)
    gather = torch.cat([memory_flat, prompt_flat], dim=1).gather(1, order)[:, :int(lengths.max())]

    def joined(memory_part: Tensor, prompt_part: Tensor) -> Tensor:
        flat = torch.cat([memory_part.to(prompt_part.dtype).flatten(0, 1), prompt_part.flatten(0, 1)])
        return flat[gather]

    layers = tuple((joined(mk, pk), joined(mv, pv)) for (mk, mv), (pk, pv) in zip(memory.pool.layers, prompts.layers))
    return KVPool(layers, lengths)


@dataclass(frozen=True)
class SharedPrefix:
    """B prompts run once under their memory.

    pool: one slot per prompt, ``[B, longest, Hkv, D]`` per layer: the row's memory positions, then its
    prompt's (``pool.lengths [B]`` = memory + prompt positions). A row continuing slot b at positions
    ``pool.lengths[b] + t`` continues prompt b exactly as if the whole sequence ran at once.
    last_hidden: ``[B, hidden]``, the final hidden state at each prompt's last token (it predicts the
    first continuation token).
    """
    pool: KVPool
    last_hidden: Tensor


def shared_prefix(model, memory: Memory | None, prompts: list[Tensor]) -> SharedPrefix:
    """Run B prompts (1-D token rows, lengths >= 1, on the model's device or the host) in one right-padded
    forward, row b after its memory (``memory.index[b]``; no memory when None). Differentiable into the
    memory's pool."""
    ids, lengths = (t.to(model.device) for t in right_pad(prompts))
    context = None if memory is None else InjectionContext.for_memory(memory)
    recorder = KVRecorder(context is not None and context.needs_grad, context=context)
    hidden = run_after_memory(model, memory, ids, handler=recorder)
    pool = recorder.pool(lengths)
    if memory is not None:
        pool = prepend_memory(memory, pool)
    return SharedPrefix(pool, hidden[torch.arange(len(prompts), device=ids.device), lengths - 1])
