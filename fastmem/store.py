"""`MemoryStore`: trained memories keyed by question embeddings, searchable, bounded, durable on disk.

An entry is a key (a question embedding ``[d]`` fp32), a memory tensor (one soft prompt ``[P, hidden]`` or one
prefix ``[layers, 2, P, Hkv, D]``, or any flattening of them; every entry of a store has the same shape and
dtype) and its metadata, an `EntryMeta` (hits, vote share, question, majority answer, step, ...). Ids count up
from 0 and are never reused.

What lives where. In RAM: the unit-normalized keys ``[N, d]`` fp32 (the exact search index), each row's id,
hits and vote share, an eviction heap, and (``index="ivf"``) a FAISS IVF index. On disk (or in an in-memory
SQLite database when the store has no ``dir``): everything, including the raw keys, the metadata and the
memories, which are read one by one when `get` asks (a memory never has to fit in RAM with the others).
Memories may be stored as fp16 or bf16 (``dtype=``); `get` returns the stored dtype, on the CPU.

On disk (format version 2): ``dir/store.sqlite``, a SQLite database in WAL mode, ``synchronous=FULL``,
tagged with ``application_id`` 0x666D656D ("fmem") and ``user_version`` 2; ``dir/store.lock`` holds the
writer's lock. A writer keeps one SQLite transaction open: every `add` / `update` / eviction writes its rows
into it at once (amortized O(1): one SQL statement per row, no copy of the store), and `save` commits it
(the WAL is fsynced before `save` returns). So a save writes only what changed since the last one, a crash
or ``kill -9`` at any instant leaves the last committed state or the new one (SQLite's WAL commit is atomic;
uncommitted pages are discarded on the next open), and readers (``load(dir, readonly=True)``) see the last
committed state while a writer works or saves. A second writer on the same directory is refused with
`StoreLockedError` (an exclusive ``flock`` on ``store.lock``, released by the OS when the writer dies). Every
key and memory carries a CRC-32, checked when read: a damaged file is a ValueError naming it (and the entry),
never a partial store. A version-1 directory (``store.json`` + ``tensors-<gen>.safetensors``) is converted
by `load` into ``store.sqlite`` (atomically; the old files are left for the user to delete).

Why SQLite. Measured on this project's CPU machine (2 cores, local disk, 100 new entries per save), through
each candidate's Python API (scratch script; the ``store`` section of bench/throughput.py measures this store):

| candidate                                     | save ms / 100 at 1k / 10k / 97k entries (12 KB memories) | get one memory by id at 100k | 2,000 adds of 368 KB + a save per 100 |
|-----------------------------------------------|------------------------|---------|--------|
| SQLite (stdlib 3.40), blobs, WAL, fsync       | 1.9 / 2.9 / 2.2        | 0.011 ms | 6.2 s |
| safetensors shard per save + SQLite index     | 2.9 / 2.6 / 4.5        | 0.25 ms  | 3.0 s |
| LanceDB 0.40 (pylance 14), one commit per save | 4.9 / 6.2 / 7.8       | 84 ms (filtered scan) | 2.4 s |

LanceDB appends fastest (no write-ahead copy) but a lookup by id is a scan (84 ms at 100k, growing with the
store), each commit adds a fragment that needs compaction, and it neither locks out a second writer nor
says that a commit is fsynced; the shards need our own garbage collection of updated and evicted memories
(and readers holding an old snapshot break when a shard is collected). SQLite gives atomic fsynced commits,
concurrent readers, space reuse and lookups by id, and it ships with Python: no new dependency. Its price is
the WAL's second write (6.2 s instead of 2.4 s for the 2,000 adds: within the 10 s target).

Search is exact cosine top-k by one matrix product over the RAM keys. ``index="ivf"`` adds a FAISS
``IndexIVFFlat`` (inner product over the unit keys, ``4 sqrt(N)`` lists trained when the store first
searches with at least `IVF_MIN_ENTRIES` entries, `IVF_NPROBE` lists probed): approximate, for large stores;
its recall@k against exact search is measured by the ``store`` bench section.

Eviction, when an add finds the store full: the entry with the fewest hits goes, ties broken by the lowest
vote share, then by the oldest (a heap: O(log N)). The new memory is always stored.
"""
from __future__ import annotations

import fcntl
import hashlib
import heapq
import json
import math
import os
import sqlite3
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from urllib.parse import quote

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

FORMAT_VERSION = 2
DATABASE = "store.sqlite"
LOCK = "store.lock"
VERSION_1_MANIFEST = "store.json"
APPLICATION_ID = 0x666D656D   # "fmem"
MEMORY_DTYPES = {str(dtype).removeprefix("torch."): dtype
                 for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}
INDEXES = ("exact", "ivf")
IVF_MIN_ENTRIES = 10_000
IVF_NPROBE = 32
SCHEMA = """
CREATE TABLE state(name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE entries(id INTEGER PRIMARY KEY, key BLOB NOT NULL, key_crc INTEGER NOT NULL, hits INTEGER NOT NULL,
                     vote_share REAL NOT NULL, settled INTEGER NOT NULL, meta TEXT NOT NULL);
CREATE TABLE memories(id INTEGER PRIMARY KEY, data BLOB NOT NULL, crc INTEGER NOT NULL);
"""


