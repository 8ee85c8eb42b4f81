"""`python -m tasks.core.stores`: gc is a dry run unless asked, removes exactly the keys no table
names (packed and loose stores alike), and leaves a store without a keyed table alone."""
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.core.store import Store, item_key


def _key(n) -> str:
    return item_key("t", 1, [str(n)], {})


def _table(repo, name, keys):
    (repo / "data/manifest").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": [str(i) for i in range(len(keys))], "key": keys}),
                   repo / f"data/manifest/{name}.parquet")


def _stores(repo, *args):
    return subprocess.run([sys.executable, "-m", "tasks.core.stores", *args, "--repo", str(repo)],
                          capture_output=True, text=True, check=True).stdout


def test_gc_removes_only_unreferenced_keys_and_only_when_asked(tmp_path):
    repo = tmp_path
    packed = Store(repo / "data/derived/embed_text", ".safetensors", max_items=4)
    for n in range(10):  # three packs: 4 + 4 + 2
        packed.write_bytes(_key(n), bytes([n]) * 100)
    packed.finish()
    loose = Store(repo / "data/derived/candidates", ".png", layout="loose")
    thumbs = Store(repo / "data/derived/candidates", ".thumb.jpg", layout="loose")
    for n in range(3):
        loose.write_bytes(_key(n), b"png")
        thumbs.write_bytes(_key(n), b"jpg")
    Store(repo / "data/derived/ingest", ".json").write_bytes(_key(0), b"{}")
    _table(repo, "embed_text", [_key(n) for n in (0, 1, 2, 3, 8)] + [None])  # (a failed row: no key)
    _table(repo, "candidates", [_key(0)])

    from tasks.core import packs

    before = sorted(p.name for p in (repo / "data/derived/embed_text/packs").iterdir())
    (alive,) = [p.name for p in (repo / "data/derived/embed_text/packs").iterdir()
                if set(packs.read_index(p)) == {_key(n) for n in range(4)}]
    out = _stores(repo, "gc")
    assert "dry run: 7 items" in out and "ingest" in out and "names no keys" in out
    assert sorted(p.name for p in (repo / "data/derived/embed_text/packs").iterdir()) == before

    out = _stores(repo, "gc", "--apply")
    assert "embed_text: removed 5 items" in out and "candidates: removed 2 items" in out and "dvc gc -w" in out
    again = Store(repo / "data/derived/embed_text", ".safetensors")
    assert again.keys() == {_key(n) for n in (0, 1, 2, 3, 8)}
    assert all(again.read_bytes(_key(n)) == bytes([n]) * 100 for n in (0, 1, 2, 3, 8))
    assert alive in [p.name for p in again.packs_dir.iterdir()]  # a pack with no dead key stays as it is
    assert Store(repo / "data/derived/candidates", ".png", layout="loose").keys() == {_key(0)}
    assert Store(repo / "data/derived/candidates", ".thumb.jpg", layout="loose").keys() == {_key(0)}
    assert Store(repo / "data/derived/ingest", ".json").keys() == {_key(0)}
    assert "nothing to remove" in _stores(repo, "gc")


def test_pack_moves_an_old_stores_loose_items_and_stat_counts_them(tmp_path):
    old = Store(tmp_path / "data/derived/caption", ".json", layout="loose")
    for n in range(5):
        old.write_bytes(_key(n), b'{"text": "x"}')
    assert "loose files       5" in _stores(tmp_path, "stat")
    assert "caption: 5 loose items moved into packs" in _stores(tmp_path, "pack")
    out = _stores(tmp_path, "stat")
    assert "loose files       0" in out and "packs     1" in out
    assert Store(tmp_path / "data/derived/caption", ".json").keys() == {_key(n) for n in range(5)}


def test_an_unreadable_pack_is_named_and_left_alone(tmp_path):
    store = Store(tmp_path / "data/derived/embed_pose", ".safetensors")
    store.write_bytes(_key(1), b"x" * 50)
    pack = store.seal()
    store.write_bytes(_key(2), b"y" * 50)
    store.seal()
    pack.chmod(0o644)
    pack.write_bytes(pack.read_bytes()[:-3])  # its footer cut short
    _table(tmp_path, "embed_pose", [])
    out = _stores(tmp_path, "gc", "--apply")
    assert f"unreadable packs left alone: {pack.name}" in out and "embed_pose: removed 1 items" in out
    assert pack.exists() and Store(tmp_path / "data/derived/embed_pose", ".safetensors").keys() == set()
