"""MemoryStore: retrieval against brute force, eviction, consolidation, persistence and crash safety."""
from __future__ import annotations

import json
import os

import pytest
import torch

from fastmem import store as store_module
from fastmem.store import MANIFEST, MemoryStore


def filled_store(count=6, dim=8, shape=(3, 4), dir=None, capacity=100, seed=0):
    gen = torch.Generator().manual_seed(seed)
    store = MemoryStore(dir, capacity=capacity)
    for i in range(count):
        store.add(torch.randn(dim, generator=gen), torch.randn(*shape, generator=gen),
                  question=f"q{i}", vote_share=i / count)
    return store


def test_search_matches_brute_force_cosine():
    store = filled_store(count=20)
    queries = torch.randn(5, 8)
    scores, ids = store.search(queries, k=3)
    cosine = torch.nn.functional.cosine_similarity(queries[:, None], store.keys[None], dim=-1)
    expected_scores, expected_rows = cosine.topk(3, dim=1)
    torch.testing.assert_close(scores, expected_scores)
    assert ids.tolist() == [[store.ids[r] for r in row] for row in expected_rows.tolist()]


def test_search_pads_when_store_is_small():
    store = filled_store(count=2)
    scores, ids = store.search(torch.randn(8), k=4)
    assert ids[0, 2:].tolist() == [-1, -1] and torch.isinf(scores[0, 2:]).all()
    assert MemoryStore().search(torch.randn(1, 8), k=2)[1].tolist() == [[-1, -1]]


def test_faiss_gives_exact_search_results(monkeypatch):
    pytest.importorskip("faiss")
    store = filled_store(count=30)
    queries = torch.randn(4, 8)
    exact = store.search(queries, k=5)
    monkeypatch.setattr(store_module, "FAISS_MIN_ENTRIES", 1)
    approximate = store.search(queries, k=5)
    assert torch.equal(exact[1], approximate[1])
    torch.testing.assert_close(exact[0], approximate[0])


def test_eviction_keeps_new_memory_and_drops_least_used():
    store = filled_store(count=3, capacity=3)
    store.record_hits([store.ids[0], store.ids[1]])   # entry 2 now has the fewest hits
    new_id = store.add(torch.randn(8), torch.ones(3, 4), question="new")
    assert len(store) == 3
    assert new_id in store.ids and 2 not in store.ids and {0, 1} <= set(store.ids)
    assert torch.equal(store.get(new_id)[0], torch.ones(3, 4))


def test_eviction_ties_break_on_vote_share_then_age():
    store = filled_store(count=3, capacity=3)   # no hits; vote shares 0, 1/3, 2/3
    store.add(torch.randn(8), torch.zeros(3, 4))
    assert 0 not in store.ids


def test_consolidate_merges_near_duplicates_keeping_metadata():
    store = MemoryStore()
    key = torch.tensor([1.0, 0.0, 0.0])
    a = store.add(key, torch.zeros(2), question="a", vote_share=0.25, hits=1)
    b = store.add(key + torch.tensor([0.0, 0.01, 0.0]), torch.ones(2) * 4, question="b", vote_share=0.75, hits=2)
    c = store.add(torch.tensor([0.0, 1.0, 0.0]), torch.ones(2), question="c")
    assert store.consolidate(threshold=0.95) == 1
    assert store.ids == [a, c]
    memory, meta = store.get(a)
    torch.testing.assert_close(memory, torch.full((2,), 3.0))   # vote-share weighted: 0.25 * 0 + 0.75 * 4
    assert meta["hits"] == 3 and meta["merged"] == [{"id": b, "question": "b"}]


def test_save_load_round_trip_is_exact(tmp_path):
    store = filled_store(dir=tmp_path / "s")
    store.record_hits([store.ids[2]])
    store.save()
    loaded = MemoryStore.load(tmp_path / "s")
    assert torch.equal(loaded.keys, store.keys) and torch.equal(loaded.memories, store.memories)
    assert loaded.metadata == store.metadata and loaded.capacity == store.capacity
    assert loaded.add(torch.randn(8), torch.randn(3, 4)) == 6   # ids continue, never reused


def test_crash_mid_save_leaves_previous_store(tmp_path, monkeypatch):
    store = filled_store(dir=tmp_path)
    store.save()
    store.add(torch.randn(8), torch.randn(3, 4), question="unsaved")

    real_replace = os.replace

    def crash_on_manifest(source, target):
        if str(target).endswith(MANIFEST):   # the new tensor file is in place; the manifest is not
            raise KeyboardInterrupt
        real_replace(source, target)

    monkeypatch.setattr(store_module.os, "replace", crash_on_manifest)
    with pytest.raises(KeyboardInterrupt):
        store.save()
    monkeypatch.undo()
    loaded = MemoryStore.load(tmp_path)
    assert len(loaded) == 6 and "unsaved" not in [m["question"] for m in loaded.metadata]


@pytest.mark.parametrize("damage, words", [
    (lambda d: (d / MANIFEST).write_text("{not json"), "corrupted"),
    (lambda d: (d / MANIFEST).write_text(json.dumps({"format_version": 99})), "format version 99"),
    (lambda d: next(d.glob("tensors-*")).write_bytes(b"\0" * 10), "checksum"),
    (lambda d: next(d.glob("tensors-*")).unlink(), "missing"),
    (lambda d: (d / MANIFEST).unlink(), "no memory store"),
])
def test_load_rejects_damaged_store(tmp_path, damage, words):
    filled_store(dir=tmp_path).save()
    damage(tmp_path)
    with pytest.raises(ValueError, match=words):
        MemoryStore.load(tmp_path)


def test_unwritable_dir_fails_before_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="not writable"):
        MemoryStore(blocker / "store")


@pytest.mark.parametrize("call, error", [
    (lambda s: s.add(torch.randn(5), torch.randn(3, 4)), "dimensions"),
    (lambda s: s.add(torch.randn(8), torch.randn(2, 4)), "shape"),
    (lambda s: s.add(torch.randn(8), torch.full((3, 4), float("nan"))), "non-finite"),
    (lambda s: s.add(torch.zeros(8), torch.randn(3, 4)), "non-zero"),
    (lambda s: s.add(torch.randn(8), torch.randn(3, 4), note=object()), "serializable"),
    (lambda s: s.search(torch.randn(2, 5), k=1), "search keys"),
])
def test_bad_input_leaves_store_unchanged(call, error):
    store = filled_store()
    before = (store.keys.clone(), store.memories.clone(), [dict(m) for m in store.metadata])
    with pytest.raises((ValueError, TypeError), match=error):
        call(store)
    assert torch.equal(store.keys, before[0]) and torch.equal(store.memories, before[1])
    assert store.metadata == before[2]