@dataclass
class EntryMeta:
    """One store entry's metadata: what `MemoryStore.get` / `MemoryStore.meta` return and `add` / `update` take.

    Kept by the store itself: ``id`` (assigned by `add`, ignored when given), ``hits`` (retrievals, counted by
    `MemoryStore.record_hits`; an int >= 0) and ``vote_share`` (a finite number, the majority's share of the
    samples in [0, 1] for the learner): eviction goes by fewest hits, then lowest share. ``merged``: what
    `MemoryStore.consolidate` folded into this entry, ``{"id", "question"}`` per absorbed entry; ``members``:
    how many questions a cluster holds (None: not a cluster; consolidation adds them up when every merged
    entry has them). Written by `fastmem.OnlineLearner`: ``question`` (the entry's first question),
    ``answer`` (its majority answer, None when no sample had one), ``step`` (the learner's batch count when
    last written), ``last_question``, ``gate_trials`` / ``gate_gain`` (batches that measured the gate, and the
    mean agreement gain of memory samples over control samples, in [-1, 1]), ``replay`` (a cluster's remembered
    problems, ``{"prompt": [token ids], "traces": [[token ids], ...]}`` each). ``extra``: any other JSON
    values a caller keeps with the entry (names must differ from the fields').

    On disk, ``hits`` and ``vote_share`` are columns and the rest one JSON object whose keys are the field names
    with ``extra`` spread among them, each field written only when it differs from its default: a store
    written before this class (any dict of metadata) reads back with its unknown keys in ``extra``.
    """
    id: int = -1
    hits: int = 0
    vote_share: float = 0.0
    question: str | None = None
    answer: str | None = None
    step: int = 0
    members: int | None = None
    last_question: str | None = None
    gate_trials: int = 0
    gate_gain: float = 0.0
    replay: list[dict] = field(default_factory=list)
    merged: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def _row(self) -> tuple[int, float, str]:
        """``(hits, vote_share, the rest as JSON)``; ValueError / TypeError for what the ranking or JSON cannot
        hold."""
        if isinstance(self.hits, bool) or not isinstance(self.hits, int) or self.hits < 0:
            raise ValueError(f"hits must be a non-negative integer, got {self.hits!r}")
        share = self.vote_share
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not math.isfinite(share):
            raise ValueError(f"vote_share must be a finite number, got {share!r}")
        named = {item.name for item in fields(self)}
        clashing = sorted(named & set(self.extra))
        if clashing:
            raise ValueError(f"extra metadata may not reuse the field names {clashing}")
        stored = {item.name: getattr(self, item.name) for item in fields(self)
                  if item.name not in _COLUMNS and getattr(self, item.name) != _DEFAULTS[item.name]}
        return self.hits, float(share), json.dumps({**stored, **self.extra})

    @classmethod
    def _from_row(cls, entry_id: int, hits: int, share: float, text: str) -> "EntryMeta":
        """The metadata of a stored row (`_row`'s inverse); keys that name no field go to ``extra``."""
        stored = json.loads(text)
        named = {name: stored.pop(name) for name in list(stored) if name in _DEFAULTS and name not in _COLUMNS}
        return cls(id=entry_id, hits=hits, vote_share=share, **named, extra=stored)


_COLUMNS = ("id", "hits", "vote_share", "extra")   # kept outside the JSON object (extra: spread into it)
_DEFAULTS = {item.name: item.default if item.default is not MISSING else item.default_factory()
             for item in fields(EntryMeta)}


class StoreLockedError(RuntimeError):
    """Another writer holds the store's directory."""


