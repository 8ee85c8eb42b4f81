"""Stage `ingest`: every file under the source folders becomes a manifest row
(a sample, keyed by the sha256 of its bytes) or a quarantine row with a reason.

Nothing is moved or deleted: a bad file stays where it is and is listed. Probing
a file (full decode, conversion check) is the slow part, so its result is kept
in the per-sample store under the content id; adding 10 images to 10,000
decodes 10.

    python -m tasks.ingest            # reads params.yaml:ingest
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from tasks import manifest
from tasks.images import ImageRejected, decode
from tasks.stage import Report, run_items, stage_main
from tasks.store import Store, item_key, sha256_file

log = logging.getLogger("niche.ingest")

VERSION = 1  # bump when the probe's output changes meaning
STORE = Path("data/derived/ingest")


@dataclass(frozen=True)
class IngestParams:
    sources: tuple[str, ...] = ("data/raw",)
    caption_ext: str = ".txt"
    # Files that are neither images nor captions and belong there (hidden files,
    # the sample generator's ground-truth poses). Matched against the file name.
    ignore: tuple[str, ...] = (".*", "*.pose.json")
    holdout_count: int = 25
    # A 50-image dataset must not lose half of itself to a holdout of 25.
    holdout_max_fraction: float = 0.1
    split_seed: int = 0
    max_pixels: int = 100_000_000
    min_side: int = 512

    def validate(self) -> None:
        if not self.sources:
            raise ValueError("ingest.sources: expected at least one folder")
        if not self.caption_ext.startswith("."):
            raise ValueError(f"ingest.caption_ext: expected an extension like '.txt', got {self.caption_ext!r}")
        for name in ("holdout_count", "max_pixels", "min_side"):
            if getattr(self, name) < 0:
                raise ValueError(f"ingest.{name}: expected >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.holdout_max_fraction < 1.0:
            raise ValueError("ingest.holdout_max_fraction: expected a fraction in [0, 1), "
                             f"got {self.holdout_max_fraction}")


def _walk(root: Path, ignore: tuple[str, ...]):
    """Yield every file (and symlinked folder) under `root`, in sorted order."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        d = Path(dirpath)
        # Symlinked folders are not descended (cycles, escapes); they are checked
        # like symlinked files so one pointing outside is reported.
        for name in sorted(filenames + [n for n in dirnames if (d / n).is_symlink()]):
            if any(fnmatch.fnmatch(name, pat) for pat in ignore):
                continue
            yield d / name
        dirnames[:] = [n for n in dirnames if not (d / n).is_symlink()
                       and not any(fnmatch.fnmatch(n, pat) for pat in ignore)]


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def scan(p: IngestParams) -> tuple[list[dict], list[dict]]:
    """Find image candidates and captions; return (candidates, quarantine rows)."""
    roots = [Path(s) for s in p.sources]
    for r in roots:
        if not r.is_dir():
            raise FileNotFoundError(f"ingest.sources: {r} is not a folder")
    real_roots = [r.resolve() for r in roots]
    candidates, bad, captions = [], [], {}
    for root in roots:
        for path in _walk(root, p.ignore):
            rel = path.as_posix()
            if path.is_symlink():
                target = path.resolve()
                if not _inside(target, real_roots):
                    bad.append(dict(path=rel, reason="symlink_outside",
                                    detail=f"symlink to {target}, outside the source folders", id=None))
                    continue
                if not target.exists():
                    bad.append(dict(path=rel, reason="broken_symlink",
                                    detail=f"symlink to missing {target}", id=None))
                    continue
                if target.is_dir():
                    continue  # its files are walked through their real folder
            if path.suffix.lower() == p.caption_ext.lower():
                captions[(path.parent, path.stem)] = path
                continue
            candidates.append(dict(path=rel, source=root.as_posix(), file=path))
    # Attach sidecar captions; a caption whose image does not exist is listed.
    used = set()
    for c in candidates:
        cap = captions.get((c["file"].parent, c["file"].stem))
        c["caption_file"] = cap
        if cap is not None:
            used.add(cap)
    for cap in sorted(set(captions.values()) - used):
        bad.append(dict(path=cap.as_posix(), reason="orphan_caption",
                        detail="caption file with no image of the same name", id=None))
    return candidates, bad


def _read_caption(path: Path) -> str:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ImageRejected("caption_not_utf8", f"caption is not valid UTF-8 ({e})") from None
    except OSError as e:
        raise ImageRejected("unreadable", f"cannot read caption: {e}") from None
    return text.removeprefix("\ufeff").strip()


def _holdout(ids: list[str], p: IngestParams) -> set[str]:
    """The ids ranked lowest by a seeded hash of the content id.

    Depends only on content, so a renamed or moved file keeps its split. Added
    images can push a holdout sample into train only if they themselves rank
    lower — at most one moves per added image.
    """
    n = min(p.holdout_count, int(len(ids) * p.holdout_max_fraction))
    if n < p.holdout_count:
        log.info("holdout: %d of %d samples (holdout_count %d capped by holdout_max_fraction %.2f)",
                 n, len(ids), p.holdout_count, p.holdout_max_fraction)
    rank = sorted(ids, key=lambda i: hashlib.sha256(f"{p.split_seed}:{i}".encode()).hexdigest())
    return set(rank[:n])


