"""What ingest reads: every entry under the source folders (and rejected folders outside
them), each a candidate image, a sidecar caption, or a quarantine row with its reason, and
which candidates a curator rejected (a rejected folder, or the rejected-list file).

Entries are classified by tasks/core/rawfs.py without being opened (links, FIFOs, sockets,
devices, undecodable names), the rule DVC's walk of data/raw follows too. `p` is ingest's
params (tasks/ingest.py IngestParams): sources, ignore, caption_ext, rejected, rejected_list.
"""
from __future__ import annotations

import fnmatch
import logging
import os
import re
from pathlib import Path

from models.hub import SetupError
from tasks.core import rawfs

log = logging.getLogger("niche.ingest")


def _walk(root: Path, ignore: tuple[str, ...]):
    """Yield (path, kind, detail, is a symlink) for every entry under `root` not ignored, in sorted order.

    kind is rawfs.FILE, rawfs.DIR (only for symlinked folders: they are not descended,
    against cycles and escapes, but checked like symlinked files so one pointing outside
    is reported) or a reason code from rawfs.classify with its detail. A folder that
    cannot be listed is yielded as `unreadable`; one whose name is not UTF-8 as
    `name_not_utf8`, not descended (nothing under it could be named in the manifest).
    """
    ignored = re.compile("|".join(fnmatch.translate(pat) for pat in ignore)) if ignore else None
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            yield folder, rawfs.UNREADABLE, f"cannot list the folder: {e.strerror}; nothing in it is read", False
            continue
        subfolders = []
        for e in entries:
            if ignored is not None and ignored.match(e.name):
                continue
            path = folder / e.name
            # The common case costs one access(2): the listing's d_type already says "a regular
            # file, not a link" (70,000 images: 140,000 entries walked on every run). Anything
            # else goes through rawfs's whole rule.
            if e.is_file(follow_symlinks=False) and rawfs.utf8(e.name) and os.access(e.path, os.R_OK):
                yield path, rawfs.FILE, "", False
                continue
            kind, detail = rawfs.classify(path)
            link = e.is_symlink()
            if kind == rawfs.DIR and not link:
                subfolders.append(path)
                continue
            if kind == rawfs.NAME_NOT_UTF8 and os.path.isdir(path) and not link:
                detail = "a folder whose name is not valid UTF-8: nothing in it is read; rename it"
            yield path, kind, detail, link
        stack.extend(reversed(subfolders))