class MemoryStore:
    """Memories keyed by question embeddings; in memory, or persisted under ``dir`` (see the module docstring).

    ``MemoryStore(dir)`` starts an empty store (a store already in ``dir`` is replaced at the next `save`);
    `MemoryStore.load` opens a saved one. capacity: the most entries kept (evicting beyond it). dtype: the
    dtype memories are stored in (None: the first memory's; fp32, fp16, bf16 or fp64). index: ``"exact"``
    or ``"ivf"`` (FAISS, approximate; see the module docstring).
    Errors: ValueError for a bad argument or an unwritable ``dir``; `StoreLockedError` when another writer
    holds ``dir``.
    """

    def __init__(self, dir: str | os.PathLike | None = None, capacity: int = 10_000, *,
                 dtype: torch.dtype | None = None, index: str = "exact"):
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be a positive integer, got {capacity!r}")
        if dtype is not None and dtype not in MEMORY_DTYPES.values():
            raise ValueError(f"dtype must be one of {', '.join(MEMORY_DTYPES)} or None, got {dtype}")
        state = dict(capacity=capacity, next_id=0, key_dim=None, memory_shape=None,
                     memory_dtype=None if dtype is None else _dtype_name(dtype), settled_threshold=None)
        if dir is None:
            db = sqlite3.connect(":memory:", isolation_level=None)
            _create(db, state)
            self._attach(None, db, None, readonly=False, index=index)
        else:
            path = Path(dir)
            lock = _lock(path)
            database = path / DATABASE
            try:
                if not database.exists() and (path / VERSION_1_MANIFEST).exists():
                    raise ValueError(f"{path} holds a version-1 memory store ({VERSION_1_MANIFEST}); MemoryStore"
                                     f".load({str(path)!r}) converts it, or choose another directory")
                if not database.exists():
                    _initialize(database, state)
                self._attach(path, _connect(database, readonly=False), lock, readonly=False, index=index)
            except BaseException:
                lock.close()
                raise
            with self._reading(), self._writing():   # an existing store is replaced: committed at the next save
                self._db.execute("DELETE FROM entries")
                self._db.execute("DELETE FROM memories")
        self._state = state
        self._load_ram()

    @classmethod
    def load(cls, dir: str | os.PathLike, *, readonly: bool = False, index: str = "exact") -> "MemoryStore":
        """Open the store saved under ``dir``. readonly: a reader (no lock; sees the state committed when it
        opened, however long it stays open, while a writer goes on); else the writer (locks ``dir``).
        A version-1 directory is converted first (a writer only; a warning says so). Errors: ValueError for
        a missing, damaged or foreign store (naming the file), `StoreLockedError` (writers)."""
        path = Path(dir)
        database = path / DATABASE
        lock = None if readonly else _lock(path)
        try:
            if not database.exists() and (path / VERSION_1_MANIFEST).exists():
                if readonly:
                    raise ValueError(f"{path} holds a version-1 memory store; open it once as a writer "
                                     "(MemoryStore.load(dir)) to convert it")
                count = _convert_version_1(path)
                warnings.warn(f"converted the version-1 memory store at {path} ({count} entries) to version "
                              f"{FORMAT_VERSION} ({DATABASE}); {VERSION_1_MANIFEST} and its tensors-*.safetensors "
                              "are no longer read and may be deleted", stacklevel=2)
            if not database.exists():
                raise ValueError(f"no memory store at {path} ({DATABASE} missing)")
            store = cls.__new__(cls)
            store._attach(path, _connect(database, readonly=readonly), lock, readonly=readonly, index=index)
            with store._reading():
                store._state = {name: json.loads(value) for name, value in store._db.execute(
                    "SELECT name, value FROM state")}
                store._load_ram()
        except BaseException:
            if lock is not None:
                lock.close()
            raise
        return store

    @staticmethod
    def exists(dir: str | os.PathLike) -> bool:
        """Whether ``dir`` holds a saved store (either format version)."""
        return (Path(dir) / DATABASE).exists() or (Path(dir) / VERSION_1_MANIFEST).exists()

    # -- state ----------------------------------------------------------------------------------------

    def _attach(self, dir: Path | None, db: sqlite3.Connection, lock, readonly: bool, index: str) -> None:
        if index not in INDEXES:
            db.close()
            raise ValueError(f"index must be one of {', '.join(INDEXES)}, got {index!r}")
        self.dir, self._db, self._lock, self.readonly, self.index = dir, db, lock, readonly, index
        if dir is not None and not readonly:
            self._db.execute("BEGIN IMMEDIATE")
        elif readonly:
            self._db.execute("BEGIN")   # one snapshot for as long as the reader stays open

    def _load_ram(self) -> None:
        """The keys index, ids, hits, vote shares and eviction heap, from the database."""
        dim = self._state["key_dim"]
        self._index = _KeyIndex(dim, min(self._state["capacity"], 1024))
        ids, hits, shares, unsettled = [], [], [], set()
        rows = self._db.execute("SELECT id, key, key_crc, hits, vote_share, settled FROM entries ORDER BY id")
        while chunk := rows.fetchmany(4096):   # keys go into the index a chunk at a time: no second copy of all
            for entry_id, key, key_crc, entry_hits, share, settled in chunk:
                if zlib.crc32(key) != key_crc or len(key) != 4 * dim:
                    raise ValueError(f"{self._file()}: the key of entry {entry_id} is damaged (checksum or size)")
                ids.append(entry_id), hits.append(entry_hits), shares.append(share)
                if not settled:
                    unsettled.add(entry_id)
            keys = torch.frombuffer(bytearray(b"".join(row[1] for row in chunk)), dtype=torch.float32)
            self._index.extend(ids[-len(chunk):], keys.view(-1, dim))
        memories = self._db.execute("SELECT count(*) FROM memories").fetchone()[0]
        if memories != len(ids):
            raise ValueError(f"{self._file()}: {len(ids)} entries but {memories} memories: damaged")
        self._hits = dict(zip(ids, hits))
        self._shares = dict(zip(ids, shares))
        self._heap = [(h, s, i) for i, h, s in zip(ids, hits, shares)]
        heapq.heapify(self._heap)
        self._unsettled = unsettled
        self._ivf = None

    def _file(self) -> str:
        return str(self.dir / DATABASE) if self.dir is not None else "the in-memory store"

    @contextmanager
    def _reading(self):
        """Turns SQLite's errors into a ValueError naming the database file."""
        try:
            yield
        except sqlite3.DatabaseError as error:
            raise ValueError(f"{self._file()} is damaged or not a fastmem memory store: {error}") from error

    @contextmanager
    def _writing(self):
        """One change: all of its rows or none (a savepoint), in the open transaction."""
        if self.readonly:
            raise ValueError(f"this store was opened read-only (MemoryStore.load({str(self.dir)!r}, "
                             "readonly=True)); open it without readonly=True to change it")
        self._db.execute("SAVEPOINT change")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK TO change")
            self._db.execute("RELEASE change")
            raise
        self._db.execute("RELEASE change")

    def __len__(self) -> int:
        return len(self._index)

    @property
    def capacity(self) -> int:
        return self._state["capacity"]

    @property
    def progress(self) -> int | None:
        """The stream position given to the last `save` that gave one (committed with that save's entries);
        None when no save gave one. ``fastmem run --resume`` compares it with --out's records."""
        return self._state.get("progress")

    @property
    def ids(self) -> list[int]:
        """Every entry's id, oldest first (O(N log N): for inspection)."""
        return sorted(self._index.rows)

    @property
    def memory_shape(self) -> tuple[int, ...] | None:
        """The shape every memory has (None until the first add)."""
        return None if self._state["memory_shape"] is None else tuple(self._state["memory_shape"])

    @property
    def memory_dtype(self) -> torch.dtype | None:
        """The dtype memories are stored in (None until the first add, unless given)."""
        return None if self._state["memory_dtype"] is None else MEMORY_DTYPES[self._state["memory_dtype"]]

    def _check_id(self, entry_id: int) -> int:
        if int(entry_id) not in self._index.rows:
            raise KeyError(f"no memory with id {entry_id} in the store")
        return int(entry_id)

    # -- reading --------------------------------------------------------------------------------------

    def get(self, entry_id: int) -> tuple[Tensor, EntryMeta]:
        """The memory (``memory_shape``, ``memory_dtype``, CPU) and metadata of entry ``entry_id``, read from the
        database: new objects, so changing them changes nothing stored (write back with `update`). KeyError
        for an unknown id, ValueError when the stored memory is damaged."""
        entry_id = self._check_id(entry_id)
        with self._reading():
            row = self._db.execute("SELECT e.hits, e.vote_share, e.meta, m.data, m.crc FROM entries e "
                                   "JOIN memories m ON m.id = e.id WHERE e.id = ?", (entry_id,)).fetchone()
        if row is None:
            raise ValueError(f"{self._file()}: entry {entry_id} or its memory is missing: damaged")
        hits, share, meta, data, crc = row
        if zlib.crc32(data) != crc:
            raise ValueError(f"{self._file()}: the memory of entry {entry_id} fails its checksum: damaged")
        memory = torch.frombuffer(bytearray(data), dtype=self.memory_dtype).view(self.memory_shape)
        return memory, EntryMeta._from_row(entry_id, hits, share, meta)

    def meta(self, entry_id: int) -> EntryMeta:
        """The metadata of entry ``entry_id`` alone (`get` without reading the memory); KeyError for an unknown id."""
        entry_id = self._check_id(entry_id)
        with self._reading():
            hits, share, meta = self._db.execute("SELECT hits, vote_share, meta FROM entries WHERE id = ?",
                                                 (entry_id,)).fetchone()
        return EntryMeta._from_row(entry_id, hits, share, meta)

    def key(self, entry_id: int) -> Tensor:
        """The key ``[d]`` fp32 of entry ``entry_id`` as stored (not normalized)."""
        entry_id = self._check_id(entry_id)
        with self._reading():
            (key,) = self._db.execute("SELECT key FROM entries WHERE id = ?", (entry_id,)).fetchone()
        return torch.frombuffer(bytearray(key), dtype=torch.float32)

    def search(self, keys: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Top-``k`` cosine matches for each query key.

        keys: ``[Q, d]`` (or ``[d]``). Returns ``(scores [Q, k] fp32, ids [Q, k] int64)`` on the CPU, best
        first; where fewer than k are found the tail is padded with score ``-inf`` and id ``-1``.
        """
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        queries = (keys[None] if keys.dim() == 1 else keys).detach().float().cpu()
        dim = self._state["key_dim"]
        if queries.dim() != 2 or (dim is not None and queries.shape[1] != dim):
            raise ValueError(f"search keys must be [Q, {dim or 'd'}], got {tuple(keys.shape)}")
        scores = torch.full((len(queries), k), float("-inf"))
        ids = torch.full((len(queries), k), -1, dtype=torch.long)
        if len(self) == 0 or len(queries) == 0:
            return scores, ids
        found = min(k, len(self))
        units = _normalized(queries)
        if self.index == "ivf" and len(self) >= IVF_MIN_ENTRIES:
            if self._ivf is None:
                self._ivf = _Ivf(self._index)
            top_scores, top_ids = self._ivf.search(units, found)
        else:
            top_scores, top_ids = self._index.search(units, found)
        scores[:, :found], ids[:, :found] = top_scores, top_ids
        return scores, ids

    def eviction_candidate(self) -> int:
        """The id of the entry to evict: fewest hits, then lowest vote share, then oldest (ValueError when empty)."""
        if not len(self):
            raise ValueError("the store is empty: nothing to evict")
        while True:
            hits, share, entry_id = self._heap[0]
            if self._hits.get(entry_id) == hits and self._shares[entry_id] == share:
                return entry_id
            heapq.heappop(self._heap)   # stale: the entry changed or is gone

    # -- writing --------------------------------------------------------------------------------------

    def add(self, key: Tensor, memory: Tensor, meta: EntryMeta | None = None) -> int:
        """Store ``memory`` under ``key`` ``[d]`` with ``meta`` (None: an empty `EntryMeta`; its ``id`` is
        ignored); evicts one entry first when full. Returns the new id. Errors (ValueError / TypeError, the
        store unchanged): a key of the wrong size, zero or non-finite; a memory of another shape, empty or
        non-finite; metadata JSON or the ranking cannot hold."""
        key = _as_key(key, self._state["key_dim"])
        data = self._memory_bytes(memory)
        hits, share, meta = _checked_meta(meta or EntryMeta())
        key_bytes = key.numpy().tobytes()
        entry_id = self._state["next_id"]
        with self._writing():
            evicted = self.eviction_candidate() if len(self) >= self.capacity else None
            if evicted is not None:
                self._delete(evicted)
            self._db.execute("INSERT INTO entries VALUES (?, ?, ?, ?, ?, 0, ?)",
                             (entry_id, key_bytes, zlib.crc32(key_bytes), hits, share, meta))
            self._db.execute("INSERT INTO memories VALUES (?, ?, ?)", (entry_id, data, zlib.crc32(data)))
        if evicted is not None:
            self._forget(evicted)
        if self._state["key_dim"] is None:
            self._state.update(key_dim=key.shape[0], memory_shape=list(memory.shape),
                               memory_dtype=self._state["memory_dtype"] or _dtype_name(memory.dtype))
            self._index = _KeyIndex(key.shape[0], min(self.capacity, 1024))
        self._state["next_id"] = entry_id + 1
        self._index.extend([entry_id], key[None])
        if self._ivf is not None:
            self._ivf.add([entry_id], _normalized(key[None]))
        self._set_rank(entry_id, hits, share)
        self._unsettled.add(entry_id)
        return entry_id

    def update(self, entry_id: int, memory: Tensor | None = None, key: Tensor | None = None,
               meta: EntryMeta | None = None) -> None:
        """Replace an entry's memory, key and/or metadata (None: kept). ``meta`` replaces the stored metadata
        whole, hits included (read it with `meta`, change it with `dataclasses.replace`); its ``id`` is
        ignored. All checked first: errors as `add`'s, KeyError for an unknown id, the store unchanged."""
        entry_id = self._check_id(entry_id)
        key = None if key is None else _as_key(key, self._state["key_dim"])
        data = None if memory is None else self._memory_bytes(memory)
        hits, share, meta = _checked_meta(meta if meta is not None else self.meta(entry_id))
        with self._writing():
            self._db.execute("UPDATE entries SET hits = ?, vote_share = ?, meta = ? WHERE id = ?",
                             (hits, share, meta, entry_id))
            if data is not None:
                self._db.execute("UPDATE memories SET data = ?, crc = ? WHERE id = ?",
                                 (data, zlib.crc32(data), entry_id))
            if key is not None:
                key_bytes = key.numpy().tobytes()
                self._db.execute("UPDATE entries SET key = ?, key_crc = ?, settled = 0 WHERE id = ?",
                                 (key_bytes, zlib.crc32(key_bytes), entry_id))
        if key is not None:
            self._index.set(entry_id, key)
            self._unsettled.add(entry_id)
            if self._ivf is not None:
                self._ivf.remove([entry_id])
                self._ivf.add([entry_id], _normalized(key[None]))
        self._set_rank(entry_id, hits, share)

    def record_hits(self, entry_ids) -> None:
        """Count one retrieval for each id in ``entry_ids`` (all checked first: KeyError for an unknown one)."""
        entry_ids = [self._check_id(i) for i in entry_ids]
        with self._writing():
            self._db.executemany("UPDATE entries SET hits = hits + 1 WHERE id = ?", [(i,) for i in entry_ids])
        for entry_id in entry_ids:
            self._set_rank(entry_id, self._hits[entry_id] + 1, self._shares[entry_id])

    def consolidate(self, threshold: float = 0.95) -> int:
        """Merge entries whose keys have cosine similarity above ``threshold``; returns how many merged away.

        Greedy, oldest first: each entry absorbs the later entries similar to it. The merged memory and
        key are the means weighted by vote share (uniform when all shares are 0); hits add up, and so do
        ``members`` when every merged entry has them (clusters); the survivor keeps its id and its other
        metadata, and lists the absorbed ids and questions under ``merged``.

        Incremental: only pairs with an entry added or re-keyed since the last consolidation at this threshold
        or above are compared (the others were found dissimilar then), so the cost is O(changed × N · d);
        a lower threshold than last time compares every pair (in blocks of rows, never an N × N matrix).
        """
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must lie in (0, 1], got {threshold}")
        settled_at = self._state["settled_threshold"]
        fresh = self._unsettled if settled_at is not None and threshold >= settled_at else set(self._index.rows)
        neighbours: dict[int, set[int]] = {}
        for block in _blocks(sorted(fresh), 1024):
            for entry_id, other in self._index.pairs_above(block, threshold):
                neighbours.setdefault(entry_id, set()).add(other)
                neighbours.setdefault(other, set()).add(entry_id)
        absorbed: set[int] = set()
        groups = []
        for entry_id in sorted(neighbours):
            if entry_id in absorbed:
                continue
            group = [entry_id] + sorted(o for o in neighbours[entry_id] if o > entry_id and o not in absorbed)
            if len(group) > 1:
                groups.append(group)
                absorbed.update(group[1:])
        with self._writing():
            merged = [self._merge(group) for group in groups]
            settled = [(i,) for i in fresh - absorbed - {group[0] for group in groups}]
            self._db.executemany("UPDATE entries SET settled = 1 WHERE id = ?", settled)
        for group, (key, hits, share) in zip(groups, merged):
            for other in group[1:]:
                self._forget(other)
            self._index.set(group[0], key)
            if self._ivf is not None:
                self._ivf.remove([group[0]])
                self._ivf.add([group[0]], _normalized(key[None]))
            self._set_rank(group[0], hits, share)
        self._unsettled = {group[0] for group in groups}
        self._state["settled_threshold"] = threshold
        return len(absorbed)

    def _merge(self, group: list[int]) -> tuple[Tensor, int, float]:
        """Fold ``group[1:]`` into ``group[0]`` in the database; returns the survivor's (key, hits, share)."""
        entries = [self.get(i) for i in group]
        keys = torch.stack([self.key(i) for i in group])
        shares = torch.tensor([meta.vote_share for _, meta in entries], dtype=torch.float32)
        weights = shares / shares.sum() if shares.sum() > 0 else torch.full_like(shares, 1 / len(group))
        memories = torch.stack([memory for memory, _ in entries])
        memory = (memories.float() * weights.view(-1, *[1] * (memories.dim() - 1))).sum(0).to(memories.dtype)
        key = (keys * weights[:, None]).sum(0)
        metas = [meta for _, meta in entries]
        members = [meta.members for meta in metas]
        survivor = replace(metas[0], hits=sum(meta.hits for meta in metas),
                           members=None if None in members else sum(members),   # clusters: their sizes add up
                           vote_share=float((shares * weights).sum()) if shares.sum() > 0 else 0.0,
                           merged=metas[0].merged + [{"id": meta.id, "question": meta.question} for meta in metas[1:]])
        hits, share, meta = _checked_meta(survivor)
        data = memory.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        key_bytes = key.numpy().tobytes()
        self._db.execute("UPDATE entries SET key = ?, key_crc = ?, hits = ?, vote_share = ?, meta = ?, settled = 0 "
                         "WHERE id = ?", (key_bytes, zlib.crc32(key_bytes), hits, share, meta, group[0]))
        self._db.execute("UPDATE memories SET data = ?, crc = ? WHERE id = ?", (data, zlib.crc32(data), group[0]))
        for other in group[1:]:
            self._delete(other)
        return key, hits, share

    def _delete(self, entry_id: int) -> None:
        self._db.execute("DELETE FROM entries WHERE id = ?", (entry_id,))
        self._db.execute("DELETE FROM memories WHERE id = ?", (entry_id,))

    def _forget(self, entry_id: int) -> None:
        """Drop a deleted entry from RAM (its heap item goes stale)."""
        self._index.remove(entry_id)
        if self._ivf is not None:
            self._ivf.remove([entry_id])
        del self._hits[entry_id], self._shares[entry_id]
        self._unsettled.discard(entry_id)

    def _set_rank(self, entry_id: int, hits: int, share: float) -> None:
        self._hits[entry_id], self._shares[entry_id] = hits, share
        heapq.heappush(self._heap, (hits, share, entry_id))
        if len(self._heap) > 2 * len(self) + 64:   # drop stale items: amortized O(1) per change
            self._heap = [(self._hits[i], self._shares[i], i) for i in self._hits]
            heapq.heapify(self._heap)

    def _memory_bytes(self, memory: Tensor) -> bytes:
        """``memory`` checked against the store's shape and converted to its dtype, as bytes."""
        if not isinstance(memory, Tensor) or memory.numel() == 0:
            raise ValueError(f"a memory must be a non-empty tensor, got {getattr(memory, 'shape', type(memory))}")
        if self.memory_shape is not None and tuple(memory.shape) != self.memory_shape:
            raise ValueError(f"memory shape {tuple(memory.shape)} differs from the store's {self.memory_shape}")
        if memory.dtype not in MEMORY_DTYPES.values():
            raise ValueError(f"memory dtype {memory.dtype} is not one of {', '.join(MEMORY_DTYPES)}")
        stored = memory.detach().to("cpu", self.memory_dtype or memory.dtype).contiguous().reshape(-1)
        if not _all_finite(stored):   # checked once, after the cast: catches overflow to fp16 too
            raise ValueError(f"memory holds non-finite values (in the store's dtype {stored.dtype}); refusing to "
                             "store it")
        return stored.view(torch.uint8).numpy().tobytes()

    # -- persistence ----------------------------------------------------------------------------------

    def save(self, progress: int | None = None) -> Path:
        """Commit every change since the last save (only those), fsynced; returns the dir. progress: the
        writer's position in its stream that this state reflects (e.g. problems done), committed with it in
        the same transaction (`progress` reads it back). ValueError for a store without a dir or a read-only
        one, or a progress that is not an int >= 0; OSError when the commit fails (the last saved state stays)."""
        if self.dir is None:
            raise ValueError("this store has no dir; create it with MemoryStore(dir=...) to save it")
        if progress is not None and (not isinstance(progress, int) or isinstance(progress, bool) or progress < 0):
            raise ValueError(f"progress must be an int >= 0; got {progress!r}")
        with self._writing():
            if progress is not None:
                self._state["progress"] = progress
            self._db.executemany("INSERT OR REPLACE INTO state VALUES (?, ?)",
                                 [(name, json.dumps(value)) for name, value in self._state.items()])
        try:
            self._db.execute("COMMIT")
        except sqlite3.Error as error:
            raise OSError(f"saving the memory store to {self._file()} failed ({error}); its last saved state is "
                          "intact: load it again") from error
        self._db.execute("BEGIN IMMEDIATE")
        return self.dir

    def close(self) -> None:
        """Release the database and the lock; unsaved changes are discarded."""
        if getattr(self, "_db", None) is not None:
            self._db.close()
            self._db = None
        if getattr(self, "_lock", None) is not None:
            self._lock.close()
            self._lock = None

    # sqlite3 connections sit in a reference cycle (their statement cache): only the cyclic garbage collector
    # would close one, so a dropped store closes its own, releasing the database with the lock
    __del__ = close

    def __enter__(self) -> "MemoryStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __deepcopy__(self, memo) -> "MemoryStore":
        """An independent copy of a store without a dir (a stored one: TypeError; load it twice instead)."""
        if self.dir is not None:
            raise TypeError(f"a memory store on disk ({self.dir}) cannot be deep-copied; open it read-only "
                            "with MemoryStore.load(dir, readonly=True) instead")
        return self.snapshot()

    def snapshot(self) -> "MemoryStore":
        """An independent store in memory (no dir, no lock) holding every entry as this handle sees it, saved
        or not. Pickling a store pickles such a snapshot: how rank 0 hands its store to the other ranks."""
        db = sqlite3.connect(":memory:", isolation_level=None)   # rows copied through this handle: its own
        _create(db, self._state)                                  # unsaved changes included (a backup waits
        for table, columns in (("entries", 7), ("memories", 3)):  # on the writer's open transaction)
            rows = self._db.execute(f"SELECT * FROM {table} ORDER BY id")
            while chunk := rows.fetchmany(4096):
                db.executemany(f"INSERT INTO {table} VALUES ({', '.join('?' * columns)})", chunk)
        return _attached(db, dict(self._state), self.index)

    def __reduce__(self):
        snapshot = self.snapshot()   # held while serializing: a dropped store closes its database
        return _from_serialized, (snapshot._db.serialize(), dict(self._state), self.index)


def _from_serialized(data: bytes, state: dict, index: str) -> MemoryStore:
    """The in-memory store of a serialized in-memory database (a pickled `MemoryStore.snapshot`)."""
    db = sqlite3.connect(":memory:", isolation_level=None)
    db.deserialize(data)
    return _attached(db, state, index)


def _attached(db: sqlite3.Connection, state: dict, index: str) -> MemoryStore:
    """A store without a dir on the in-memory database ``db``."""
    store = MemoryStore.__new__(MemoryStore)
    store._attach(None, db, None, readonly=False, index=index)
    store._state = state
    with store._reading():
        store._load_ram()
    return store


class _KeyIndex:
    """Unit keys ``[N, d]`` fp32 in rows of a buffer that doubles when full, each row's id, and id -> row.
    Removal moves the last row into the gap: append, remove and set are amortized O(1)."""

    def __init__(self, dim: int | None, rows: int):
        self.units = torch.empty(rows if dim else 0, dim or 0)
        self.row_ids = torch.empty(len(self.units), dtype=torch.long)
        self.rows: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def extend(self, ids: list[int], keys: Tensor) -> None:
        count = len(self.rows)
        if count + len(ids) > len(self.units):
            size = max(2 * len(self.units), count + len(ids))
            self.units = torch.cat([self.units[:count], torch.empty(size - count, self.units.shape[1])])
            self.row_ids = torch.cat([self.row_ids[:count], torch.empty(size - count, dtype=torch.long)])
        self.units[count:count + len(ids)] = _normalized(keys)
        self.row_ids[count:count + len(ids)] = torch.tensor(ids)
        self.rows.update(zip(ids, range(count, count + len(ids))))

    def set(self, entry_id: int, key: Tensor) -> None:
        self.units[self.rows[entry_id]] = _normalized(key[None])[0]

    def remove(self, entry_id: int) -> None:
        row, last = self.rows.pop(entry_id), len(self.rows)
        if row != last:
            moved = int(self.row_ids[last])
            self.units[row], self.row_ids[row] = self.units[last], moved
            self.rows[moved] = row

    def search(self, units: Tensor, k: int) -> tuple[Tensor, Tensor]:
        scores, rows = (units @ self.units[:len(self)].T).topk(k, dim=1)
        return scores, self.row_ids[rows]

    def pairs_above(self, ids: list[int], threshold: float):
        """``(id, other id)`` for each of ``ids`` and every other entry with cosine similarity above ``threshold``."""
        similarity = self.units[[self.rows[i] for i in ids]] @ self.units[:len(self)].T
        for position, row in (similarity > threshold).nonzero().tolist():
            other = int(self.row_ids[row])
            if other != ids[position]:
                yield ids[position], other


class _Ivf:
    """A FAISS IVF-flat inner-product index over the unit keys, ids = entry ids (approximate search)."""

    def __init__(self, index: _KeyIndex):
        import faiss   # optional: pip install faiss-cpu (the "faiss" extra)

        units = index.units[:len(index)].numpy()
        lists = int(4 * math.sqrt(len(units)))
        self.index = faiss.IndexIVFFlat(faiss.IndexFlatIP(units.shape[1]), units.shape[1], lists,
                                        faiss.METRIC_INNER_PRODUCT)
        self.index.train(units)
        self.index.set_direct_map_type(faiss.DirectMap.Hashtable)   # remove_ids by id in O(1)
        self.index.nprobe = IVF_NPROBE
        self.index.add_with_ids(units, index.row_ids[:len(index)].numpy())

    def add(self, ids: list[int], units: Tensor) -> None:
        self.index.add_with_ids(units.numpy(), torch.tensor(ids).numpy())

    def remove(self, ids: list[int]) -> None:
        self.index.remove_ids(torch.tensor(ids).numpy())

    def search(self, units: Tensor, k: int) -> tuple[Tensor, Tensor]:
        scores, ids = self.index.search(units.numpy(), k)
        scores, ids = torch.from_numpy(scores), torch.from_numpy(ids).long()
        return scores.masked_fill(ids < 0, float("-inf")), ids


def _checked_meta(meta: EntryMeta) -> tuple[int, float, str]:
    """`EntryMeta._row` of ``meta``; TypeError for anything but an `EntryMeta`."""
    if not isinstance(meta, EntryMeta):
        raise TypeError(f"metadata must be an EntryMeta; got {type(meta).__name__}")
    return meta._row()


def _as_key(key: Tensor, dim: int | None) -> Tensor:
    if not isinstance(key, Tensor) or key.dim() != 1:
        raise ValueError(f"a key must be a 1-D tensor, got {getattr(key, 'shape', type(key).__name__)}")
    if dim is not None and key.shape[0] != dim:
        raise ValueError(f"key has {key.shape[0]} dimensions, the store's keys have {dim}")
    if not torch.isfinite(key).all() or key.norm() == 0:
        raise ValueError("a key must be finite and non-zero (cosine similarity needs a direction)")
    return key.detach().float().cpu().contiguous()


EXPONENT_BITS = {torch.float16: (np.int16, 0x7C00), torch.bfloat16: (np.int16, 0x7F80),
                 torch.float32: (np.int32, 0x7F800000), torch.float64: (np.int64, 0x7FF0000000000000)}


def _all_finite(flat: Tensor) -> bool:
    """Whether a flat CPU tensor of `MEMORY_DTYPES` holds no inf or NaN (all exponent bits set), in numpy:
    single-threaded, where torch's two intra-op threads on busy cores took 40 ms for a 368 KB memory."""
    bits, mask = EXPONENT_BITS[flat.dtype]
    return not ((flat.view(torch.uint8).numpy().view(bits) & mask) == mask).any()


def _normalized(x: Tensor) -> Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _blocks(items: list, size: int):
    return (items[start:start + size] for start in range(0, len(items), size))


def _create(db: sqlite3.Connection, state: dict) -> None:
    for statement in SCHEMA.split(";"):
        db.execute(statement)
    db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    db.execute(f"PRAGMA user_version = {FORMAT_VERSION}")
    db.executemany("INSERT INTO state VALUES (?, ?)", [(name, json.dumps(value)) for name, value in state.items()])


def _initialize(database: Path, state: dict, entries=(), memories=()) -> None:
    """Write a complete store to ``database`` atomically: built under a temporary name, fsynced, renamed."""
    temporary = database.with_name(f".{database.name}.new")
    for leftover in (temporary, *(temporary.with_name(temporary.name + end) for end in ("-wal", "-shm"))):
        leftover.unlink(missing_ok=True)
    db = sqlite3.connect(temporary, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = FULL")
    db.execute("BEGIN")
    _create(db, state)
    db.executemany("INSERT INTO entries VALUES (?, ?, ?, ?, ?, 0, ?)", entries)
    db.executemany("INSERT INTO memories VALUES (?, ?, ?)", memories)
    db.execute("COMMIT")
    db.close()   # checkpoints the WAL into the file (fsynced) and removes it
    os.replace(temporary, database)
    _fsync_dir(database.parent)


def _connect(database: Path, readonly: bool) -> sqlite3.Connection:
    """Open ``database``, checking it is a fastmem store of this format version."""
    try:
        db = sqlite3.connect(f"file:{quote(str(database))}?mode={'ro' if readonly else 'rw'}", uri=True,
                             isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA busy_timeout = 10000")
        application, version = (db.execute(f"PRAGMA {name}").fetchone()[0]
                                for name in ("application_id", "user_version"))
        if not readonly:
            db.execute("PRAGMA synchronous = FULL")
    except sqlite3.DatabaseError as error:
        raise ValueError(f"{database} is damaged or not a fastmem memory store: {error}") from error
    if application != APPLICATION_ID:
        db.close()
        raise ValueError(f"{database} is not a fastmem memory store (SQLite application_id {application:#x}, "
                         f"expected {APPLICATION_ID:#x})")
    if version != FORMAT_VERSION:
        db.close()
        raise ValueError(f"{database} has format version {version}; this fastmem reads version {FORMAT_VERSION}")
    return db


def _lock(path: Path):
    """An exclusive lock on ``path/store.lock`` (held while the returned file stays open)."""
    _check_writable(path)
    handle = open(path / LOCK, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise StoreLockedError(f"the memory store at {path} is open for writing elsewhere ({holder}; lock file "
                               f"{path / LOCK}); stop that writer, or open a reader with MemoryStore.load(dir, "
                               "readonly=True)") from None
    handle.truncate(0)
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    return handle


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _check_writable(path: Path) -> None:
    """Create ``path`` if needed and prove a file can be written there (fails before any work)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"store directory {path} is not writable: {error}") from error


# -- format version 1 (read to convert) -----------------------------------------------------------------

def _convert_version_1(path: Path) -> int:
    """Write ``path/store.sqlite`` from a version-1 store (checked whole first); returns its entry count."""
    manifest_path = path / VERSION_1_MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{manifest_path} is unreadable or corrupted: {error}") from error
    missing = {"format_version", "capacity", "next_id", "tensor_file", "sha256", "entries"} - set(manifest)
    if missing or manifest["format_version"] != 1:
        raise ValueError(f"{manifest_path} is not a version-1 memory store manifest (lacks {sorted(missing)} or "
                         f"has format version {manifest.get('format_version')!r})")
    tensor_path = path / manifest["tensor_file"]
    if not tensor_path.exists():
        raise ValueError(f"{tensor_path} is missing: the version-1 store at {path} is incomplete")
    if hashlib.sha256(tensor_path.read_bytes()).hexdigest() != manifest["sha256"]:
        raise ValueError(f"{tensor_path} does not match the checksum in {manifest_path}: corrupted")
    try:
        tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"cannot read {tensor_path}: {error}") from error
    entries = manifest["entries"]
    state = dict(capacity=manifest["capacity"], next_id=manifest["next_id"], key_dim=None, memory_shape=None,
                 memory_dtype=None, settled_threshold=None)
    rows, memories = [], []
    if entries:
        keys, stored = tensors.get("keys"), tensors.get("memories")
        if keys is None or stored is None or len(keys) != len(entries) or len(stored) != len(entries):
            raise ValueError(f"{tensor_path} does not hold one key and memory per entry of {manifest_path}")
        state.update(key_dim=keys.shape[1], memory_shape=list(stored.shape[1:]), memory_dtype=_dtype_name(stored.dtype))
        for entry, key, memory in zip(entries, keys.float(), stored):
            rest = {name: value for name, value in entry.items() if name not in ("id", "hits", "vote_share")}
            hits, share, meta = _checked_meta(EntryMeta._from_row(entry["id"], entry.get("hits", 0),
                                                                  entry.get("vote_share", 0.0), json.dumps(rest)))
            key_bytes = key.contiguous().numpy().tobytes()
            data = memory.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            rows.append((entry["id"], key_bytes, zlib.crc32(key_bytes), hits, share, meta))
            memories.append((entry["id"], data, zlib.crc32(data)))
    _initialize(path / DATABASE, state, rows, memories)
    return len(entries)
