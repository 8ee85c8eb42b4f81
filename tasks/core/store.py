"""The per-sample, content-addressed store every stage writes into.

An item's key is a hash of everything that can change its bytes: the content
ids of its inputs, the model id and revision, the parameters that matter and a
format version. A stage asks for the keys it needs and computes only the
missing ones, so re-runs, added images and killed runs cost only the new work.

Files are immutable once renamed into place: a key names exactly one content,
so nothing is ever overwritten and a reader never sees a half-written file.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable

TMP_SUFFIX = ".tmp"
# At a Store's root, written before its first item: DVC need not copy the store's files before
# its stage re-runs (tasks/core/storelinks.py reads it; same name there).
STORE_MARKER = ".niche-store"
STORE_MARKER_TEXT = ("Niche per-sample store (tasks/core/store.py): write-once and content-addressed.\n"
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


class Store:
    """One stage's items: `root/ab/abcdef....<ext>`, two-level fan-out.

    The fan-out keeps directories small (70k items → ~270 per folder), which
    keeps listing, DVC hashing and rsync fast.
    """

    def __init__(self, root: Path | str, ext: str):
        self.root = Path(root)
        self.ext = ext if ext.startswith(".") else f".{ext}"
        self._marked = False

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}{self.ext}"

    def relpath(self, key: str) -> str:
        return f"{key[:2]}/{key}{self.ext}"

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def mark(self) -> None:
        """Write STORE_MARKER at the root (atomically, unless it is there already), once per instance."""
        if self._marked:
            return
        marker = self.root / STORE_MARKER
        try:
            present = marker.read_text(encoding="utf-8") == STORE_MARKER_TEXT
        except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError):
            present = False
        if not present:  # left alone when right: it may be a DVC cache object (a hardlink)
            atomic_write(marker, lambda t: t.write_text(STORE_MARKER_TEXT, encoding="utf-8"))
        self._marked = True

    def write(self, key: str, write: Callable[[Path], None]) -> Path:
        self.mark()
        p = self.path(key)
        atomic_write(p, write)
        return p

    def write_bytes(self, key: str, data: bytes) -> Path:
        return self.write(key, lambda t: t.write_bytes(data))

    def read_bytes(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    def remove_stale_temps(self) -> int:
        """Delete temporaries left by a killed run; they were never visible as items."""
        n = 0
        if self.root.is_dir():
            for tmp in self.root.rglob(f".*{TMP_SUFFIX}"):
                tmp.unlink(missing_ok=True)
                n += 1
        return n

    def keys(self) -> set[str]:
        if not self.root.is_dir():
            return set()
        return {p.name[: -len(self.ext)] for p in self.root.glob(f"??/*{self.ext}")
                if not p.name.startswith(".")}


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


def write_tensors(store: Store, key: str, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    """One item as safetensors (numpy arrays), written atomically."""
    return store.write_bytes(key, tensor_bytes(tensors, metadata))


def read_tensors(store: Store, key: str) -> tuple[dict, dict[str, str]]:
    """(arrays, metadata) of one safetensors item."""
    from safetensors import safe_open

    with safe_open(str(store.path(key)), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
