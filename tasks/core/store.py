"""The per-sample, content-addressed store every stage writes into.

An item's key is a hash of everything that can change its bytes: the content
ids of its inputs, the model id and revision, the parameters that matter and a
format version. A stage asks for the keys it needs and computes only the
missing ones, so re-runs, added images and killed runs cost only the new work.

A key names exactly one content, so nothing is ever overwritten: items live in
immutable pack files (tasks/core/packs.py) that readers see only once sealed, or,
in the loose layout, in files renamed into place. A reader never sees half an item.
`python -m tasks.core.stores stat|pack|gc` works on every store of a repo at once.

Long on purpose: the Store's promises (content keys, what a reader sees and when,
a killed writer's items kept, the old layout read and packed, small packs merged)
are one contract, and are read together.
"""
from __future__ import annotations

import atexit
import functools
import hashlib
import json
import logging
import os
import threading
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from tasks.core import packs

log = logging.getLogger("niche")

TMP_SUFFIX = ".tmp"
PACKS_DIR = "packs"
# Small packs (under 1/COMPACT_FRACTION of max_items and of max_bytes) are merged once there
# are COMPACT_AT of them (Store.compact).
COMPACT_AT, COMPACT_FRACTION = 8, 4
# At a Store's root, written before its first item: DVC need not copy the store's files before
# its stage re-runs (tasks/core/storelinks.py reads it; same name there).
STORE_MARKER = ".niche-store"
STORE_MARKER_TEXT = ("Written by Niche (tasks/core/store.py: a per-sample store, or shards): write-once.\n"
                     "Files are replaced (new temporary file + os.replace), never written into,\n"
                     "so DVC need not unprotect (copy) them before the stage re-runs.\n")


