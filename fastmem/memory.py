"""`MemoryBank`: many trainable memories for one model, one per slot.

Two kinds, both made from the model they serve:

- ``MemoryBank.soft_prompts(model, slots=S, length=P)``: ``embeddings [S, P, hidden]``, placed before a
  row's input embeddings (prompt tuning; experiential latent memories).
- ``MemoryBank.prefixes(model, slots=S, length=P)``: ``keys`` and ``values [L, S, P, Hkv, D]``, extra keys
  and values at every layer (prefix tuning; ReasonCACHE). ``init="tokens"`` starts each slot from the keys
  and values the model computes for random vocabulary tokens (the prefix a fresh soft prompt amounts to).

``lengths [S]`` holds each slot's valid positions (P unless an adapter with fewer tokens was loaded).
The bank's parameters are its only trainable tensors; pass them to the optimizer, or train slots with
`fastmem.MemoryTrainer`, which keeps per-slot optimizer state in the bank (`optimizer_state`).
``bank.save(path)`` writes safetensors with a JSON header (kind, model shape), optimizer state included;
``MemoryBank.load(path, model)`` checks both.
"""
from __future__ import annotations

import json
import os
from typing import Callable, ClassVar, Sequence, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from fastmem.hf.architectures import ModelShape, model_shape
from fastmem.hf.attention import check_patched
from fastmem.hf.pools import KVPool, Memory
from fastmem.hf.shared_prefix import shared_prefix
from fastmem.hf.soft_prompts import soft_prompt_memory
from fastmem.hf.peft_adapters import PromptAdapter, read_prompt_adapter

FORMAT = "fastmem.MemoryBank"
FORMAT_VERSION = 1
HEADER_KEY = "fastmem"
OPTIMIZER_PREFIX = "optimizer_"      # buffers (and saved tensors) holding per-slot optimizer state
# What draws a new bank's random initial values: torch's global generator (None), one generator (on its own
# device), or one per slot (slot s draws from its own alone: its values do not depend on the other slots).
Generators = Union[torch.Generator, Sequence[torch.Generator], None]


