"""Soft prompts as a key/value pool: the decoder runs once over each distinct slot sequence a batch reads.

It runs ``model.get_decoder()`` and applies the output head itself (`output_logits`), so this pass never goes
through the forward hooks `fastmem.inject` puts on the model, though `inject` asks for it from inside them.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastmem.hf.architectures import model_shape
from fastmem.hf.attention import CONTEXT_KEYWORD
from fastmem.hf.context import KVRecorder, needs_grad
from fastmem.hf.pools import KVPool, Memory
from fastmem.hf.shared_prefix import output_logits


def soft_prompt_memory(model, prompts: Tensor, lengths: Tensor, index: Tensor) -> Memory:
    """Soft prompts as a pool: run the decoder once per distinct slot sequence among the rows.

    prompts ``[S, P, hidden]``, lengths ``[S]``, index ``[B, M]`` (-1 = none). A row's memory is its slots'
    first ``lengths[s]`` vectors, concatenated in order; since they come first and attention is causal,
    their keys and values depend on nothing else, so each distinct sequence runs once (right padded,
    positions from 0) and rows attend to the result as a prefix. Returns a `Memory` whose pool has one slot
    per distinct sequence (``[U, L, Hkv, D]`` per layer, the attention's keys and values), whose index is
    ``[B, 1]`` (-1 for rows reading nothing), and whose lead_logits ``[B, V]`` are the logits at each row's
    last memory position (they predict its first token, for the loss; None when no row reads a slot).
    """
    slot_lengths = lengths.tolist()
    sequences: dict[tuple[int, ...], int] = {}
    row_sequence = []
    for row in index.tolist():
        sequence = tuple(slot for slot in row if slot >= 0 and slot_lengths[slot] > 0)
        row_sequence.append(sequences.setdefault(sequence, len(sequences)) if sequence else -1)
    device = prompts.device
    row_index = torch.tensor(row_sequence, dtype=torch.long, device=device)[:, None]
    if not sequences:
        shape = model_shape(model)
        empty = prompts.new_zeros((1, 1, shape.num_kv_heads, shape.head_dim))
        pool = KVPool(((empty, empty),) * shape.num_layers, torch.zeros(1, dtype=torch.long, device=device))
        return Memory(pool, row_index)

    prompt_len = prompts.shape[1]
    flat_positions = [[slot * prompt_len + p for slot in sequence for p in range(slot_lengths[slot])]
                      for sequence in sequences]
    sequence_lengths = torch.tensor([len(p) for p in flat_positions], dtype=torch.long, device=device)
    longest = int(sequence_lengths.max())
    gather = torch.tensor([p + [0] * (longest - len(p)) for p in flat_positions], dtype=torch.long, device=device)
    valid = torch.arange(longest, device=device) < sequence_lengths[:, None]
    embeds = prompts.reshape(-1, prompts.shape[-1])[gather].to(model.dtype)   # [U, L, hidden]
    last = sequence_lengths - 1
    kept = last.unique()                                  # logits only where some sequence ends
    recorder = KVRecorder(needs_grad([prompts]))
    # The decoder, not the model: `inject`'s hooks sit on the model's forward and never see this pass.
    hidden = model.get_decoder()(inputs_embeds=embeds, attention_mask=valid.long(), use_cache=False,
                                 **{CONTEXT_KEYWORD: recorder}).last_hidden_state
    sequence_logits = output_logits(model, hidden[:, kept])[torch.arange(len(sequences), device=device),
                                                            torch.searchsorted(kept, last)]
    return Memory(recorder.pool(sequence_lengths), row_index, sequence_logits[row_index[:, 0].clamp(min=0)])