def item_key(stage: str, version: int, inputs: Iterable[str], params: dict[str, Any],
             model: str | None = None) -> str:
    """sha256 over a canonical JSON of what determines one output item."""
    doc = {
        "stage": stage,
        "version": version,
        "inputs": list(inputs),
        "model": model,
        "params": params,
    }
    blob = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write(path: Path, write: Callable[[Path], None], fsync: bool = True) -> None:
    """Write through `write(tmp_path)` then rename over `path`.

    The temporary name is hidden and unique per writer, so two workers racing on
    the same key both succeed and the later rename wins with identical bytes.
    fsync before the rename: without it a power cut can leave a renamed but
    empty file, which a content-addressed store would then trust forever.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}")
    try:
        write(tmp)
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes, fsync: bool = True) -> None:
    atomic_write(path, lambda p: p.write_bytes(data), fsync=fsync)


def atomic_write_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def mark_write_once(folder: Path) -> None:
    """Put STORE_MARKER in `folder` (atomically, unless it is there already): the files there are
    replaced, never written into, so DVC need not copy them before their stage re-runs
    (tasks/core/storelinks.py). For a Store's root, and for any out a stage writes the same way
    (data/shards: every tar and table written to a temporary file and renamed)."""
    marker = Path(folder) / STORE_MARKER
    try:
        present = marker.read_text(encoding="utf-8") == STORE_MARKER_TEXT
    except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError):
        present = False
    if not present:  # left alone when right: it may be a DVC cache object (a hardlink)
        atomic_write(marker, lambda t: t.write_text(STORE_MARKER_TEXT, encoding="utf-8"))


class StoreError(Exception):
    """An item that cannot be read back as written; the message names the store and the key."""


class Store:
    """One stage's items under `root`, by key.

    Packed (the default): items live in immutable pack files, `root/packs/*.pack`
    (tasks/core/packs.py), a few hundred MB or a few thousand items each, so DVC sees a few
    hundred files at 70,000 images instead of 500,000. Items this Store writes go into its open
    pack and are readable through it at once; every other reader (another process, another
    Store) sees them once the pack is sealed: `seal()`, which the runners call when a stage's
    loop ends (and, as a backstop, at exit). A writer killed before that loses nothing: the next
    writer's `recover()` seals what it wrote.

    Loose (`layout="loose"`): one file per item, `root/ab/abcdef....<ext>`, each written to a
    temporary name and renamed into place. For stores whose items a browser opens as files (the
    curation page's candidates and thumbnails), and the layout every store had before packs: a
    packed Store still reads loose items (so an old store is used as it is, nothing recomputed)
    and `pack_loose()` moves them into packs.
    """

    def __init__(self, root: Path | str, ext: str, layout: str = "packed",
                 max_items: int = 4096, max_bytes: int = 256 << 20):
        if layout not in ("packed", "loose"):
            raise ValueError(f"Store layout {layout!r}: expected packed or loose")
        self.root = Path(root)
        self.packs_dir = self.root / PACKS_DIR
        self.ext = ext if ext.startswith(".") else f".{ext}"
        self.layout, self.max_items, self.max_bytes = layout, max_items, max_bytes
        self._marked = False
        self._lock = threading.RLock()
        self._where: dict[str, tuple[str, packs.Entry]] | None = None  # key -> (pack name, entry)
        self._packs: dict[str, int] = {}       # pack name -> its item count
        self._fds: dict[str, int] = {}
        self._writer: packs.PackWriter | None = None
        self._loose_dirs: bool | None = None
        self._damaged: set[str] = set()         # packs whose footer cannot be read

    # -- names -----------------------------------------------------------------------------

    def path(self, key: str) -> Path:
        """Where a loose item lives (the loose layout, or a store from before packs)."""
        return self.root / key[:2] / f"{key}{self.ext}"

    def relpath(self, key: str) -> str:
        """The item's name in its store: what the manifest tables record (`file`)."""
        return f"{key[:2]}/{key}{self.ext}"

    # -- reading ---------------------------------------------------------------------------
    def _index(self, refresh: bool = False) -> dict[str, tuple[str, packs.Entry]]:
        with self._lock:
            if self._where is None or refresh:
                where = dict(self._where or {})
                names = {p.name for p in self.packs_dir.glob(f"*{packs.SUFFIX}")} if self.packs_dir.is_dir() else set()
                for gone in set(self._packs) - names:  # removed by compaction or gc elsewhere
                    self._packs.pop(gone)
                    where = {k: v for k, v in where.items() if v[0] != gone}
                for name in sorted(names - set(self._packs) - self._damaged):
                    try:
                        index = packs.read_index(self.packs_dir / name)
                    except (packs.PackError, ValueError, OSError) as e:
                        # Its items count as missing and are computed again, into a new pack; the
                        # damaged file is left where it is for a person to look at (gc does not
                        # touch it either).
                        log.error("%s: pack %s is unreadable (%s); its items will be computed again",
                                  self.root, name, e)
                        self._damaged.add(name)
                        continue
                    self._packs[name] = len(index)
                    for key, entry in index.items():
                        where.setdefault(key, (name, entry))
                if self._writer is not None:
                    for key, entry in self._writer.entries.items():
                        where.setdefault(key, (self._writer.path.name, entry))
                self._where = where
                self._loose_dirs = None
            return self._where

    def _has_loose_dirs(self) -> bool:
        if self._loose_dirs is None:
            self._loose_dirs = self.root.is_dir() and any(
                len(p.name) == 2 and p.is_dir() for p in self.root.iterdir())
        return self._loose_dirs

    def has(self, key: str) -> bool:
        if self.layout == "packed" and key in self._index():
            return True
        return (self.layout == "loose" or self._has_loose_dirs()) and self.path(key).is_file()

    def keys(self) -> set[str]:
        """Every key, sealed packs of other writers included (the index is read again)."""
        found = set(self._index(refresh=True)) if self.layout == "packed" else set()
        if self.root.is_dir():
            found |= {p.name[: -len(self.ext)] for p in self.root.glob(f"??/*{self.ext}")
                      if not p.name.startswith(".")}
        return found

    def _fd(self, name: str) -> int:
        if self._writer is not None and name == self._writer.path.name:
            return self._writer.fd
        if name not in self._fds:
            self._fds[name] = os.open(self.packs_dir / name, os.O_RDONLY)
        return self._fds[name]

    def read_bytes(self, key: str) -> bytes:
        """The item's bytes; FileNotFoundError naming the store when it holds no such key,
        StoreError when its bytes are damaged."""
        if self.layout == "packed":
            for refresh in (False, True):  # a pack sealed (or compacted) elsewhere since we looked
                hit = self._index(refresh).get(key)
                if hit is None:
                    continue
                try:
                    with self._lock:  # (so that a merge in this process cannot close the fd under the read)
                        return packs.read_item(self._fd(hit[0]), hit[1], f"{self.packs_dir / hit[0]}", key)
                except FileNotFoundError:
                    continue
                except packs.PackError as e:
                    raise StoreError(str(e)) from None
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.root}: no item {key}{self.ext} (run its stage again)") from None

    def size(self, key: str) -> int:
        """The item's length in bytes, from the index (a loose item: its file)."""
        if self.layout == "packed":
            for refresh in (False, True):
                if (hit := self._index(refresh).get(key)) is not None:
                    return hit[1][1]
        try:
            return self.path(key).stat().st_size
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.root}: no item {key}{self.ext} (run its stage again)") from None

    def head(self, key: str, n: int) -> bytes:
        """The item's first `n` bytes (a header), without reading or checking the rest."""
        if self.layout == "packed":
            for refresh in (False, True):
                if (hit := self._index(refresh).get(key)) is None:
                    continue
                offset, length, _ = hit[1]
                with self._lock:
                    try:
                        return os.pread(self._fd(hit[0]), min(n, length), offset)
                    except FileNotFoundError:
                        continue
        try:
            with open(self.path(key), "rb") as f:
                return f.read(n)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.root}: no item {key}{self.ext} (run its stage again)") from None

    # -- writing ---------------------------------------------------------------------------
    def mark(self) -> None:
        """Write STORE_MARKER at the root (atomically, unless it is there already), once per instance."""
        if not self._marked:
            mark_write_once(self.root)
            self._marked = True

    def write_bytes(self, key: str, data: bytes) -> None:
        """Store one item. A key already held is left as it is: a key names one content."""
        self.mark()
        if self.layout == "loose":
            atomic_write_bytes(self.path(key), data)
            return
        with self._lock:
            if key in self._index():
                return
            if self._writer is None:
                self._writer = packs.PackWriter(self.packs_dir)
                _OPEN.add(self)
            entry = self._writer.append(key, data)
            self._where[key] = (self._writer.path.name, entry)
            if len(self._writer) >= self.max_items or self._writer.size >= self.max_bytes:
                self.seal()

    def write(self, key: str, write: Callable[[Path], None]) -> None:
        """Store one item written by `write(path)` (a temporary file)."""
        tmp = self.root / f".{key}{self.ext}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        try:
            write(tmp)
            self.write_bytes(key, tmp.read_bytes())
        finally:
            tmp.unlink(missing_ok=True)

    def seal(self) -> Path | None:
        """Make what this Store wrote visible to every reader (a pack of its own)."""
        with self._lock:
            if self._writer is None:
                return None
            writer, self._writer = self._writer, None
            _OPEN.discard(self)
            if writer.pid != os.getpid():  # a forked child's copy: the parent seals it
                return None
            open_name = writer.path.name
            sealed = writer.seal()
            if sealed is not None and self._where is not None:
                index = packs.read_index(sealed)
                self._packs[sealed.name] = len(index)
                for key, entry in index.items():
                    if self._where.get(key, ("",))[0] == open_name:
                        self._where[key] = (sealed.name, entry)
            return sealed

    def finish(self) -> None:
        """End of a stage's loop: seal, move loose items of the old layout into packs, and merge
        small packs (`compact`)."""
        self.seal()
        if self.layout == "packed":
            self.pack_loose()
            self.compact()

    def pack_loose(self) -> int:
        """Move loose items (a store from before packs) into packs: each is appended, the pack is
        sealed (fsynced), and only then is the loose file removed. Nothing is recomputed; a kill
        in between leaves an item in both places, which reads the same."""
        if self.layout != "packed" or not self._has_loose_dirs():
            return 0
        loose = sorted(p for p in self.root.glob(f"??/*{self.ext}") if not p.name.startswith("."))
        moved: list[Path] = []
        for path in loose:
            self.write_bytes(path.name[: -len(self.ext)], path.read_bytes())
            moved.append(path)
        self.seal()
        for path in moved:
            path.unlink(missing_ok=True)
        for folder in {p.parent for p in moved}:
            try:
                folder.rmdir()
            except OSError:  # something else is in it: left as it is
                pass
        self._loose_dirs = None
        if moved:
            log.info("%s: moved %d loose items into packs", self.root, len(moved))
        return len(moved)

    def small_packs(self) -> list[str]:
        self._index(refresh=True)
        small = self.max_items // COMPACT_FRACTION
        return sorted(n for n, count in self._packs.items()
                      if count < small and (self.packs_dir / n).stat().st_size < self.max_bytes // COMPACT_FRACTION)

    def compact(self, at: int | None = None) -> int:
        """Merge the small packs once there are `at` (COMPACT_AT) of them: each run that adds a
        few images seals one small pack, and without this 100 such runs would leave 100 packs.
        Only small packs are rewritten (each under 1/COMPACT_FRACTION of a full one), so the cost
        stays bounded however large the store; the merged pack is sealed before the small ones
        are removed. Returns how many packs were merged."""
        small = self.small_packs()
        if len(small) < (COMPACT_AT if at is None else at) or len(small) < 2:
            return 0
        self.rewrite(small, keep=None)
        log.info("%s: merged %d small packs", self.root, len(small))
        return len(small)

    def rewrite(self, names: list[str], keep: set[str] | None) -> int:
        """Copy the items of packs `names` (those in `keep`, or all) into new packs, seal them,
        then remove the old ones. Returns how many items were dropped."""
        self.seal()
        dropped = 0
        with self._lock:
            for name in names:
                index = packs.read_index(self.packs_dir / name)
                fd = os.open(self.packs_dir / name, os.O_RDONLY)
                try:
                    for key, entry in index.items():
                        if keep is not None and key not in keep:
                            dropped += 1
                            continue
                        if self._writer is None:
                            self._writer = packs.PackWriter(self.packs_dir)
                            _OPEN.add(self)
                        if key not in self._writer.entries:
                            self._writer.append(key, packs.read_item(fd, entry, name, key))
                            if len(self._writer) >= self.max_items or self._writer.size >= self.max_bytes:
                                self.seal()
                finally:
                    os.close(fd)
            self.seal()
            for name in names:
                if (fd := self._fds.pop(name, None)) is not None:
                    os.close(fd)
                (self.packs_dir / name).unlink(missing_ok=True)
            packs._fsync_dir(self.packs_dir)
            self._where, self._packs = None, {}
        return dropped

    def remove_stale_temps(self) -> int:
        """Seal the open packs of killed writers (their items are kept) and delete a killed
        run's loose temporaries (never visible as items). Returns how many were found."""
        n = 0
        if self.layout == "packed":
            sealed, kept = packs.recover(self.packs_dir)
            if sealed:
                log.info("%s: kept %d items of %d packs an interrupted run left open", self.root, kept, len(sealed))
                self._index(refresh=True)
            n += len(sealed)
        if self.root.is_dir():
            for tmp in self.root.rglob(f".*{TMP_SUFFIX}"):
                if tmp.parent != self.packs_dir:
                    tmp.unlink(missing_ok=True)
                    n += 1
        return n

    def close(self) -> None:
        self.seal()
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 — never raise from a finaliser; recover() keeps the items
            pass

    def __getstate__(self) -> dict:
        """A Store sent to another process (DataLoader workers, Ray) reads; it never carries an
        open writer, file descriptors or a lock."""
        return {"root": self.root, "ext": self.ext, "layout": self.layout,
                "max_items": self.max_items, "max_bytes": self.max_bytes}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["root"], state["ext"], state["layout"], state["max_items"], state["max_bytes"])


