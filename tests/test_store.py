import pytest

from tasks.core.runner import run_items

from tasks.core.stage import ItemError
from tasks.core.store import Store, atomic_write, item_key, tensor_bytes
from tasks.core.workers import Worker


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
    store = Store(tmp_path / "s", ".png", layout="loose")
    store.write_bytes("ab" + "0" * 62, b"x")
    tmp = store.root / "ab" / f".{'ab' + '1' * 62}.png.deadbeef.tmp"
    tmp.write_bytes(b"half")
    assert store.keys() == {"ab" + "0" * 62}
    assert store.remove_stale_temps() == 1 and not tmp.exists()


class _Lengths(Worker):
    """A model stand-in with the Worker contract: item id in, safetensors bytes out."""

    def __init__(self, lengths: dict[str, int]):
        self.lengths, self.seen, self.ready = lengths, [], False

    def setup(self) -> str:
        self.ready = True
        return ""

    def run(self, ids):
        assert self.ready
        self.seen.append(list(ids))
        if "bad" in ids:
            raise ValueError("cannot encode")
        import numpy as np

        return [tensor_bytes({"x": np.full(self.lengths[i], 1, np.float16)}, {"len": str(self.lengths[i])})
                for i in ids]


def test_run_model_groups_orders_isolates_a_bad_item_and_writes_every_result(tmp_path):
    from tasks.core.runner import run_model
    from tasks.core.store import read_tensors

    store = Store(tmp_path / "s", ".safetensors")
    lengths = {"a": 5, "b": 1, "c": 3, "bad": 2, "d": 4, "gone": 7}
    worker = _Lengths(lengths)

    def read_input(item_id):
        if item_id == "gone":  # the driver cannot read it: it never reaches the worker
            raise ItemError("input gone")
        return item_id

    work = [(i, item_key("t", 1, [i], {})) for i in lengths]
    r = run_model("t", work, store, worker, read_input, batch_size=2,
                  group=lambda i: lengths[i] % 2, order=lambda i: lengths[i])
    assert (r.computed, r.failed) == (4, 2) and r.failures == {"bad": "ValueError: cannot encode",
                                                               "gone": "input gone"}
    # Odd lengths together, sorted: [b, c], [a] ([a, gone] without gone); even: [bad, d] fails,
    # then each alone.
    assert worker.seen == [["b", "c"], ["a"], ["bad", "d"], ["bad"], ["d"]]
    arrays, meta = read_tensors(store, dict(work)["a"])
    assert arrays["x"].shape == (5,) and meta == {"len": "5"}
    with pytest.raises(RuntimeError, match="all 2 items failed"):  # only the two bad ones left
        run_model("t", work, store, worker, read_input, batch_size=2)
    done, worker.ready = [(i, k) for i, k in work if i not in ("bad", "gone")], False
    assert run_model("t", done, store, worker, read_input, 2).reused == 4 and not worker.ready  # never set up


def test_the_runner_picks_the_executor_and_every_executor_gives_the_same_result(tmp_path, monkeypatch):
    """Per-item work runs on threads, model batches inline, unless $NICHE_EXECUTOR says otherwise;
    the stage never chooses, and the results (store and report) do not depend on the executor."""
    import threading

    from models.hub import SetupError
    from tasks.core.executors import InlineExecutor, ThreadExecutor, executor_for

    monkeypatch.delenv("NICHE_EXECUTOR", raising=False)
    assert isinstance(executor_for("items", 3), ThreadExecutor) and executor_for("items", 3).workers == 3
    monkeypatch.setenv("NICHE_EXECUTOR", "inline")
    assert isinstance(executor_for("items"), InlineExecutor)
    monkeypatch.setenv("NICHE_EXECUTOR", "warp-drive")
    with pytest.raises(SetupError, match="NICHE_EXECUTOR.*inline, threads"):
        executor_for("items")

    work = [(f"i{n}", item_key("t", 1, [str(n)], {})) for n in range(12)]
    reports, threads = {}, {}
    for name in ("threads", "inline"):
        monkeypatch.setenv("NICHE_EXECUTOR", name)
        store, seen = Store(tmp_path / name, ".txt"), set()

        def compute(item_id, key, store=store, seen=seen):
            seen.add(threading.get_ident())
            if item_id == "i7":
                raise ItemError("unreadable")
            store.write_bytes(key, item_id.encode())

        reports[name] = run_items("t", work, store, compute, workers=4)
        threads[name] = seen
        assert store.keys() == {k for i, k in work if i != "i7"}
    assert threads["inline"] == {threading.get_ident()}
    assert [(r.computed, r.failed, r.failures) for r in reports.values()] == [(11, 1, {"i7": "unreadable"})] * 2



def test_a_store_marks_its_root_once_before_its_first_write_and_keeps_a_right_marker(tmp_path):
    """tasks/core/storelinks.py lets DVC skip copying a folder holding this marker."""
    from tasks.core.store import STORE_MARKER, STORE_MARKER_TEXT

    store = Store(tmp_path / "s", ".txt")
    assert not store.root.exists()  # nothing before a write
    store.write_bytes("ab" + "0" * 62, b"x")
    marker = store.root / STORE_MARKER
    assert marker.read_text() == STORE_MARKER_TEXT
    ino = marker.stat().st_ino
    again = Store(tmp_path / "s", ".txt")
    again.write_bytes("cd" + "0" * 62, b"y")
    assert marker.stat().st_ino == ino  # left alone when right (it may be a DVC cache object)
    marker.write_text("something else")
    Store(tmp_path / "s", ".txt").write_bytes("ef" + "0" * 62, b"z")
    assert marker.read_text() == STORE_MARKER_TEXT
    store.seal(), again.seal()  # (the third Store sealed when it went away)
    assert again.keys() == {"ab" + "0" * 62, "cd" + "0" * 62, "ef" + "0" * 62}
    assert again.remove_stale_temps() == 0 and marker.is_file()
