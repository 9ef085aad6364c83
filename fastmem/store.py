"""`MemoryStore`: trained memories keyed by question embeddings, searchable, bounded, crash-safe on disk.

An entry is a key (a question embedding ``[d]``), a memory tensor (one soft prompt ``[P, hidden]``
or one prefix ``[layers, 2, P, Hkv, D]``; every entry of a store has the same shape) and JSON
metadata (question, majority answer, vote share, step, hits, ...).

Search is exact cosine top-k by one matrix product on the keys' device; with ``faiss`` installed and
at least `FAISS_MIN_ENTRIES` entries it uses a FAISS inner-product index over the normalized keys
(exact as well, so both give the same results).

Eviction, when an add finds the store full: the entry with the fewest hits goes, ties broken by the
lowest vote share, then by the oldest. The new memory is always stored.

On disk (``dir``): ``store.json`` (format version, metadata, the name and SHA-256 of the tensor file)
and ``tensors-<generation>.safetensors`` (keys and memories). `save` writes the new tensor file,
then replaces ``store.json`` atomically (`os.replace`), then deletes the old tensor file: a crash at
any point leaves either the previous store or the new one, never a mix. `load` checks the version,
the checksum and every shape before building anything.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

FORMAT_VERSION = 1
MANIFEST = "store.json"
FAISS_MIN_ENTRIES = 50_000


class MemoryStore:
    """Memories keyed by question embeddings; in memory, or persisted under ``dir``."""

    def __init__(self, dir: str | os.PathLike | None = None, capacity: int = 10_000):
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be a positive integer, got {capacity!r}")
        self.dir = None if dir is None else Path(dir)
        self.capacity = capacity
        self.keys: Tensor | None = None          # [N, d] float32
        self.memories: Tensor | None = None      # [N, *memory_shape]
        self.metadata: list[dict] = []           # one dict per entry, each with a unique "id"
        self._next_id = 0
        self._generation = 0
        if self.dir is not None:
            _check_writable(self.dir)

    def __len__(self) -> int:
        return len(self.metadata)

    @property
    def ids(self) -> list[int]:
        return [entry["id"] for entry in self.metadata]

    def _row(self, entry_id: int) -> int:
        for row, entry in enumerate(self.metadata):
            if entry["id"] == entry_id:
                return row
        raise KeyError(f"no memory with id {entry_id} in the store")

    def get(self, entry_id: int) -> tuple[Tensor, dict]:
        """The memory tensor and metadata of entry ``entry_id``."""
        row = self._row(entry_id)
        return self.memories[row], dict(self.metadata[row])

    def add(self, key: Tensor, memory: Tensor, **metadata) -> int:
        """Store ``memory`` under ``key`` ``[d]``; evicts one entry first when full. Returns the new id."""
        key = _as_key(key, None if self.keys is None else self.keys.shape[1])
        if not torch.isfinite(memory).all():
            raise ValueError("memory holds non-finite values; refusing to store it")
        if self.memories is not None and memory.shape != self.memories.shape[1:]:
            raise ValueError(f"memory shape {tuple(memory.shape)} differs from the store's "
                             f"{tuple(self.memories.shape[1:])}")
        json.dumps(metadata)  # fail now, not at save time, on metadata JSON cannot hold
        if len(self) >= self.capacity:
            self._remove_rows([self.eviction_candidate()])
        entry = {"hits": 0, "vote_share": 0.0, **metadata, "id": self._next_id}
        self._next_id += 1
        memory = memory.detach().to(self.memories.device if self.memories is not None else memory.device)
        self.keys = key[None] if self.keys is None else torch.cat([self.keys, key[None].to(self.keys.device)])
        self.memories = memory[None].clone() if self.memories is None else torch.cat([self.memories, memory[None]])
        self.metadata.append(entry)
        return entry["id"]

    def key(self, entry_id: int) -> Tensor:
        """The key ``[d]`` of entry ``entry_id``."""
        return self.keys[self._row(entry_id)]

    def update(self, entry_id: int, memory: Tensor | None = None, key: Tensor | None = None,
               **metadata) -> None:
        """Replace an entry's memory and/or key, and merge new metadata into it (all checked first)."""
        row = self._row(entry_id)
        if memory is not None and (memory.shape != self.memories.shape[1:] or not torch.isfinite(memory).all()):
            raise ValueError(f"memory must be finite and shaped {tuple(self.memories.shape[1:])}")
        key = None if key is None else _as_key(key, self.keys.shape[1])
        json.dumps(metadata)
        if memory is not None:
            self.memories[row] = memory.detach().to(self.memories.device)
        if key is not None:
            self.keys[row] = key.to(self.keys.device)
        self.metadata[row].update({k: v for k, v in metadata.items() if k != "id"})

    def record_hits(self, entry_ids) -> None:
        """Count one retrieval for each id in ``entry_ids``."""
        for entry_id in entry_ids:
            self.metadata[self._row(int(entry_id))]["hits"] += 1

    def eviction_candidate(self) -> int:
        """Row of the entry to evict: fewest hits, then lowest vote share, then oldest."""
        return min(range(len(self)), key=lambda row: (self.metadata[row]["hits"],
                                                      self.metadata[row]["vote_share"],
                                                      self.metadata[row]["id"]))

    def _remove_rows(self, rows: list[int]) -> None:
        removed = set(rows)
        keep = [row for row in range(len(self)) if row not in removed]
        index = torch.tensor(keep, dtype=torch.long, device=self.keys.device)
        self.keys = self.keys[index]
        self.memories = self.memories[index.to(self.memories.device)]
        self.metadata = [self.metadata[row] for row in keep]

    def search(self, keys: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Top-``k`` cosine matches for each query key.

        keys: ``[Q, d]`` (or ``[d]``). Returns ``(scores [Q, k], ids [Q, k])``, best first; where the
        store has fewer than k entries the tail is padded with score ``-inf`` and id ``-1``.
        """
        queries = (keys[None] if keys.dim() == 1 else keys).detach().float()
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if queries.dim() != 2 or (self.keys is not None and queries.shape[1] != self.keys.shape[1]):
            raise ValueError(f"search keys must be [Q, {'d' if self.keys is None else self.keys.shape[1]}], "
                             f"got {tuple(keys.shape)}")
        scores = torch.full((len(queries), k), float("-inf"))
        ids = torch.full((len(queries), k), -1, dtype=torch.long)
        if len(self) == 0 or len(queries) == 0:
            return scores, ids
        found = min(k, len(self))
        if len(self) >= FAISS_MIN_ENTRIES and _faiss() is not None:   # importing faiss takes seconds
            top_scores, top_rows = _faiss_search(self.keys, queries, found)
        else:
            similarity = _normalized(queries.to(self.keys.device)) @ _normalized(self.keys).T
            top_scores, top_rows = similarity.topk(found, dim=1)
        entry_ids = torch.tensor(self.ids, dtype=torch.long)
        scores[:, :found] = top_scores.float().cpu()
        ids[:, :found] = entry_ids[top_rows.cpu()]
        return scores, ids

    def consolidate(self, threshold: float = 0.95) -> int:
        """Merge entries whose keys have cosine similarity above ``threshold``; returns how many merged away.

        Greedy, oldest first: each entry absorbs the later entries similar to it. The merged memory and
        key are the means weighted by vote share (uniform when all shares are 0); hits add up, and so do
        ``members`` when every merged entry has them (clusters); the survivor keeps its id and its other
        metadata, and lists the absorbed ids and questions under ``merged``.
        """
        if len(self) < 2:
            return 0
        similarity = _normalized(self.keys) @ _normalized(self.keys).T
        absorbed: set[int] = set()
        for row in range(len(self)):
            if row in absorbed:
                continue
            group = [row] + [other for other in range(row + 1, len(self))
                             if other not in absorbed and similarity[row, other] > threshold]
            if len(group) == 1:
                continue
            shares = torch.tensor([self.metadata[r]["vote_share"] for r in group], dtype=torch.float32)
            weights = shares / shares.sum() if shares.sum() > 0 else torch.full_like(shares, 1 / len(group))
            weights = weights.to(self.memories.device)
            rows = torch.tensor(group, device=self.memories.device)
            self.memories[row] = (self.memories[rows].float() * weights.view(-1, *[1] * (self.memories.dim() - 1))
                                  ).sum(0).to(self.memories.dtype)
            self.keys[row] = (self.keys[rows.to(self.keys.device)] * weights.to(self.keys.device)[:, None]).sum(0)
            survivor = self.metadata[row]
            survivor["hits"] = sum(self.metadata[r]["hits"] for r in group)
            if all("members" in self.metadata[r] for r in group):   # clusters: their sizes add up too
                survivor["members"] = sum(self.metadata[r]["members"] for r in group)
            survivor["vote_share"] = float((shares * weights.cpu()).sum()) if shares.sum() > 0 else 0.0
            survivor.setdefault("merged", [])
            survivor["merged"] += [{"id": self.metadata[r]["id"], "question": self.metadata[r].get("question")}
                                   for r in group[1:]]
            absorbed.update(group[1:])
        self._remove_rows(sorted(absorbed))
        return len(absorbed)

    def save(self) -> Path:
        """Write the store under its ``dir`` crash-safely (see the module docstring); returns the dir."""
        if self.dir is None:
            raise ValueError("this store has no dir; create it with MemoryStore(dir=...) to save it")
        _check_writable(self.dir)
        previous = _read_manifest(self.dir) if (self.dir / MANIFEST).exists() else None
        self._generation = max(self._generation, previous["generation"] if previous else 0) + 1
        tensor_name = f"tensors-{self._generation}.safetensors"
        tensors = {} if self.keys is None else {"keys": self.keys.contiguous().cpu(),
                                                "memories": self.memories.contiguous().cpu()}
        _atomic_write(self.dir / tensor_name, lambda path: save_file(tensors, str(path)))
        manifest = {
            "format_version": FORMAT_VERSION,
            "generation": self._generation,
            "capacity": self.capacity,
            "next_id": self._next_id,
            "tensor_file": tensor_name,
            "sha256": _sha256(self.dir / tensor_name),
            "memory_shape": None if self.memories is None else list(self.memories.shape[1:]),
            "memory_dtype": None if self.memories is None else str(self.memories.dtype).removeprefix("torch."),
            "entries": self.metadata,
        }
        _atomic_write(self.dir / MANIFEST, lambda path: path.write_text(json.dumps(manifest, indent=1)))
        if previous and previous["tensor_file"] != tensor_name:
            (self.dir / previous["tensor_file"]).unlink(missing_ok=True)
        return self.dir

    @classmethod
    def load(cls, dir: str | os.PathLike) -> "MemoryStore":
        """Read a saved store; a missing, corrupted or inconsistent store is a ValueError (nothing partial)."""
        path = Path(dir)
        manifest = _read_manifest(path)
        tensor_path = path / manifest["tensor_file"]
        if not tensor_path.exists():
            raise ValueError(f"{tensor_path} is missing: the store at {path} is incomplete")
        if _sha256(tensor_path) != manifest["sha256"]:
            raise ValueError(f"{tensor_path} does not match the checksum in {path / MANIFEST}: corrupted")
        try:
            tensors = load_file(str(tensor_path))
        except (SafetensorError, OSError) as error:
            raise ValueError(f"cannot read {tensor_path}: {error}") from error
        entries = manifest["entries"]
        if entries:
            if set(tensors) != {"keys", "memories"}:
                raise ValueError(f"{tensor_path} must hold 'keys' and 'memories', found {sorted(tensors)}")
            if len(tensors["keys"]) != len(entries) or len(tensors["memories"]) != len(entries) \
                    or list(tensors["memories"].shape[1:]) != manifest["memory_shape"]:
                raise ValueError(f"{tensor_path} holds {len(tensors['keys'])} keys and memories of shape "
                                 f"{list(tensors['memories'].shape)}, but {MANIFEST} lists {len(entries)} "
                                 f"entries of shape {manifest['memory_shape']}")
        store = cls(path, capacity=manifest["capacity"])
        store.metadata = entries
        store.keys, store.memories = (tensors["keys"], tensors["memories"]) if entries else (None, None)
        store._next_id = manifest["next_id"]
        store._generation = manifest["generation"]
        return store


def _as_key(key: Tensor, dim: int | None) -> Tensor:
    if not isinstance(key, Tensor) or key.dim() != 1:
        raise ValueError(f"a key must be a 1-D tensor, got {getattr(key, 'shape', type(key).__name__)}")
    if dim is not None and key.shape[0] != dim:
        raise ValueError(f"key has {key.shape[0]} dimensions, the store's keys have {dim}")
    if not torch.isfinite(key).all() or key.norm() == 0:
        raise ValueError("a key must be finite and non-zero (cosine similarity needs a direction)")
    return key.detach().float()


def _normalized(x: Tensor) -> Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def _faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def _faiss_search(keys: Tensor, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Exact inner-product search over normalized keys with FAISS: ``(scores [Q, k], rows [Q, k])``."""
    faiss = _faiss()
    index = faiss.IndexFlatIP(keys.shape[1])
    index.add(_normalized(keys).cpu().numpy())
    scores, rows = index.search(_normalized(queries).cpu().numpy(), k)
    return torch.from_numpy(scores), torch.from_numpy(rows).long()


def _check_writable(path: Path) -> None:
    """Create ``path`` if needed and prove a file can be written there (fails before any work)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as error:
        raise ValueError(f"store directory {path} is not writable: {error}") from error


def _atomic_write(path: Path, write) -> None:
    """Call ``write(temporary_path)``, fsync, then rename onto ``path``."""
    temporary = path.with_name(f".{path.name}.tmp")
    write(temporary)
    with open(temporary, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_manifest(path: Path) -> dict:
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError as error:
        raise ValueError(f"no memory store at {path} ({MANIFEST} missing)") from error
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{manifest_path} is unreadable or corrupted: {error}") from error
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        found = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise ValueError(f"{manifest_path} has format version {found!r}; this fastmem reads version "
                         f"{FORMAT_VERSION}")
    missing = {"generation", "capacity", "next_id", "tensor_file", "sha256", "memory_shape", "entries"} - set(manifest)
    if missing:
        raise ValueError(f"{manifest_path} lacks {sorted(missing)}: corrupted")
    return manifest
