"""MemoryStore: retrieval against brute force, eviction, consolidation, persistence, locking, damage, and
``kill -9`` of a writer at random instants (every reload a committed state, bit for bit)."""
from __future__ import annotations

import copy
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fastmem import store as store_module
from fastmem.store import DATABASE, EntryMeta, MemoryStore, StoreLockedError

REPO = Path(__file__).resolve().parent.parent

# Deterministic entry contents and the writer's cycles, shared by the crash test's writer process (which runs
# this source) and the test (which runs it too, to replay the expected state with plain dicts).
COMMON = '''
import random
import torch

DIM, SHAPE, CAPACITY = 8, (4, 6), 12


def content(entry_id, version):
    """The key [DIM] and memory SHAPE of an entry at a version: a pure function of the two."""
    generator = torch.Generator().manual_seed(entry_id * 100_003 + version)
    return torch.randn(DIM, generator=generator), torch.randn(SHAPE, generator=generator)


def cycle_ops(cycle, ids):
    """What cycle ``cycle`` does to a store holding ``ids`` (sorted): (ids hit, id updated or None, vote
    shares of the entries added)."""
    rng = random.Random(cycle)
    hits = rng.sample(ids, min(len(ids), rng.randint(0, 2)))
    updated = rng.choice(ids) if ids and rng.random() < 0.5 else None
    return hits, updated, [rng.random() for _ in range(rng.randint(1, 3))]
'''
exec(COMMON)

WRITER = COMMON + '''
import os
import sys

from dataclasses import replace

from fastmem.store import EntryMeta, MemoryStore


def write_forever(directory):
    store = MemoryStore.load(directory)
    cycle = store.meta(max(store.ids)).extra["cycle"] if len(store) else 0
    while True:
        cycle += 1
        hits, updated, shares = cycle_ops(cycle, store.ids)
        store.record_hits(hits)
        if updated is not None:
            meta = store.meta(updated)
            store.update(updated, memory=content(updated, cycle)[1],
                         meta=replace(meta, extra={**meta.extra, "version": cycle}))
        for share in shares:
            entry_id = store._state["next_id"]
            key, memory = content(entry_id, 0)
            store.add(key, memory, EntryMeta(vote_share=share, extra={"cycle": cycle, "version": 0}))
        store.save()
        print(f"saved {cycle}", flush=True)


for line in sys.stdin:   # one writer per line, forked from this process (torch is imported once)
    pid = os.fork()
    if pid == 0:
        try:
            write_forever(line.strip())
        finally:
            os._exit(1)
    print(f"pid {pid}", flush=True)
    os.waitpid(pid, 0)
    print("\\ndone", flush=True)   # ends a line the killed writer may have left unfinished
'''


def replay(states: list[dict]) -> None:
    """Append the state after the next cycle to ``states`` (id -> dict), with the eviction rule written out."""
    model = {i: dict(entry) for i, entry in states[-1].items()}
    cycle = len(states)
    hits, updated, shares = cycle_ops(cycle, sorted(model))
    for i in hits:
        model[i]["hits"] += 1
    if updated is not None:
        model[updated]["version"] = cycle
    next_id = max([-1, *model, *(i for state in states for i in state)]) + 1
    for share in shares:
        if len(model) >= CAPACITY:
            del model[min(model, key=lambda i: (model[i]["hits"], model[i]["vote_share"], i))]
        model[next_id] = dict(hits=0, vote_share=share, version=0, cycle=cycle)
        next_id += 1
    states.append(model)


def assert_state(store: MemoryStore, model: dict) -> None:
    """The store holds exactly ``model``: ids, hits, shares, versions; keys and memories bit-identical."""
    assert store.ids == sorted(model)
    for entry_id, expected in model.items():
        memory, meta = store.get(entry_id)
        key, _ = content(entry_id, 0)
        assert (meta.hits, meta.vote_share, meta.extra["version"], meta.extra["cycle"]) == (
            expected["hits"], expected["vote_share"], expected["version"], expected["cycle"])
        assert torch.equal(memory, content(entry_id, expected["version"])[1])
        assert torch.equal(store.key(entry_id), key)