def ingest(p: IngestParams, out_dir: Path = manifest.MANIFEST_DIR, store_dir: Path = STORE,
           workers: int | None = None) -> Report:
    candidates, quarantine = scan(p)
    store = Store(store_dir, ".json")
    # min_side is applied to the recorded size below, so changing it re-probes nothing.
    probe_params = {"max_pixels": p.max_pixels}

    # Hash every candidate; an unreadable or empty file is quarantined here.
    by_path = {}
    for c in candidates:
        try:
            size = c["file"].stat().st_size
            if size == 0:
                raise ImageRejected("empty", "zero-byte file")
            c["id"], c["bytes"] = sha256_file(c["file"]), size
            c["key"] = item_key("ingest", VERSION, [c["id"]], probe_params)
            by_path[c["path"]] = c
        except ImageRejected as e:
            quarantine.append(dict(path=c["path"], reason=e.code, detail=e.detail, id=None))
        except OSError as e:
            quarantine.append(dict(path=c["path"], reason="unreadable", detail=str(e), id=None))

    def probe(path: str, key: str) -> None:
        c = by_path[path]
        try:
            d = decode(c["file"].read_bytes(), p.max_pixels)
            rec = dict(ok=True, format=d.format, mode=d.mode, orientation=d.orientation,
                       width=d.image.width, height=d.image.height)
        except ImageRejected as e:
            rec = dict(ok=False, reason=e.code, detail=e.detail)
        store.write(key, lambda t: t.write_text(json.dumps(rec, sort_keys=True)))

    # The same bytes under two names are probed once.
    first = {}
    for c in sorted(by_path.values(), key=lambda c: c["path"]):
        first.setdefault(c["key"], c["path"])
    report = run_items("ingest", [(path, key) for key, path in first.items()], store, probe, workers)

    # Group identical content; the first path in sorted order is the sample.
    groups: dict[str, list[dict]] = {}
    for c in sorted(by_path.values(), key=lambda c: c["path"]):
        groups.setdefault(c["id"], []).append(c)
    rows = []
    for cid, group in groups.items():
        c, dups = group[0], group[1:]
        if c["path"] in report.failures:  # the probe itself crashed on this file
            rec = dict(ok=False, reason="probe_error", detail=report.failures[c["path"]])
        else:
            rec = json.loads(store.read_bytes(c["key"]))
        if rec["ok"] and min(rec["width"], rec["height"]) < p.min_side:
            rec = dict(ok=False, reason="too_small", detail=(
                f"{rec['width']}x{rec['height']}: shorter side < ingest.min_side {p.min_side}"))
        if not rec["ok"]:
            for g in group:
                quarantine.append(dict(path=g["path"], reason=rec["reason"], detail=rec["detail"], id=cid))
            continue
        for dup in dups:
            quarantine.append(dict(path=dup["path"], reason="duplicate",
                                   detail=f"same bytes as {c['path']}", id=cid))
        caption, caption_path = None, None
        if c["caption_file"] is not None:
            try:
                caption, caption_path = _read_caption(c["caption_file"]), c["caption_file"].as_posix()
            except ImageRejected as e:
                quarantine.append(dict(path=c["caption_file"].as_posix(), reason=e.code,
                                       detail=f"{e.detail}; {c['path']} is kept without a caption", id=cid))
        rows.append(dict(id=cid, path=c["path"], source=c["source"], format=rec["format"],
                         width=rec["width"], height=rec["height"], mode=rec["mode"],
                         orientation=rec["orientation"], bytes=c["bytes"], caption=caption,
                         caption_path=caption_path, split="train",
                         duplicates=[d["path"] for d in dups]))

    holdout = _holdout([r["id"] for r in rows], p)
    for r in rows:
        r["split"] = "holdout" if r["id"] in holdout else "train"

    manifest.write_table(rows, manifest.INGEST, out_dir / "ingest.parquet", sort_by="id")
    manifest.write_table(quarantine, manifest.QUARANTINE, out_dir / "quarantine.parquet", sort_by="path")
    for q in sorted(quarantine, key=lambda q: q["path"]):
        log.warning("quarantined %s — %s: %s", q["path"], q["reason"], q["detail"])
    reasons: dict[str, int] = {}
    for q in quarantine:
        reasons[q["reason"]] = reasons.get(q["reason"], 0) + 1
    report.extra = {
        "files": len(candidates),
        "samples": len(rows),
        "train": len(rows) - len(holdout),
        "holdout": len(holdout),
        "quarantined": len(quarantine),
        "with_caption": sum(r["caption"] is not None for r in rows),
        "quarantine_by_reason": dict(sorted(reasons.items())),
    }
    return report


def main(argv: list[str] | None = None) -> None:
    stage_main("ingest", IngestParams, ingest, __doc__, argv)


if __name__ == "__main__":
    main()