@dataclass(frozen=True)
class ItemRef:
    """One item of a store, by name: its store's folder, extension and key. What travels to
    another process (a DataLoader worker, a shard writer) instead of a path; `str()` is its
    name in messages."""

    root: str
    ext: str
    key: str

    def store(self) -> Store:
        return _store(self.root, self.ext)

    def read(self) -> bytes:
        return self.store().read_bytes(self.key)

    def __str__(self) -> str:
        return f"{self.root}/{self.store().relpath(self.key)}"


@functools.lru_cache(maxsize=16)
def _store(root: str, ext: str) -> Store:
    return Store(root, ext)  # one per store and process: its index is read once, for reading


# Stores with an open pack: sealed at exit, so a stage function that wrote without a runner
# (or forgot to seal) still leaves its items visible. A kill skips this; recover() covers it.
_OPEN: "weakref.WeakSet[Store]" = weakref.WeakSet()


@atexit.register
def _seal_all() -> None:
    for store in list(_OPEN):
        try:
            store.seal()
        except Exception as e:  # noqa: BLE001 — at exit: the next writer recovers the pack
            log.warning("%s: could not seal its open pack at exit (%s); the next run keeps its items", store.root, e)


def tensor_bytes(tensors: dict, metadata: dict[str, str] | None = None) -> bytes:
    """One item as safetensors bytes (numpy arrays): what a worker returns for the driver to write."""
    import numpy as np
    from safetensors.numpy import save

    # safetensors (numpy) writes a non-contiguous array in memory order without a word: values
    # come back scrambled. Contiguous copies first.
    arrays = {k: np.asarray(v).copy(order="C") for k, v in tensors.items()}  # (keeps 0-d arrays 0-d)
    return _sorted_metadata(save(arrays, metadata=metadata))


