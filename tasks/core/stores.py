"""Every per-sample store of a repo at once: what they hold, moving old stores into packs, and
collecting the items no current table names.

Each stage's store is `data/derived/<stage>/` and its table `data/manifest/<stage>.parquet`,
whose `key` column names every item the current run uses. A store keeps every key it ever
computed, on purpose (going back to earlier params recomputes nothing), so it only grows; `gc`
is how a person says "I will not go back". It is a dry run unless `--apply`:

    python -m tasks.core.stores stat          # items, packs, loose files, bytes per store
    python -m tasks.core.stores pack          # move loose items (the layout before packs) into packs
    python -m tasks.core.stores gc            # what gc would remove, per store (nothing is touched)
    python -m tasks.core.stores gc --apply    # remove it; then `dvc commit` and `dvc gc -w`

A pack holding removed keys is rewritten without them (the new pack is sealed before the old
one goes), a loose item is deleted. The DVC cache still holds the old packs until `dvc gc -w`
(after `dvc commit` records the smaller stores): the command says so. A store whose table is
missing, or has no `key` column (ingest's probe records, keyed by content id and params, ~300
bytes each), is listed and left alone.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from tasks.core import packs
from tasks.core.store import PACKS_DIR, STORE_MARKER, Store

DERIVED, MANIFEST = Path("data/derived"), Path("data/manifest")
# Stores kept one file per item by design: the curation page serves each render and its
# thumbnail as a file (tasks/candidates.py); `pack` leaves them as they are.
LOOSE_BY_DESIGN = {"candidates"}


@dataclass
class Found:
    name: str
    items: int = 0
    packs: int = 0
    loose: int = 0
    bytes: int = 0
    referenced: int | None = None   # None: no table names this store's keys
    dead: int = 0
    dead_bytes: int = 0
    note: str = ""


def _loose(root: Path) -> dict[str, list[Path]]:
    """Loose items by key: `ab/<key><ext>` (a candidates render and its thumbnail share a key)."""
    out: dict[str, list[Path]] = {}
    for p in root.glob("??/*"):
        if p.is_file() and not p.name.startswith("."):
            out.setdefault(p.name.split(".", 1)[0], []).append(p)
    return out


def _pack_index(root: Path, damaged: list[str] | None = None) -> dict[str, dict[str, packs.Entry]]:
    """{pack: its index}; a pack whose footer cannot be read is left out (and named in `damaged`):
    it is never rewritten nor removed here, a person looks at it."""
    folder, out = root / PACKS_DIR, {}
    for p in sorted(folder.glob(f"*{packs.SUFFIX}")) if folder.is_dir() else []:
        try:
            out[p.name] = packs.read_index(p)
        except (packs.PackError, ValueError, OSError):
            if damaged is not None:
                damaged.append(p.name)
    return out


def referenced(repo: Path, name: str) -> set[str] | None:
    table = repo / MANIFEST / f"{name}.parquet"
    if not table.is_file() or "key" not in pq.read_schema(table).names:
        return None
    return {k for k in pq.read_table(table, columns=["key"])["key"].to_pylist() if k}


def survey(repo: Path) -> list[Found]:
    out = []
    for root in sorted(p for p in (repo / DERIVED).iterdir() if p.is_dir()) if (repo / DERIVED).is_dir() else []:
        f, damaged = Found(root.name), []
        index, loose = _pack_index(root, damaged), _loose(root)
        sizes: dict[str, int] = {}
        for entries in index.values():
            for key, (_, length, _) in entries.items():
                sizes.setdefault(key, length)
        for key, paths in loose.items():
            sizes.setdefault(key, sum(p.stat().st_size for p in paths))
        f.items, f.packs, f.loose = len(sizes), len(index), sum(len(v) for v in loose.values())
        f.bytes = sum(sizes.values())
        keep = referenced(repo, root.name)
        if keep is None:
            f.note = f"left alone: {MANIFEST / (root.name + '.parquet')} names no keys"
        else:
            f.referenced = len(keep & set(sizes))
            dead = set(sizes) - keep
            f.dead, f.dead_bytes = len(dead), sum(sizes[k] for k in dead)
        if damaged:
            f.note = (f.note + "; " if f.note else "") + f"unreadable packs left alone: {', '.join(damaged)}"
        if not (root / STORE_MARKER).is_file():
            f.note = (f.note + "; " if f.note else "") + f"no {STORE_MARKER}: not written by a Store"
        out.append(f)
    return out


def collect(repo: Path, name: str) -> tuple[int, int]:
    """Remove the keys of store `name` its table does not name: (items, bytes) removed."""
    root = repo / DERIVED / name
    keep = referenced(repo, name)
    if keep is None:
        return 0, 0
    removed, freed = 0, 0
    index = _pack_index(root)
    holding = [n for n, entries in index.items() if set(entries) - keep]
    if holding:
        freed += sum(e[1] for n in holding for k, e in index[n].items() if k not in keep)
        # The extension only names loose items; a pack holds keys.
        removed += Store(root, ".item").rewrite(holding, keep=keep)
    for key, paths in _loose(root).items():
        if key not in keep:
            for p in paths:
                freed += p.stat().st_size
                p.unlink()
            removed += 1
    return removed, freed


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MB"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=("stat", "pack", "gc"))
    ap.add_argument("--apply", action="store_true", help="gc: remove (without it, only say what would go)")
    ap.add_argument("--repo", type=Path, default=Path("."))
    args = ap.parse_args(argv)
    found = survey(args.repo)
    if not found:
        sys.exit(f"no stores under {args.repo / DERIVED}")
    if args.action == "pack":
        for f in found:
            root = args.repo / DERIVED / f.name
            exts = {p.name.split(".", 1)[1] for paths in _loose(root).values() for p in paths}
            if f.name in LOOSE_BY_DESIGN or len(exts) > 1:
                print(f"{f.name}: left loose (browsed as files, or items of several kinds: {', '.join(sorted(exts))})")
            elif exts:
                moved = Store(root, "." + exts.pop()).pack_loose()
                print(f"{f.name}: {moved} loose items moved into packs")
        return
    for f in found:
        ref = "-" if f.referenced is None else f"{f.referenced}"
        line = (f"{f.name:12s} {f.items:8d} items {_mb(f.bytes):>12s}  packs {f.packs:5d}  loose files {f.loose:7d}  "
                f"named by its table {ref:>7s}")
        if args.action == "gc" and f.referenced is not None:
            line += f"  unreferenced {f.dead} ({_mb(f.dead_bytes)})"
        print(line + (f"  [{f.note}]" if f.note else ""))
    if args.action != "gc":
        return
    dead = [f for f in found if f.dead]
    if not args.apply:
        print(f"dry run: {sum(f.dead for f in dead)} items ({_mb(sum(f.dead_bytes for f in dead))}) would be "
              "removed; run again with --apply to remove them" if dead else "nothing to remove")
        return
    for f in dead:
        n, b = collect(args.repo, f.name)
        print(f"{f.name}: removed {n} items ({_mb(b)})")
    if dead:
        print("the DVC cache still holds the old packs: `dvc commit` records the stores as they are now, "
              "then `dvc gc -w` frees the cache")


if __name__ == "__main__":
    main()