class MemoryBank(nn.Module):
    """S memory slots of at most P positions for models of one shape (see the module docstring)."""

    kind: ClassVar[str]
    peft_type: ClassVar[str]
    _SLOT_DIM: ClassVar[int]         # the slot dimension of every parameter; positions follow it (kept inside)
    INITS: ClassVar[tuple[str, ...]]  # the initializations the kind's constructor accepts
    KINDS: ClassVar[dict[str, type["MemoryBank"]]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        MemoryBank.KINDS[cls.kind] = cls

    def __init__(self, shape: ModelShape, lengths: Tensor, tensors: dict[str, Tensor]):
        super().__init__()
        self.model_shape = shape
        self.register_buffer("lengths", lengths.long())
        for name, tensor in tensors.items():
            self.register_parameter(name, nn.Parameter(tensor))
        self._checked_version: tuple | None = None

    @classmethod
    def tensor_shapes(cls, shape: ModelShape, slots: int, length: int) -> dict[str, tuple[int, ...]]:
        """Name -> shape of each parameter of a bank of this kind."""
        raise NotImplementedError

    @classmethod
    def initial_tensors(cls, model, shape: ModelShape, slots: int, length: int, dtype: torch.dtype,
                        init: str, generator: Generators = None) -> dict[str, Tensor]:
        """Name -> initial value of each parameter, on the model's device (``init``: the kind's initialization,
        see its constructor; ``generator``: see `Generators`)."""
        raise NotImplementedError

    def adapter_tensors(self, adapter: PromptAdapter) -> dict[str, Tensor]:
        """Name -> the adapter's values for one slot's first n positions (ValueError if it does not fit)."""
        raise NotImplementedError

    def memory_for(self, model, index: Tensor) -> Memory:
        """The `Memory` a batch with slot ids ``index [B, M]`` attends to."""
        return self.memory_of(model, dict(self.named_parameters()), self.lengths, index)

    @classmethod
    def memory_of(cls, model, tensors: dict[str, Tensor], lengths: Tensor, index: Tensor) -> Memory:
        """The `Memory` of slots laid out like this kind's parameters (``tensors``, e.g. `slot_rows`, with
        valid ``lengths``), for a batch with slot ids ``index [B, M]`` into them."""
        raise NotImplementedError

    @classmethod
    def _create(cls, model, slots: int, length: int, dtype: torch.dtype | None, init: str,
                generator: Generators) -> "MemoryBank":
        if not (isinstance(slots, int) and isinstance(length, int) and slots > 0 and length > 0):
            raise ValueError(f"slots and length must be positive ints; got slots={slots!r}, length={length!r}")
        if init not in cls.INITS:
            raise ValueError(f"init must be one of {', '.join(cls.INITS)} for {cls.kind} memories; got {init!r}")
        shape = model_shape(model)
        if isinstance(generator, (list, tuple)) and len(generator) != slots:
            raise ValueError(f"pass one generator per slot: {slots} slots, {len(generator)} generators")
        tensors = cls.initial_tensors(model, shape, slots, length, dtype or model.dtype, init, generator)
        return cls(shape, torch.full((slots,), length, dtype=torch.long, device=model.device), tensors)

    @classmethod
    def soft_prompts(cls, model, slots: int, length: int, dtype: torch.dtype | None = None,
                     generator: Generators = None) -> "SoftPromptBank":
        """S soft prompts ``[S, P, hidden]``, initialized from the embeddings of random vocabulary tokens (drawn
        by ``generator``: `Generators`)."""
        return SoftPromptBank._create(model, slots, length, dtype, "tokens", generator)

    @classmethod
    def prefixes(cls, model, slots: int, length: int, dtype: torch.dtype | None = None,
                 init: str = "normal", generator: Generators = None) -> "PrefixBank":
        """S prefixes: keys and values ``[L, S, P, Hkv, D]``.

        init: ``"normal"``, N(0, 1) as PEFT does; or ``"tokens"``, each slot the keys and values ``model``
        (patched with `fastmem.patch`) computes for P random vocabulary tokens at positions 0..P-1, i.e.
        the prefix that a fresh soft prompt of those tokens' embeddings amounts to (Li & Liang 2021
        initialize prefixes from real words' activations). On SmolLM2-135M-Instruct an untrained N(0, 1)
        prefix of 8 positions moves the next-token distribution of a prompt by 1-6 nats (KL) and changes
        its top token in 7 of 8 prompts; random tokens' embeddings move it by 0.02-0.07 nats. generator: what
        draws the normal values or the tokens (`Generators`).
        """
        return PrefixBank._create(model, slots, length, dtype, init, generator)

    @property
    def num_slots(self) -> int:
        return self.lengths.shape[0]

    @property
    def length(self) -> int:
        """P, the most positions a slot can hold."""
        return next(self.parameters()).shape[self._SLOT_DIM + 1]

    def version(self) -> tuple[int, ...]:
        """Changes whenever a parameter or the lengths change (in place or replaced)."""
        return tuple(v for t in (*self.parameters(), self.lengths) for v in (t.data_ptr(), t._version))

    def validate(self, model) -> None:
        """ValueError unless the bank fits ``model`` (shape, device), every slot length lies in [0, length]
        and every value is finite."""
        mismatches = self.model_shape.mismatches(model_shape(model))
        if mismatches:
            raise ValueError(f"this {self.kind} bank was made for another model ({'; '.join(mismatches)}; "
                             "bank vs model)")
        if self.lengths.device != model.device:
            raise ValueError(f"the bank is on {self.lengths.device} but the model on {model.device}; "
                             "move it with bank.to(model.device)")
        if self._checked_version == self.version():
            return
        bad_lengths = ((self.lengths < 0) | (self.lengths > self.length)).nonzero().flatten().tolist()
        if bad_lengths:
            raise ValueError(f"memory slots {bad_lengths} have lengths {self.lengths[bad_lengths].tolist()}, outside "
                             f"[0, {self.length}] (the bank's positions per slot)")
        nonfinite = [self.per_slot(~torch.isfinite(p)).any(dim=1) for p in self.parameters()]
        bad_slots = torch.stack(nonfinite).any(dim=0).nonzero().flatten().tolist()
        if bad_slots:
            raise ValueError(f"memory slots {bad_slots} hold non-finite values (NaN or inf)")
        self._checked_version = self.version()

    def slot_rows(self, slots: Tensor) -> dict[str, Tensor]:
        """Name -> a detached copy of slots ``slots [K]`` of each parameter (`take_slots`)."""
        return {name: self.take_slots(p.detach(), slots) for name, p in self.named_parameters()}

    def write_slot_rows(self, slots: Tensor, rows: dict[str, Tensor]) -> None:
        """Overwrite slots ``slots [K]`` (distinct) of the named parameters with finite ``rows``, laid out as
        `slot_rows` returns them, in place; every other slot keeps its bits."""
        if not all(bool(torch.isfinite(row).all()) for row in rows.values()):
            raise ValueError(f"refusing to write non-finite values into memory slots {slots.tolist()}")
        was_checked = self._checked_version == self.version()
        with torch.no_grad():
            for name, row in rows.items():
                parameter = getattr(self, name)
                self.put_slots(parameter, slots, row.to(parameter.dtype))
        if was_checked:                      # finite values written into a checked bank: still finite
            self._checked_version = self.version()

    # -- the slot layout: where a slot lies in a parameter is the bank's business -------------------------
    # A tensor "laid out like a parameter" has a parameter's shape with any number K of slots: a parameter,
    # `slot_rows`, a `fastmem.MemoryTrainer` gradient or optimizer state.

    @classmethod
    def take_slots(cls, tensor: Tensor, slots: Tensor) -> Tensor:
        """A copy of slots ``slots [K]`` (int64, on ``tensor``'s device) of ``tensor``, laid out like a parameter."""
        return tensor.index_select(cls._SLOT_DIM, slots)

    @classmethod
    def put_slots(cls, tensor: Tensor, slots: Tensor, rows: Tensor) -> Tensor:
        """Copies ``rows`` (K slots, laid out like ``tensor``) into slots ``slots [K]`` (distinct) of ``tensor``, in
        place; returns ``tensor``."""
        return tensor.index_copy_(cls._SLOT_DIM, slots, rows)

    @classmethod
    def per_slot(cls, tensor: Tensor) -> Tensor:
        """``tensor`` (laid out like a parameter, K slots) as ``[K, n]``: one flat row per slot."""
        return tensor.movedim(cls._SLOT_DIM, 0).flatten(1)

    @classmethod
    def along_slots(cls, values: Tensor, like: Tensor) -> Tensor:
        """``values [K]`` viewed to broadcast along the slot dimension of ``like`` (laid out like a parameter)."""
        return values.view([-1 if dim == cls._SLOT_DIM else 1 for dim in range(like.dim())])

    def read_vectors(self, slots: Tensor | None = None) -> Tensor:
        """Slots ``slots [K]`` (None: every slot) as flat fp32 vectors ``[K, F]``: every parameter's part of a slot,
        flattened, in parameter order (F values per slot; what `write_vectors` takes back, e.g. from a store)."""
        if slots is None:
            slots = torch.arange(self.num_slots, device=self.lengths.device)
        return torch.cat([self.per_slot(row).float() for row in self.slot_rows(slots).values()], dim=1)

    def write_vectors(self, slots: Tensor, vectors: Tensor) -> None:
        """Overwrite slots ``slots [K]`` (distinct) with flat vectors ``[K, F]`` laid out as `read_vectors` makes
        them (any device and float dtype; cast to the bank's). ValueError, writing nothing, when the shape is not
        ``[K, F]`` with F the bank's values per slot, or a value is not finite."""
        sizes = [p.numel() // p.shape[self._SLOT_DIM] for p in self.parameters()]
        if vectors.dim() != 2 or tuple(vectors.shape) != (len(slots), sum(sizes)):
            raise ValueError(f"expected vectors [{len(slots)}, {sum(sizes)}] ({sum(sizes)} values per slot of this "
                             f"bank); got {list(vectors.shape)}")
        rows = {}
        for (name, parameter), part in zip(self.named_parameters(), vectors.split(sizes, dim=1)):
            slot_shape = [size for dim, size in enumerate(parameter.shape) if dim != self._SLOT_DIM]
            part = part.to(device=parameter.device, dtype=parameter.dtype)   # a store may live elsewhere
            rows[name] = part.reshape(len(slots), *slot_shape).movedim(0, self._SLOT_DIM)
        self.write_slot_rows(slots, rows)

    def optimizer_state(self) -> dict[str, Tensor]:
        """Per-slot optimizer state kept with the bank (name -> tensor), as `fastmem.MemoryTrainer` creates it.

        Stored as buffers (``.to`` moves them, `save` writes them, `load` restores them); empty until set.
        """
        return {name.removeprefix(OPTIMIZER_PREFIX): t for name, t in self.named_buffers()
                if name.startswith(OPTIMIZER_PREFIX)}

    def set_optimizer_state(self, state: dict[str, Tensor]) -> None:
        """Keep ``state`` (name -> tensor) with the bank, replacing entries of the same names."""
        for name, tensor in state.items():
            self.register_buffer(OPTIMIZER_PREFIX + name, tensor)

    def slot_selector(self, slot: int, positions: int | None = None) -> tuple:
        """Index selecting ``slot`` (its first ``positions`` positions) of every parameter: ``bank.keys[sel]``."""
        return (slice(None),) * self._SLOT_DIM + (slot, slice(positions))

    def load_peft(self, peft_model_or_dir, slot: int, adapter_name: str | None = None) -> "MemoryBank":
        """Copy a PEFT adapter (a `PeftModel` or a saved adapter directory) into ``slot``; returns self.

        Soft-prompt banks take prompt tuning, prefix banks prefix tuning (projections applied). An adapter
        of n <= P virtual tokens fills the slot's first n positions (the rest are zeroed) and sets
        ``lengths[slot] = n``.
        """
        if not (isinstance(slot, int) and 0 <= slot < self.num_slots):
            raise IndexError(f"slot {slot!r} outside [0, {self.num_slots})")
        adapter = read_prompt_adapter(peft_model_or_dir, adapter_name)
        if adapter.peft_type != self.peft_type:
            raise ValueError(f"a {self.kind} bank loads {self.peft_type} adapters, not {adapter.peft_type}")
        if adapter.num_transformer_submodules != 1:
            raise ValueError("only decoder-only adapters (num_transformer_submodules=1) can be loaded")
        if adapter.num_virtual_tokens > self.length:
            raise ValueError(f"the adapter has {adapter.num_virtual_tokens} virtual tokens but slots hold "
                             f"{self.length}")
        values = self.adapter_tensors(adapter)
        with torch.no_grad():
            for name, value in values.items():
                parameter = getattr(self, name)
                parameter[self.slot_selector(slot)] = 0
                parameter[self.slot_selector(slot, adapter.num_virtual_tokens)] = value.to(parameter)
            self.lengths[slot] = adapter.num_virtual_tokens
        return self

    def save(self, path: str | os.PathLike) -> None:
        """Write the bank to ``path``: safetensors, with a JSON header (kind, slots, length, model shape).

        The file holds the parameters, ``lengths`` and any `optimizer_state`."""
        header = {"format": FORMAT, "version": FORMAT_VERSION, "kind": self.kind, "slots": self.num_slots,
                  "length": self.length, "model": self.model_shape.as_dict()}
        tensors = {name: t.detach().contiguous() for name, t in (*self.named_parameters(), *self.named_buffers())}
        save_file(tensors, os.fspath(path), metadata={HEADER_KEY: json.dumps(header)})

    @classmethod
    def load(cls, path: str | os.PathLike, model) -> "MemoryBank":
        """A bank saved by `save`, checked against ``model``, on the model's device, bit-exact.

        ValueError for a truncated or foreign file, or a bank saved for a model of another shape; nothing
        is built until every check has passed.
        """
        try:
            with safe_open(os.fspath(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except (SafetensorError, OSError) as error:
            raise ValueError(f"cannot read memory bank {path}: {error}") from None
        try:
            header = json.loads(metadata[HEADER_KEY])
            kind_class = cls.KINDS[header["kind"]]
            saved_shape = ModelShape(**header["model"])
            slots, length = int(header["slots"]), int(header["length"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path} is not a fastmem memory bank (metadata {metadata})") from None
        if header.get("format") != FORMAT or header.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path}: unsupported format {header.get('format')!r} version {header.get('version')!r}")
        mismatches = saved_shape.mismatches(model_shape(model))
        if mismatches:
            raise ValueError(f"{path} was saved for another model ({'; '.join(mismatches)}; file vs model)")
        optimizer = {name.removeprefix(OPTIMIZER_PREFIX): tensors.pop(name) for name in list(tensors)
                     if name.startswith(OPTIMIZER_PREFIX)}
        expected = {**kind_class.tensor_shapes(saved_shape, slots, length), "lengths": (slots,)}
        found = {name: tuple(t.shape) for name, t in tensors.items()}
        if found != expected:
            raise ValueError(f"{path}: tensors {found} do not match a {kind_class.kind} bank {expected}")
        lengths = tensors.pop("lengths")
        if lengths.dtype.is_floating_point or int(lengths.min()) < 0 or int(lengths.max()) > length:
            raise ValueError(f"{path}: lengths must be integers in [0, {length}]")
        bank = kind_class(saved_shape, lengths.to(model.device),
                          {name: t.to(model.device) for name, t in tensors.items()})
        bank.set_optimizer_state({name: t.to(model.device) for name, t in optimizer.items()})
        return bank

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, slots={self.num_slots}, length={self.length}, "
                f"model={self.model_shape.as_dict()}")


class SoftPromptBank(MemoryBank):
    """Soft prompts: ``embeddings [S, P, hidden]``; a row's memory is its slots' vectors, concatenated."""

    kind = "soft_prompt"
    peft_type = "PROMPT_TUNING"
    _SLOT_DIM = 0

    @classmethod
    def tensor_shapes(cls, shape, slots, length):
        return {"embeddings": (slots, length, shape.hidden_size)}

    INITS = ("tokens",)

    @classmethod
    def initial_tensors(cls, model, shape, slots, length, dtype, init, generator=None):
        with torch.no_grad():
            tokens = _random_tokens(model, slots, length, generator)
            return {"embeddings": model.get_input_embeddings()(tokens).to(dtype)}

    def adapter_tensors(self, adapter):
        if adapter.token_dim != self.model_shape.hidden_size:
            raise ValueError(f"the adapter's token_dim {adapter.token_dim} differs from the model's hidden size "
                             f"{self.model_shape.hidden_size}")
        return {"embeddings": adapter.weights[:adapter.num_virtual_tokens]}

    @classmethod
    def memory_of(cls, model, tensors, lengths, index):
        return soft_prompt_memory(model, tensors["embeddings"], lengths, index)


class PrefixBank(MemoryBank):
    """Prefixes: ``keys``, ``values [L, S, P, Hkv, D]``, attended to at every layer before the row's keys."""

    kind = "prefix"
    peft_type = "PREFIX_TUNING"
    _SLOT_DIM = 1

    @classmethod
    def tensor_shapes(cls, shape, slots, length):
        size = (shape.num_layers, slots, length, shape.num_kv_heads, shape.head_dim)
        return {"keys": size, "values": size}

    INITS = ("normal", "tokens")

    @classmethod
    def initial_tensors(cls, model, shape, slots, length, dtype, init, generator=None):
        if init == "normal":
            return {name: _random(model, slots, generator, lambda count, one, device: torch.randn(
                        size[:1] + (count,) + size[2:], dtype=dtype, generator=one, device=device), dim=1)
                    for name, size in cls.tensor_shapes(shape, slots, length).items()}
        check_patched(model)
        with torch.no_grad():
            pool = shared_prefix(model, None, list(_random_tokens(model, slots, length, generator))).pool
        return {"keys": torch.stack([keys for keys, _ in pool.layers]).to(dtype),
                "values": torch.stack([values for _, values in pool.layers]).to(dtype)}

    def adapter_tensors(self, adapter):
        shape = self.model_shape
        expected = (shape.num_layers, shape.num_kv_heads, shape.num_kv_heads * shape.head_dim)
        found = (adapter.num_layers, adapter.num_attention_heads, adapter.token_dim)
        if found != expected:
            raise ValueError(f"the adapter's (num_layers, num_attention_heads, token_dim) = {found} do not match "
                             f"the model's (layers, KV heads, KV heads x head dim) = {expected}")
        per_layer = adapter.weights.reshape(adapter.num_virtual_tokens, shape.num_layers, 2, shape.num_kv_heads,
                                            shape.head_dim).transpose(0, 1)         # [L, n, 2, Hkv, D]
        return {"keys": per_layer[:, :, 0], "values": per_layer[:, :, 1]}

    @classmethod
    def memory_of(cls, model, tensors, lengths, index):
        pool = KVPool(tuple(zip(tensors["keys"].unbind(0), tensors["values"].unbind(0))), lengths)
        return Memory(pool, index)


def _random(model, slots: int, generator: Generators, draw: Callable, dim: int = 0) -> Tensor:
    """Random initial values of ``slots`` slots, along ``dim``, on the model's device: ``draw(count, generator,
    device)`` draws ``count`` slots' values; with one generator per slot, slot s's are ``generator[s]``'s."""
    if isinstance(generator, (list, tuple)):
        return torch.cat([draw(1, one, one.device).to(model.device) for one in generator], dim=dim)
    return draw(slots, generator, model.device if generator is None else generator.device).to(model.device)


def _random_tokens(model, slots: int, length: int, generator: Generators) -> Tensor:
    """``[slots, length]`` token ids drawn uniformly from the vocabulary (`_random`)."""
    return _random(model, slots, generator, lambda count, one, device: torch.randint(
        model.config.vocab_size, (count, length), generator=one, device=device))