def _sorted_metadata(blob: bytes) -> bytes:
    """The same file with its metadata in key order. safetensors writes `__metadata__` from a
    Rust HashMap, whose order changes from process to process: without this, one item computed
    twice (here and in a Ray worker, or in two runs) gives two different files."""
    import struct

    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    if "__metadata__" not in header:
        return blob
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the data stays 8-byte aligned, as safetensors pads it
    return struct.pack("<Q", len(text)) + text + blob[8 + n:]


def write_tensors(store: Store, key: str, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """One item as safetensors (numpy arrays)."""
    store.write_bytes(key, tensor_bytes(tensors, metadata))


def tensors_from_bytes(blob: bytes, name: str = "item") -> tuple[dict, dict[str, str]]:
    """(arrays, metadata) of safetensors bytes; ValueError naming `name` when they are not."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        return load(blob), tensor_metadata(blob[:8 + _header_length(blob, name)], name)
    except SafetensorError as e:
        raise ValueError(f"{name}: not a safetensors item ({e})") from None


def _header_length(blob: bytes, name: str) -> int:
    import struct

    if len(blob) < 8:
        raise ValueError(f"{name}: {len(blob)} bytes, not a safetensors item")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > 100 << 20:
        raise ValueError(f"{name}: not a safetensors item (header length {n})")
    return n


def tensor_metadata(head: bytes, name: str = "item") -> dict[str, str]:
    """The `__metadata__` of a safetensors item from its first bytes (the header alone)."""
    n = _header_length(head, name)
    try:
        header = json.loads(head[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{name}: not a safetensors item ({e})") from None
    if len(head) < 8 + n or not isinstance(header, dict):
        raise ValueError(f"{name}: not a safetensors item (cut short)")
    return dict(header.get("__metadata__") or {})


def read_metadata(store: Store, key: str) -> dict[str, str]:
    """The `__metadata__` of one safetensors item, reading its header only."""
    name = f"{store.root}/{store.relpath(key)}"
    n = _header_length(store.head(key, 8), name)
    return tensor_metadata(store.head(key, 8 + n), name)


def read_tensors(store: Store, key: str) -> tuple[dict, dict[str, str]]:
    """(arrays, metadata) of one safetensors item."""
    return tensors_from_bytes(store.read_bytes(key), f"{store.root}/{store.relpath(key)}")