def committed_cycle(store: MemoryStore) -> int:
    return store.meta(max(store.ids)).extra["cycle"] if len(store) else 0


def test_kill_minus_9_at_random_instants_leaves_a_committed_state(tmp_path):
    directory = str(tmp_path / "store")
    MemoryStore(directory, capacity=CAPACITY).save()
    writer = subprocess.Popen([sys.executable, "-c", WRITER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    states, committed, rng, mid_write_reads = [{}], 0, random.Random(0), 0
    try:
        for trial in range(50):
            writer.stdin.write(directory + "\n")
            writer.stdin.flush()
            pid = int(writer.stdout.readline().split()[1])
            time.sleep(rng.uniform(0.0, 0.25))
            if trial % 5 == 4:   # a reader opened while the writer adds and saves sees a committed state
                with MemoryStore.load(directory, readonly=True) as reader:
                    seen = committed_cycle(reader)
                    while len(states) <= seen:
                        replay(states)
                    assert_state(reader, states[seen])
                    mid_write_reads += 1
            os.kill(pid, signal.SIGKILL)
            printed = [int(line.split()[1]) for line in iter(writer.stdout.readline, "done\n")
                       if line.startswith("saved ")]
            with MemoryStore.load(directory, readonly=True) as store:
                now = committed_cycle(store)
                assert committed <= now <= max([committed, *printed]) + 1   # the last save may have landed
                while len(states) <= now:
                    replay(states)
                assert_state(store, states[now])
            committed = now
    finally:
        writer.kill()
        writer.wait()
    assert committed > 50 and mid_write_reads == 10   # the writers got far enough to evict (capacity 12)


def filled_store(count=6, dim=8, shape=(3, 4), dir=None, capacity=100, seed=0, **options):
    """A store of ``count`` random entries, and the keys and memories added (the reference)."""
    gen = torch.Generator().manual_seed(seed)
    store = MemoryStore(dir, capacity=capacity, **options)
    keys, memories = torch.randn(count, dim, generator=gen), torch.randn(count, *shape, generator=gen)
    for i in range(count):
        store.add(keys[i], memories[i], EntryMeta(question=f"q{i}", vote_share=i / count))
    return store, keys, memories


def test_progress_commits_with_the_save_that_gives_it(tmp_path):
    store = MemoryStore(tmp_path / "s")
    assert store.progress is None
    store.add(torch.ones(4), torch.ones(2))
    store.save(progress=3)
    store.add(torch.ones(4), torch.ones(2))
    for bad in (-1, True, 1.5, "3"):
        with pytest.raises(ValueError, match="progress must be an int >= 0"):
            store.save(progress=bad)
    with MemoryStore.load(tmp_path / "s", readonly=True) as reader:      # the bad saves committed nothing
        assert (len(reader), reader.progress) == (1, 3)
    store.save()                                                            # a save without one keeps the last
    store.close()
    with MemoryStore.load(tmp_path / "s", readonly=True) as reader:
        assert (len(reader), reader.progress) == (2, 3)


def test_search_matches_brute_force_cosine():
    store, keys, _ = filled_store(count=20)
    queries = torch.randn(5, 8)
    scores, ids = store.search(queries, k=3)
    expected_scores, expected_ids = torch.nn.functional.cosine_similarity(queries[:, None], keys[None], dim=-1).topk(3)
    torch.testing.assert_close(scores, expected_scores)
    assert torch.equal(ids, expected_ids)   # ids count from 0 in insertion order


def test_search_pads_when_store_is_small():
    store, _, _ = filled_store(count=2)
    scores, ids = store.search(torch.randn(8), k=4)
    assert ids[0, 2:].tolist() == [-1, -1] and torch.isinf(scores[0, 2:]).all()
    assert MemoryStore().search(torch.randn(1, 8), k=2)[1].tolist() == [[-1, -1]]


def test_ivf_index_probing_every_list_is_exact_and_follows_changes(monkeypatch):
    pytest.importorskip("faiss")
    monkeypatch.setattr(store_module, "IVF_MIN_ENTRIES", 1)
    monkeypatch.setattr(store_module, "IVF_NPROBE", 1000)   # every list: exact
    approximate, _, _ = filled_store(count=60, index="ivf", capacity=60)
    exact, _, _ = filled_store(count=60, capacity=60)
    queries = torch.randn(4, 8)
    for evicted in range(2):   # the index is built at the first search, then kept in step with adds and evictions
        assert torch.equal(exact.search(queries, 5)[1], approximate.search(queries, 5)[1])
        new_ids = [store.add(queries[evicted] * 3, torch.ones(3, 4), EntryMeta(vote_share=1.0))
                   for store in (exact, approximate)]
        assert approximate.search(queries, 1)[1][evicted].item() == new_ids[1] == 60 + evicted
        assert evicted not in approximate.search(queries, 60)[1]


def test_eviction_keeps_new_memory_and_drops_least_used():
    store, _, _ = filled_store(count=3, capacity=3)
    store.record_hits([0, 1])   # entry 2 now has the fewest hits
    new_id = store.add(torch.randn(8), torch.ones(3, 4), EntryMeta(question="new"))
    assert store.ids == [0, 1, new_id]
    assert torch.equal(store.get(new_id)[0], torch.ones(3, 4))


def test_eviction_ties_break_on_vote_share_then_age():
    store, _, _ = filled_store(count=4, capacity=4)   # no hits; vote shares 0, 1/4, 2/4, 3/4
    store.update(2, meta=replace(store.meta(2), vote_share=0.0))   # entries 0 and 2 tie: the older goes first
    evicted = []
    for _ in range(3):
        before = set(store.ids)
        store.add(torch.randn(8), torch.zeros(3, 4), EntryMeta(vote_share=1.0))
        evicted += sorted(before - set(store.ids))
    assert evicted == [0, 2, 1]


def test_consolidate_merges_near_duplicates_keeping_metadata():
    store = MemoryStore()
    key = torch.tensor([1.0, 0.0, 0.0])
    a = store.add(key, torch.zeros(2), EntryMeta(question="a", vote_share=0.25, hits=1, members=2, step=5))
    b = store.add(key + torch.tensor([0.0, 0.01, 0.0]), torch.ones(2) * 4,
                  EntryMeta(question="b", vote_share=0.75, hits=2, members=3))
    c = store.add(torch.tensor([0.0, 1.0, 0.0]), torch.ones(2), EntryMeta(question="c"))
    assert store.consolidate(threshold=0.95) == 1
    assert store.ids == [a, c]
    memory, meta = store.get(a)
    torch.testing.assert_close(memory, torch.full((2,), 3.0))   # vote-share weighted: 0.25 * 0 + 0.75 * 4
    torch.testing.assert_close(store.key(a), key + torch.tensor([0.0, 0.0075, 0.0]))   # weighted the same way
    assert meta == EntryMeta(id=a, hits=3, vote_share=0.25 * 0.25 + 0.75 * 0.75, question="a", step=5, members=5,
                             merged=[{"id": b, "question": "b"}])


def greedy_consolidation(keys: dict, threshold: float) -> dict:
    """The reference: every pair compared, oldest first; returns survivor id -> absorbed ids (uniform weights)."""
    ids, absorbed, groups = sorted(keys), set(), {}
    for position, entry_id in enumerate(ids):
        if entry_id in absorbed:
            continue
        group = [other for other in ids[position + 1:] if other not in absorbed and torch.cosine_similarity(
            keys[entry_id], keys[other], dim=0) > threshold]
        if group:
            groups[entry_id] = group
            absorbed.update(group)
            keys[entry_id] = torch.stack([keys[i] for i in [entry_id, *group]]).mean(0)
    for i in absorbed:
        del keys[i]
    return groups


def test_incremental_consolidation_matches_comparing_every_pair():
    gen = torch.Generator().manual_seed(3)
    centres = torch.randn(6, 16, generator=gen)
    store, keys = MemoryStore(), {}
    for _ in range(5):   # rounds of adds, each followed by a consolidation that compares only the new entries
        for _ in range(12):
            key = centres[torch.randint(6, (1,), generator=gen)][0] + 0.05 * torch.randn(16, generator=gen)
            keys[store.add(key, torch.randn(2, generator=gen))] = key
        groups = greedy_consolidation(keys, 0.97)
        assert store.consolidate(0.97) == sum(map(len, groups.values()))
        assert store.ids == sorted(keys)
        for entry_id in groups:
            assert [m["id"] for m in store.meta(entry_id).merged][-len(groups[entry_id]):] == groups[entry_id]
            torch.testing.assert_close(store.key(entry_id), keys[entry_id])


def test_save_load_round_trip_is_bit_identical_and_unsaved_changes_are_dropped(tmp_path):
    store, keys, memories = filled_store(dir=tmp_path / "s")
    store.record_hits([2])
    store.save()
    store.add(torch.randn(8), torch.randn(3, 4), EntryMeta(question="unsaved"))
    store.close()
    with MemoryStore.load(tmp_path / "s") as loaded:
        assert loaded.ids == list(range(6)) and loaded.capacity == 100
        for i in range(6):
            memory, meta = loaded.get(i)
            assert torch.equal(memory, memories[i]) and torch.equal(loaded.key(i), keys[i])
            assert meta == EntryMeta(question=f"q{i}", vote_share=i / 6, hits=int(i == 2), id=i)
        assert loaded.add(torch.randn(8), torch.randn(3, 4)) == 6   # ids continue: 6 was never committed


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_storage(tmp_path, dtype):
    store, _, memories = filled_store(dir=tmp_path, dtype=dtype)
    store.save()
    store.close()
    with MemoryStore.load(tmp_path) as loaded:
        assert loaded.memory_dtype == dtype
        assert all(torch.equal(loaded.get(i)[0], memories[i].to(dtype)) for i in range(6))
    assert (tmp_path / DATABASE).stat().st_size < 100_000


def test_second_writer_is_refused_and_readers_see_committed_state(tmp_path):
    store, _, _ = filled_store(count=3, dir=tmp_path)
    store.save()
    with pytest.raises(StoreLockedError, match=f"pid {os.getpid()}"):
        MemoryStore.load(tmp_path)
    with pytest.raises(StoreLockedError, match="open for writing elsewhere"):
        MemoryStore(tmp_path)
    store.add(torch.randn(8), torch.randn(3, 4))
    with MemoryStore.load(tmp_path, readonly=True) as reader:
        assert reader.ids == [0, 1, 2]
        store.save()
        assert reader.ids == [0, 1, 2] and reader.meta(2).question == "q2"   # its snapshot holds
        with pytest.raises(ValueError, match="read-only"):
            reader.add(torch.randn(8), torch.randn(3, 4))
    assert MemoryStore.load(tmp_path, readonly=True).ids == [0, 1, 2, 3]
    store.close()
    MemoryStore.load(tmp_path).close()   # the lock went with the writer


def test_readers_opened_during_saves_see_whole_commits(tmp_path):
    MemoryStore(tmp_path, capacity=1000).save()

    def write():
        with MemoryStore.load(tmp_path) as writer:
            for cycle in range(40):
                for _ in range(2):
                    entry_id = len(writer)
                    writer.add(*content(entry_id, 0))
                writer.save()

    thread = threading.Thread(target=write)
    thread.start()
    sizes = set()
    while thread.is_alive():
        with MemoryStore.load(tmp_path, readonly=True) as reader:
            assert len(reader) % 2 == 0
            assert all(torch.equal(reader.get(i)[0], content(i, 0)[1]) for i in reader.ids)
            sizes.add(len(reader))
    thread.join()
    assert len(sizes) > 2   # readers really overlapped the writer


def flip_byte_of(path: Path, needle: bytes) -> None:
    data = bytearray(path.read_bytes())
    at = data.index(needle) + len(needle) // 2
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_memory_and_key_are_named(tmp_path):
    store, keys, memories = filled_store(dir=tmp_path)
    store.save()
    store.close()
    flip_byte_of(tmp_path / DATABASE, memories[3].numpy().tobytes())
    with MemoryStore.load(tmp_path, readonly=True) as loaded:
        assert torch.equal(loaded.get(2)[0], memories[2])
        with pytest.raises(ValueError, match=f"{DATABASE}: the memory of entry 3 fails its checksum"):
            loaded.get(3)
    flip_byte_of(tmp_path / DATABASE, keys[4].numpy().tobytes())
    with pytest.raises(ValueError, match=f"{DATABASE}: the key of entry 4 is damaged"):
        MemoryStore.load(tmp_path)


def foreign_database(path: Path) -> None:
    path.unlink()
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE entries(x)")
    db.commit()
    db.close()


def future_version(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.close()


@pytest.mark.parametrize("damage, words", [
    (lambda d: (d / DATABASE).write_bytes(b"not a database" * 100), "store.sqlite is damaged or not a fastmem"),
    (lambda d: (d / DATABASE).write_bytes((d / DATABASE).read_bytes()[:5000]), "store.sqlite is damaged"),
    (lambda d: foreign_database(d / DATABASE), "store.sqlite is not a fastmem memory store"),
    (lambda d: future_version(d / DATABASE), "format version 99"),
    (lambda d: (d / DATABASE).unlink(), "no memory store"),
])
def test_load_rejects_damaged_or_foreign_store(tmp_path, damage, words):
    store, _, _ = filled_store(count=40, shape=(64,), dir=tmp_path)
    store.save()
    store.close()
    damage(tmp_path)
    for readonly in (False, True):
        with pytest.raises(ValueError, match=words):
            MemoryStore.load(tmp_path, readonly=readonly)


def test_metadata_is_plain_json_on_disk_and_untyped_metadata_still_loads(tmp_path):
    """Each field is a JSON key of the entry's row (defaults left out); metadata a store held before `EntryMeta`
    (any JSON object) loads, its unknown keys in ``extra``, and is written back unchanged."""
    store, _, _ = filled_store(count=2, dir=tmp_path / "s")
    store.update(1, meta=EntryMeta(question="q1", answer="7", members=2, replay=[{"prompt": [1], "traces": [[2]]}],
                                   extra={"cycle": 3}))
    store.save()
    store.close()
    database = sqlite3.connect(tmp_path / "s" / DATABASE)
    assert json.loads(database.execute("SELECT meta FROM entries WHERE id = 1").fetchone()[0]) == {
        "question": "q1", "answer": "7", "members": 2, "replay": [{"prompt": [1], "traces": [[2]]}], "cycle": 3}
    old = {"question": "q0", "members": 4, "gate_trials": 2, "gate_gain": -0.5, "replay": [], "custom": {"a": 1}}
    with database:
        database.execute("UPDATE entries SET meta = ? WHERE id = 0", (json.dumps(old),))
    database.close()
    with MemoryStore.load(tmp_path / "s") as loaded:
        assert loaded.meta(0) == EntryMeta(id=0, vote_share=0.0, question="q0", members=4, gate_trials=2,
                                           gate_gain=-0.5, extra={"custom": {"a": 1}})
        assert loaded.get(1)[1] == loaded.meta(1) and loaded.meta(1).extra == {"cycle": 3}
        loaded.update(0, memory=torch.zeros(3, 4))   # the metadata kept as it was
        assert loaded.meta(0).extra == {"custom": {"a": 1}} and loaded.meta(0).members == 4


def write_version_1(path: Path, keys, memories, entries, next_id) -> None:
    """A version-1 directory as fastmem 0.x wrote it: store.json plus a safetensors file."""
    import hashlib

    path.mkdir()
    save_file({"keys": keys, "memories": memories}, str(path / "tensors-3.safetensors"))
    digest = hashlib.sha256((path / "tensors-3.safetensors").read_bytes()).hexdigest()
    (path / "store.json").write_text(json.dumps(dict(
        format_version=1, generation=3, capacity=50, next_id=next_id, tensor_file="tensors-3.safetensors",
        sha256=digest, memory_shape=list(memories.shape[1:]), memory_dtype="float32", entries=entries)))


def test_version_1_store_converts_on_load(tmp_path):
    keys, memories = torch.randn(3, 8), torch.randn(3, 2, 5)
    entries = [{"hits": i, "vote_share": 0.5, "question": f"q{i}", "id": entry_id, "note": [i]}
               for i, entry_id in enumerate([1, 4, 7])]
    write_version_1(tmp_path / "old", keys, memories, entries, next_id=9)
    with pytest.raises(ValueError, match="version-1 memory store"):
        MemoryStore(tmp_path / "old")
    with pytest.raises(ValueError, match="version-1 memory store"):
        MemoryStore.load(tmp_path / "old", readonly=True)
    with pytest.warns(UserWarning, match=r"converted the version-1 memory store .*\(3 entries\)"):
        store = MemoryStore.load(tmp_path / "old")
    assert store.ids == [1, 4, 7] and store.capacity == 50
    for row, entry in enumerate(entries):
        memory, meta = store.get(entry["id"])
        assert torch.equal(memory, memories[row]) and torch.equal(store.key(entry["id"]), keys[row])
        assert meta == EntryMeta(id=entry["id"], hits=entry["hits"], vote_share=0.5, question=entry["question"],
                                 extra={"note": entry["note"]})
    assert store.add(torch.randn(8), torch.randn(2, 5)) == 9
    store.close()
    (tmp_path / "old" / "tensors-3.safetensors").unlink()   # no longer read
    assert MemoryStore.load(tmp_path / "old", readonly=True).ids == [1, 4, 7]


def test_damaged_version_1_store_is_named(tmp_path):
    write_version_1(tmp_path / "old", torch.randn(1, 8), torch.randn(1, 2), [{"id": 0}], next_id=1)
    (tmp_path / "old" / "tensors-3.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(ValueError, match="tensors-3.safetensors does not match the checksum"):
        MemoryStore.load(tmp_path / "old")
    assert not (tmp_path / "old" / DATABASE).exists()


def test_new_store_over_a_saved_one_replaces_it_at_save(tmp_path):
    filled_store(dir=tmp_path)[0].save()
    fresh = MemoryStore(tmp_path, capacity=7)
    assert len(fresh) == 0 and MemoryStore.load(tmp_path, readonly=True).ids == list(range(6))
    fresh.save()
    assert len(MemoryStore.load(tmp_path, readonly=True)) == 0


def test_unwritable_dir_fails_before_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="not writable"):
        MemoryStore(blocker / "store")


def test_deepcopy_of_an_in_memory_store_is_independent(tmp_path):
    store, _, memories = filled_store()
    twin = copy.deepcopy(store)
    twin.add(torch.randn(8), torch.randn(3, 4))
    twin.update(0, memory=torch.zeros(3, 4))
    assert len(store) == 6 and torch.equal(store.get(0)[0], memories[0]) and len(twin) == 7
    with pytest.raises(TypeError, match="cannot be deep-copied"):
        copy.deepcopy(filled_store(dir=tmp_path)[0])


@pytest.mark.parametrize("call, error", [
    (lambda s: s.add(torch.randn(5), torch.randn(3, 4)), "dimensions"),
    (lambda s: s.add(torch.randn(8), torch.randn(2, 4)), "shape"),
    (lambda s: s.add(torch.randn(8), torch.full((3, 4), float("nan"))), "non-finite"),
    (lambda s: s.add(torch.zeros(8), torch.randn(3, 4)), "non-zero"),
    (lambda s: s.add(torch.randn(8), torch.randn(3, 4), EntryMeta(extra={"note": object()})), "serializable"),
    (lambda s: s.add(torch.randn(8), torch.randn(3, 4), EntryMeta(vote_share="high")), "vote_share"),
    (lambda s: s.add(torch.randn(8), torch.randn(3, 4), EntryMeta(hits=-1)), "hits"),
    (lambda s: s.add(torch.randn(8), torch.randn(3, 4), EntryMeta(extra={"question": "twice"})), "field names"),
    (lambda s: s.add(torch.randn(8), torch.randn(3, 4), {"question": "untyped"}), "EntryMeta"),
    (lambda s: s.update(2, meta=EntryMeta(vote_share=float("nan"))), "vote_share"),
    (lambda s: s.update(2, memory=torch.randn(3, 4), key=torch.randn(9)), "dimensions"),
    (lambda s: s.record_hits([1, 99]), "no memory with id 99"),
    (lambda s: s.search(torch.randn(2, 5), k=1), "search keys"),
])
def test_bad_input_leaves_store_unchanged(tmp_path, call, error):
    store, keys, memories = filled_store(capacity=6, dir=tmp_path)
    before = [store.get(i) for i in store.ids]
    with pytest.raises((ValueError, TypeError, KeyError), match=error):
        call(store)
    store.save()
    store.close()
    with MemoryStore.load(tmp_path, readonly=True) as loaded:   # nothing of the failed call reached the disk
        assert loaded.ids == list(range(6))
        assert all(torch.equal(memory, loaded.get(i)[0]) and meta == loaded.get(i)[1]
                   for i, (memory, meta) in enumerate(before))
        assert all(torch.equal(loaded.key(i), keys[i]) for i in range(6))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_non_finite_memories_are_refused_in_every_dtype(dtype):
    store = MemoryStore(dtype=torch.float16 if dtype == torch.float32 else None)
    memory = torch.randn(3, 4, dtype=dtype)
    store.add(torch.randn(8), memory)
    for bad in (float("inf"), float("-inf"), float("nan")) + ((1e6,) if dtype == torch.float32 else ()):
        with pytest.raises(ValueError, match="non-finite"):   # 1e6 overflows the store's fp16
            store.add(torch.randn(8), memory.index_put((torch.tensor([1]), torch.tensor([2])), torch.tensor(bad, dtype=dtype)))
    assert len(store) == 1


def test_a_snapshot_and_a_pickle_hold_every_entry_unsaved_ones_included(tmp_path):
    """What rank 0 hands the other ranks: an independent in-memory store with the writer's entries as it
    sees them (saved or not), bit-identical; the writer and its directory are left as they were."""
    import pickle

    store, keys, memories = filled_store(count=4, dir=tmp_path / "s")
    store.save()
    store.add(keys[0] * 2, memories[0] * 2, EntryMeta(question="unsaved"))
    for twin in (store.snapshot(), pickle.loads(pickle.dumps(store))):
        assert twin.dir is None and twin.ids == store.ids
        for entry_id in store.ids:
            assert torch.equal(twin.key(entry_id), store.key(entry_id))
            (memory, meta), (expected, expected_meta) = twin.get(entry_id), store.get(entry_id)
            assert torch.equal(memory, expected) and meta == expected_meta
        twin.add(keys[1], memories[1], EntryMeta(question="only in the twin"))
        assert len(twin) == 6 and len(store) == 5
    store.save()
    store.close()
    with MemoryStore.load(tmp_path / "s", readonly=True) as saved:
        assert len(saved) == 5