def inside(path: Path, roots: list[Path]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def abs_path(path: str | Path) -> Path:
    """Absolute and normalised, symlinked folders kept: what a path names as written."""
    return Path(os.path.abspath(path))


def _rejected_folders(p, real_roots: list[Path]) -> tuple[list[Path], list[Path]]:
    """(every existing rejected folder, those outside every source, to walk as well)."""
    folders, outside = [], []
    # Shallowest first, so a folder inside another outside one is not walked twice.
    for i, folder in sorted(enumerate(p.rejected), key=lambda x: len(abs_path(x[1]).parts)):
        f = Path(folder)
        if not f.exists():
            # Not an error: a dataset without rejects yet is the common case.
            (log.info if folder in type(p).rejected else log.warning)(
                "ingest.rejected[%d]: %s does not exist; no rejects from it", i, f)
            continue
        if not f.is_dir():
            if inside(abs_path(f), [abs_path(r) for r in p.sources]):
                # An entry of the data, not a setting: the walk lists it like any other.
                log.warning("ingest.rejected[%d]: %s is not a folder; no rejects from it", i, f)
                continue
            raise SetupError(f"ingest.rejected[{i}]: {f} is not a folder")
        folders.append(f)
        if not inside(f.resolve(), real_roots + [o.resolve() for o in outside]):
            log.info("ingest.rejected[%d]: %s is outside every source; walked as well", i, f)
            outside.append(f)
    return folders, outside


def read_rejected_list(path: str) -> list[str]:
    """The paths in a rejected-list file, as written (blank lines and # comments skipped)."""
    f = Path(path)
    if not f.is_file():
        # SetupError: the command stops with this line alone (a person fixes the path).
        raise SetupError(f"ingest.rejected_list: {f} is not a file (a list of rejected paths, "
                         "one per line, relative to the repo root)")
    try:
        text = f.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SetupError(f"ingest.rejected_list: {f} is not UTF-8 text ({e})") from None
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def mark_rejected(candidates: list[dict], p, folders: list[Path]) -> None:
    """Set c["rejected"] on every candidate: in a rejected folder, or listed."""
    in_folders = [abs_path(f) for f in folders]
    for c in candidates:
        c["rejected"] = bool(in_folders) and inside(abs_path(c["path"]), in_folders)
    if p.rejected_list is None:
        return
    by_abs = {abs_path(c["path"]): c for c in candidates}
    for line in read_rejected_list(p.rejected_list):
        c = by_abs.get(abs_path(line))
        if c is not None:
            c["rejected"] = True
        elif os.path.lexists(line):
            log.warning("ingest.rejected_list: %s is not an image under the sources; ignored", line)
        else:
            log.warning("ingest.rejected_list: %s not found; ignored (the rest of the list applies)", line)


def sidecar_exts(p) -> list[str]:
    """The sidecar extensions, longest first: with `.txt` and `.tags.txt`, `a.tags.txt` is a's tags."""
    return sorted({e for e in (p.caption_ext, getattr(p, "tags_ext", None)) if e}, key=len, reverse=True)


def scan(p) -> tuple[list[dict], list[dict]]:
    """Find image candidates and captions; return (candidates, quarantine rows)."""
    roots = [Path(s) for s in p.sources]
    for r in roots:
        if not r.is_dir():
            raise FileNotFoundError(f"ingest.sources: {r} is not a folder")
    real_roots = [r.resolve() for r in roots]
    folders, outside = _rejected_folders(p, real_roots)
    # A symlink into a rejected folder outside the sources does not escape them.
    real_roots += [f.resolve() for f in outside]
    # The list file may sit inside a source (under data/raw DVC sees its edits): not an input.
    skip = abs_path(p.rejected_list) if p.rejected_list is not None else None
    candidates, bad, captions = [], [], {}
    for root in roots + outside:
        for path, kind, detail, link in _walk(root, p.ignore):
            if skip is not None and abs_path(path) == skip:
                continue
            rel = rawfs.display(path.as_posix())  # a name that is not UTF-8 shows its bytes as \xNN
            if link:
                # realpath, not resolve(): it never raises, not even on a loop.
                target = Path(os.path.realpath(path))
                if not inside(target, real_roots):
                    bad.append(dict(path=rel, reason="symlink_outside", id=None,
                                    detail=f"symlink to {rawfs.display(target)}, outside the source folders"))
                    continue
                if kind == rawfs.DIR:
                    continue  # its files are walked through their real folder
            if kind != rawfs.FILE:
                bad.append(dict(path=rel, reason=kind, detail=detail, id=None))
                continue
            ext = next((e for e in sidecar_exts(p) if path.name.lower().endswith(e.lower())), None)
            if ext is not None:
                captions[(path.parent, path.name[:-len(ext)], ext)] = path
                continue
            candidates.append(dict(path=rel, source=root.as_posix(), file=path))
    # Attach sidecar captions; a caption whose image does not exist is listed.
    used = set()
    for c in candidates:
        for ext, field in ((p.caption_ext, "caption_file"), (getattr(p, "tags_ext", None), "tags_file")):
            cap = captions.get((c["file"].parent, c["file"].stem, ext)) if ext else None
            c[field] = cap
            if cap is not None:
                used.add(cap)
    for cap in sorted(set(captions.values()) - used):
        bad.append(dict(path=cap.as_posix(), reason="orphan_caption",
                        detail="caption or tags file with no image of the same name", id=None))
    mark_rejected(candidates, p, folders)
    return candidates, bad
