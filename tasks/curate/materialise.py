"""The decision log, made into the pipeline's inputs: a kept candidate and its caption into
data/raw/<set>/, a rejected one into data/raw/rejected/ (the negative LoRA's input), a
dataset image rejected later moved into data/raw/rejected/ (and back on undo), a caption edit
into the image's sidecar .txt.

Materialising is idempotent and derived from an item's whole state, never from the last
decision alone: the target place is made right first (a copy or a move, each renamed into
place), then every other place the item may have been put is cleared. A process killed
between the two leaves a copy too many, which the next run (the server's start) removes. A
file that is not ours is never overwritten nor deleted: the item fails with the file's name.
"""
from __future__ import annotations

import filecmp
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from tasks.core.store import atomic_write
from tasks.curate.decisions import DecisionLog, ItemState

log = logging.getLogger("niche.curate")

RAW = Path("data/raw")
REJECTED = RAW / "rejected"
# ingest.tags_ext's default: a reject's tag list moves with it (else ingest lists it as an orphan).
TAGS_EXT = ".tags"


class MaterialiseError(RuntimeError):
    """An item's files cannot be made to match its decisions; the message names the file."""


@dataclass(frozen=True)
class Places:
    target: Path | None  # where the image must be (None: nowhere, a candidate not decided)
    others: tuple[Path, ...]  # everywhere else decisions may have put it


def safe_set(name: str) -> str:
    """A set is one folder name under data/raw (not rejected, not hidden, no separators)."""
    name = (name or "").strip()
    if (not name or name in (".", "..") or name.startswith(".") or "/" in name or "\\" in name
            or name == REJECTED.name or "\x00" in name):
        raise MaterialiseError(f"set {name!r}: expected one folder name under data/raw (not 'rejected', "
                               f"not hidden)")
    return name


def places(s: ItemState) -> Places:
    """Where the item's image must be, and where else it may have been put (repo-relative)."""
    if s.item.startswith("cand:"):
        name = s.info["name"] + ".png"
        kept = {RAW / d / name for d in s.sets}
        rejected = REJECTED / name
        target = RAW / s.dest / name if s.status == "keep" else rejected if s.status == "reject" else None
        return Places(target, tuple(sorted((kept | {rejected}) - {target})))
    origin = Path(s.info["origin"])
    rel = origin.relative_to(RAW)
    if rel.parts[0] == REJECTED.name:  # rejected by hand before: keeping it brings it into a set
        home, reject_at = origin, origin
        kept = {RAW / d / origin.name for d in s.sets}
        keep_at = RAW / s.dest / origin.name if s.dest else home
    else:  # an approved image: keeping it leaves it where it is
        home, reject_at = origin, REJECTED / rel
        kept, keep_at = set(), origin
    target = keep_at if s.status == "keep" else reject_at if s.status == "reject" else home
    return Places(target, tuple(sorted((kept | {home, reject_at}) - {target})))


def _write_text(path: Path, text: str) -> bool:
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except (FileNotFoundError, UnicodeDecodeError):
        pass
    atomic_write(path, lambda t: t.write_text(text, encoding="utf-8"))
    return True


def _same(a: Path, b: Path) -> bool:
    return a.is_file() and b.is_file() and filecmp.cmp(a, b, shallow=False)


def materialise(root: Path, s: ItemState, caption_ext: str = ".txt") -> Path | None:
    """Make data/raw match one item's state; returns where its image is now (repo-relative)."""
    root = Path(root)
    p = places(s)
    if s.item.startswith("cand:"):
        return _candidate(root, s, p, caption_ext)
    return _dataset(root, s, p, caption_ext)


def _candidate(root: Path, s: ItemState, p: Places, ext: str) -> Path | None:
    src = root / s.info["file"]
    if p.target is not None:
        dst = root / p.target
        if dst.exists() and not _same(src, dst):
            if not src.is_file():
                raise MaterialiseError(f"{s.item}: its image {src} is gone from the candidates store and "
                                       f"{p.target} is another file")
            raise MaterialiseError(f"{p.target}: another file is already there; {s.item} is not put over it")
        if not dst.exists():
            if not src.is_file():
                raise MaterialiseError(f"{s.item}: its image {s.info['file']} is gone from the candidates store "
                                       f"(dvc checkout data/derived/candidates, or render it again)")
            atomic_write(dst, lambda t: shutil.copyfile(src, t))
        if s.status == "keep":
            _write_text(dst.with_suffix(ext), s.caption if s.caption is not None else s.info.get("prompt", ""))
    for other in p.others:
        o = root / other
        if o.exists() and (_same(src, o) or (p.target is not None and _same(root / p.target, o))):
            o.unlink()
            o.with_suffix(ext).unlink(missing_ok=True)  # the caption we wrote beside it
        elif o.exists():
            log.warning("curate: %s is not %s's image; left alone", other, s.item)
    return p.target


def _dataset(root: Path, s: ItemState, p: Places, ext: str) -> Path:
    dst = root / p.target
    if not dst.exists():
        found = [root / o for o in p.others if (root / o).is_file()]
        if not found:
            raise MaterialiseError(f"{s.item}: the image is neither at {p.target} nor at "
                                   f"{', '.join(map(str, p.others))}; was it moved or deleted by hand?")
        src = found[0]
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)  # same file system: atomic; the sidecar follows
        for e in dict.fromkeys((ext, TAGS_EXT)):  # the caption and the tags follow the image
            side = src.with_suffix(e)
            if side.exists():
                os.replace(side, dst.with_suffix(e))
        log.info("curate: moved %s -> %s", src.relative_to(root), p.target)
    caption = s.caption
    if caption is None and "caption_before" in s.info:  # every edit undone: the text it had before
        before = s.info["caption_before"]
        if before is None:
            dst.with_suffix(ext).unlink(missing_ok=True)
            return p.target
        caption = before
    if caption is not None:
        _write_text(dst.with_suffix(ext), caption)
    return p.target


def materialise_all(root: Path, dlog: DecisionLog, caption_ext: str = ".txt") -> dict[str, str]:
    """Every decided item (the server's start, `python -m tasks.curate materialise`); returns
    {item: reason} for the ones that could not be made right. The rest goes on."""
    failed = {}
    for item, s in dlog.state().items():
        try:
            materialise(root, s, caption_ext)
        except (MaterialiseError, OSError, KeyError) as e:
            failed[item] = str(e)
            log.warning("curate: %s: %s", item, e)
    return failed
