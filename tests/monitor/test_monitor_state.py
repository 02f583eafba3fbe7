"""``store.monitor_state``: compare-and-set on every metadata backend."""

from __future__ import annotations

import threading

from loopline.drivers.metadata.store import MetadataStore


def test_get_put_compare_and_set(db_url: str) -> None:
    store = MetadataStore(db_url)
    states = store.monitor_state
    assert states.get("monitor|production|m") == (0, {})
    first = {"cursor": {"hw": "2026-01-01T00:00:00+00:00"}}
    assert states.put("monitor|production|m", first, 0)
    assert states.get("monitor|production|m") == (1, first)
    assert not states.put("monitor|production|m", {"x": 1}, 0)  # a second first write loses
    assert not states.put("monitor|production|m", {"x": 1}, 2)  # a generation never read
    assert states.put("monitor|production|m", {"x": 2}, 1)
    assert states.get("monitor|production|m") == (2, {"x": 2})
    assert not states.put("monitor|production|m", {"x": 3}, 1)  # stale: somebody wrote 2
    assert states.put("monitor|staging|m", {}, 0)
    assert states.keys("monitor|prod") == ["monitor|production|m"]
    assert states.keys() == ["monitor|production|m", "monitor|staging|m"]
    assert states.delete("monitor|staging|m") and not states.delete("monitor|staging|m")
    assert states.get("monitor|staging|m") == (0, {})
    store.close()


def _race(store: MetadataStore, key: str, expected: int, writers: int) -> list[bool]:
    barrier = threading.Barrier(writers)
    results: list[bool] = [False] * writers

    def write(i: int) -> None:
        barrier.wait()
        results[i] = store.monitor_state.put(key, {"writer": i}, expected)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_concurrent_writers_with_one_generation_one_wins(db_url: str) -> None:
    """N monitors that read the same generation race; exactly one write lands, first
    insert (primary key) and later update (generation) alike."""
    store = MetadataStore(db_url)
    writers = 8
    first = _race(store, "k", 0, writers)
    assert sum(first) == 1
    gen, state = store.monitor_state.get("k")
    assert gen == 1 and state == {"writer": first.index(True)}
    later = _race(store, "k", 1, writers)
    assert sum(later) == 1
    assert store.monitor_state.get("k") == (2, {"writer": later.index(True)})
    store.close()
