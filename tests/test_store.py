import pytest

from tasks.core.stage import ItemError, run_items
from tasks.core.store import Store, atomic_write, item_key


def test_item_key_changes_with_every_field_and_ignores_dict_order():
    base = dict(stage="s", version=1, inputs=["a"], params={"x": 1, "y": 2}, model="m")
    k = item_key(**base)
    assert k == item_key(**{**base, "params": {"y": 2, "x": 1}})
    for change in ({"stage": "t"}, {"version": 2}, {"inputs": ["b"]}, {"params": {"x": 2, "y": 2}},
                   {"model": "m@rev2"}):
        assert item_key(**{**base, **change}) != k, change


def test_atomic_write_leaves_nothing_when_the_writer_fails(tmp_path):
    target = tmp_path / "ab" / "item.png"

    def boom(tmp):
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(target, boom)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_run_items_computes_only_missing_keys_and_isolates_failures(tmp_path):
    store = Store(tmp_path / "s", ".txt")
    calls = []

    def compute(item_id, key):
        calls.append(item_id)
        if item_id == "bad":
            raise ItemError("unreadable")
        store.write_bytes(key, item_id.encode())

    work = [(name, item_key("t", 1, [name], {})) for name in ("a", "b", "bad")]
    r1 = run_items("t", work, store, compute, workers=2)
    assert (r1.total, r1.computed, r1.reused, r1.failed) == (3, 2, 0, 1)
    assert r1.failures == {"bad": "unreadable"}
    calls.clear()
    r2 = run_items("t", work + [("c", item_key("t", 1, ["c"], {}))], store, compute, workers=2)
    assert sorted(calls) == ["bad", "c"]  # the failed one is retried, finished ones reused
    assert (r2.computed, r2.reused, r2.failed) == (1, 2, 1)
    assert store.read_bytes(work[0][1]) == b"a"


def test_run_items_raises_when_everything_fails(tmp_path):
    store = Store(tmp_path / "s", ".txt")

    def compute(item_id, key):
        raise ValueError("model not found")

    with pytest.raises(RuntimeError, match="all 2 items failed"):
        run_items("t", [("a", "k1"), ("b", "k2")], store, compute, workers=1)


def test_stale_temporaries_are_removed_and_never_listed(tmp_path):
    store = Store(tmp_path / "s", ".png")
    store.write_bytes("ab" + "0" * 62, b"x")
    tmp = store.root / "ab" / f".{'ab' + '1' * 62}.png.deadbeef.tmp"
    tmp.write_bytes(b"half")
    assert store.keys() == {"ab" + "0" * 62}
    assert store.remove_stale_temps() == 1 and not tmp.exists()


def test_run_batches_groups_orders_and_isolates_a_bad_item(tmp_path):
    import numpy as np

    from tasks.core.stage import run_batches
    from tasks.core.store import read_tensors, write_tensors

    store = Store(tmp_path / "s", ".safetensors")
    lengths = {"a": 5, "b": 1, "c": 3, "bad": 2, "d": 4}
    seen_batches = []

    def compute(batch):
        ids = [i for i, _ in batch]
        seen_batches.append(ids)
        if "bad" in ids:
            raise ValueError("cannot encode")
        for i, k in batch:
            write_tensors(store, k, {"x": np.full(lengths[i], 1, np.float16)}, {"len": str(lengths[i])})

    work = [(i, item_key("t", 1, [i], {})) for i in lengths]
    r = run_batches("t", work, store, compute, batch_size=2,
                    group=lambda i: lengths[i] % 2, order=lambda i: lengths[i])
    assert (r.computed, r.failed) == (4, 1) and set(r.failures) == {"bad"}
    # Odd lengths together, sorted: [b, c], [a]; even: [bad, d] fails, then alone.
    assert seen_batches[:3] == [["b", "c"], ["a"], ["bad", "d"]]
    assert ["bad"] in seen_batches and ["d"] in seen_batches
    arrays, meta = read_tensors(store, dict(work)["a"])
    assert arrays["x"].shape == (5,) and meta == {"len": "5"}
    again = run_batches("t", work, store, compute, batch_size=2)
    assert (again.computed, again.reused, again.failed) == (0, 4, 1)
