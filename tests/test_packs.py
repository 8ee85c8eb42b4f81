"""The packed store (tasks/core/packs.py, tasks/core/store.py): what readers see and when, what
a killed writer leaves, the old one-file-per-item layout read and packed as it is, merging."""
import os
import pickle
import signal
import subprocess
import sys
import textwrap

import pytest

from tasks.core import packs
from tasks.core.store import Store, StoreError, item_key


def _key(n) -> str:
    return item_key("t", 1, [str(n)], {})


def test_other_readers_see_a_writers_items_once_sealed_and_only_then(tmp_path):
    writer = Store(tmp_path / "s", ".bin")
    writer.write_bytes(_key(1), b"one")
    assert writer.read_bytes(_key(1)) == b"one" and writer.has(_key(1))  # its own: at once
    reader = Store(tmp_path / "s", ".bin")
    assert not reader.has(_key(1)) and reader.keys() == set()  # an open pack is nobody else's
    assert [p.name for p in writer.packs_dir.iterdir()][0].startswith(".open-")
    sealed = writer.seal()
    assert sealed.suffix == ".pack" and reader.read_bytes(_key(1)) == b"one"  # (looks again on a miss)
    writer.write_bytes(_key(1), b"again")  # a key names one content: kept as it was
    writer.seal()
    assert reader.keys() == {_key(1)} and reader.read_bytes(_key(1)) == b"one"
    assert [p.suffix for p in writer.packs_dir.iterdir()] == [".pack"]
    with pytest.raises(FileNotFoundError, match="no item"):
        reader.read_bytes(_key(2))


def test_packs_seal_at_their_limits_and_are_named_by_content(tmp_path):
    store = Store(tmp_path / "s", ".bin", max_items=3, max_bytes=1 << 20)
    for n in range(7):
        store.write_bytes(_key(n), bytes([n]) * 10)
    store.seal()
    sizes = sorted(len(packs.read_index(p)) for p in store.packs_dir.glob("*.pack"))
    assert sizes == [1, 3, 3]
    big = Store(tmp_path / "b", ".bin", max_items=100, max_bytes=100)
    for n in range(3):
        big.write_bytes(_key(n), b"x" * 60)  # each over half the byte limit: one pack each
    big.seal()
    assert len(list(big.packs_dir.glob("*.pack"))) == 3
    # The same items written again elsewhere give the same pack, byte for byte, and the same name.
    twin = Store(tmp_path / "t", ".bin", max_items=3)
    for n in range(3):
        twin.write_bytes(_key(n), bytes([n]) * 10)
    assert twin.seal() is None  # (sealed at its third item)
    (name,) = [p.name for p in twin.packs_dir.glob("*.pack")]
    assert (store.packs_dir / name).read_bytes() == (twin.packs_dir / name).read_bytes()


def test_a_damaged_item_is_refused_by_name(tmp_path):
    store = Store(tmp_path / "s", ".bin")
    store.write_bytes(_key(1), b"0123456789")
    pack = store.seal()
    offset = packs.read_index(pack)[_key(1)][0]
    data = bytearray(pack.read_bytes())
    data[offset + 3] ^= 0xFF
    pack.chmod(0o644)
    pack.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=f"{pack.name}: item {_key(1)} is damaged"):
        Store(tmp_path / "s", ".bin").read_bytes(_key(1))
    pack.write_bytes(bytes(data[:-5]))  # the footer cut short: its items count as missing
    again = Store(tmp_path / "s", ".bin")
    assert not again.has(_key(1))
    again.write_bytes(_key(1), b"0123456789")  # computed again, into a pack of its own
    again.seal()
    assert Store(tmp_path / "s", ".bin").read_bytes(_key(1)) == b"0123456789" and pack.exists()


KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    from tasks.core.store import Store, item_key
    store = Store(sys.argv[1], ".bin")
    for n in range(int(sys.argv[2])):
        store.write_bytes(item_key("t", 1, [str(n)], {}), str(n).encode() * 1000)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_a_killed_writer_loses_nothing_it_wrote_and_a_torn_record_is_cut(tmp_path):
    root = tmp_path / "s"
    out = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(root), "50"], cwd=os.getcwd())
    assert out.returncode == -signal.SIGKILL
    (left,) = packs.open_packs(root / "packs")
    with open(left, "ab") as f:  # and a record torn half way, as a kill during write(2) leaves
        f.write(packs.REC.pack(packs.ITEM, 64, 1000, 0) + b"f" * 64 + b"only part")
    reader = Store(root, ".bin")
    assert reader.keys() == set()  # nobody sees an open pack
    assert reader.remove_stale_temps() == 1
    assert reader.keys() == {_key(n) for n in range(50)}
    assert all(reader.read_bytes(_key(n)) == str(n).encode() * 1000 for n in range(50))
    assert packs.open_packs(root / "packs") == [] and len(list((root / "packs").glob("*.pack"))) == 1


def test_a_live_writers_open_pack_is_left_alone(tmp_path):
    writer = Store(tmp_path / "s", ".bin")
    writer.write_bytes(_key(1), b"mine")
    other = Store(tmp_path / "s", ".bin")
    assert other.remove_stale_temps() == 0 and len(packs.open_packs(writer.packs_dir)) == 1
    writer.write_bytes(_key(2), b"still mine")
    writer.seal()
    assert other.keys() == {_key(1), _key(2)}


def test_a_store_of_the_old_layout_is_read_as_it_is_and_packed_without_recomputing(tmp_path):
    root = tmp_path / "s"
    old = Store(root, ".json", layout="loose")  # what every store was before packs
    for n in range(5):
        old.write_bytes(_key(n), f'{{"n": {n}}}'.encode())
    store = Store(root, ".json")
    assert store.keys() == {_key(n) for n in range(5)} and store.read_bytes(_key(3)) == b'{"n": 3}'
    store.write_bytes(_key(9), b'{"n": 9}')
    store.finish()
    assert not any(p.is_dir() and len(p.name) == 2 for p in root.iterdir())  # no loose item left
    again = Store(root, ".json")
    assert again.keys() == {_key(n) for n in (0, 1, 2, 3, 4, 9)}
    assert [again.read_bytes(_key(n)) for n in range(5)] == [f'{{"n": {n}}}'.encode() for n in range(5)]


def test_small_packs_are_merged_once_there_are_enough(tmp_path):
    root = tmp_path / "s"
    for run in range(8):  # eight runs that each add one item, as adding a few images does
        store = Store(root, ".bin")
        store.write_bytes(_key(run), bytes([run]))
        store.finish()
        assert len(list(store.packs_dir.glob("*.pack"))) == (run + 1 if run < 7 else 1)
    assert Store(root, ".bin").keys() == {_key(n) for n in range(8)}
    full = Store(tmp_path / "f", ".bin", max_items=4)
    for n in range(8):
        full.write_bytes(_key(n), b"x")
    full.finish()
    assert full.small_packs() == [] and full.compact(at=2) == 0  # full packs are never rewritten


def test_a_store_sent_to_another_process_reads_and_carries_no_writer(tmp_path):
    store = Store(tmp_path / "s", ".bin")
    store.write_bytes(_key(1), b"x")
    store.seal()
    store.write_bytes(_key(2), b"y")  # open
    copy = pickle.loads(pickle.dumps(store))
    assert copy.read_bytes(_key(1)) == b"x" and not copy.has(_key(2)) and copy._writer is None
