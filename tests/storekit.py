"""Reading and damaging items of a stage's store by key, for tests (items live in packs, not in
one file each: tasks/core/store.py)."""
from __future__ import annotations

import shutil
from pathlib import Path

from tasks.core.store import Store

# Each stage's item extension, by its store's folder name (data/derived/<stage>).
EXT = {"ingest": ".json", "bucket": ".png", "caption": ".json", "expand": ".json",
       "embed_text": ".safetensors", "embed_image": ".safetensors", "embed_pose": ".safetensors",
       "latents": ".safetensors"}


def store_of(root: str | Path, ext: str | None = None) -> Store:
    return Store(root, ext or EXT[Path(root).name])


def item_bytes(root: str | Path, key: str, ext: str | None = None) -> bytes:
    return store_of(root, ext).read_bytes(key)


def _without(store: Store, key: str) -> None:
    """Rewrite the packs holding `key` without it (and remove a loose file of it)."""
    store.keys()
    holding = sorted({name for k, (name, _) in store._index(refresh=True).items() if k == key})
    if holding:
        store.rewrite(holding, keep=set(store.keys()) - {key})
    store.path(key).unlink(missing_ok=True)


def replace_item(root: str | Path, key: str, data: bytes, ext: str | None = None) -> None:
    """The store now holds `data` under `key`: damage on disk, as a test needs it."""
    store = store_of(root, ext)
    _without(store, key)
    store.write_bytes(key, data)
    store.seal()


def remove_item(root: str | Path, key: str, ext: str | None = None) -> None:
    _without(store_of(root, ext), key)


def unpack_to_the_old_layout(root: Path, ext: str) -> dict[str, bytes]:
    """Turn a packed store into what every store was before packs: `ab/<key><ext>` files, no packs."""
    packed = Store(root, ext)
    items = {k: packed.read_bytes(k) for k in packed.keys()}
    packed.close()
    shutil.rmtree(root / "packs")
    old = Store(root, ext, layout="loose")
    for k, data in items.items():
        old.write_bytes(k, data)
    return items
