"""Stage `ingest`: every file under the source folders becomes a manifest row
(a sample, keyed by the sha256 of its bytes) or a quarantine row with a reason.

Images a curator rejected (under a `rejected` folder, or listed in the
`rejected_list` file) are samples with split "rejected": probed and quarantined
like the rest, bucketed, but never captioned, embedded or sharded — they train
a "negative" SDXL LoRA only. The holdout is drawn from the approved images.

Nothing is moved or deleted: a bad file stays where it is and is listed. Probing
a file (full decode, conversion check) is the slow part, so its result is kept
in the per-sample store under the content id; adding 10 images to 10,000
decodes 10.

Nothing in a source folder stops the stage: an entry that is not a readable
regular file is listed with its reason instead of opened (tasks/core/rawfs.py
says which, for ingest and for DVC alike): a dangling symlink (broken_symlink),
a loop of symlinks (symlink_loop), a FIFO, socket or device (not_a_file), a name
that is not UTF-8 (name_not_utf8, listed with its bytes as \\xNN), a file or
folder that cannot be read or listed (unreadable), a file gone between the
listing and the reading (vanished) or rewritten meanwhile (changed). Files are
opened non-blocking and checked with fstat, so one swapped for a FIFO after the
listing cannot hang the stage either.

    python -m tasks.ingest            # reads params.yaml:ingest
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from tasks.core import manifest, rawfs
from tasks.core.images import ImageRejected, decode
from tasks.core.runner import run_items
from tasks.core.sources import abs_path, inside, scan
from tasks.core.stage import Report, stage_main
from tasks.core.store import Store, atomic_write, item_key

log = logging.getLogger("niche.ingest")

VERSION = 1  # bump when the probe's output changes meaning
STORE = Path("data/derived/ingest")
# In STORE (a local cache, not a DVC out): each raw file's stat and sha256 from the last run.
IDS_FILE = "content-ids.parquet"
# Reasons of entries DVC cannot hash unless rawfs's walk is installed.
_NOT_FILES = {rawfs.BROKEN_SYMLINK, rawfs.SYMLINK_LOOP, rawfs.NOT_A_FILE, rawfs.NAME_NOT_UTF8, rawfs.UNREADABLE}


@dataclass(frozen=True)
class IngestParams:
    sources: tuple[str, ...] = ("data/raw",)
    caption_ext: str = ".txt"
    # Tags beside an image (`a.png` + `a.tags`: "1girl, solo, watermark"), comma- or line-separated;
    # the SDXL full fine-tune builds tag-string prompts from them (train_sdxl.tag_share). null: none.
    tags_ext: str | None = ".tags"
    # Files that are neither images nor captions and belong there (hidden files,
    # the sample generator's ground-truth poses). Matched against the file name.
    ignore: tuple[str, ...] = (".*", "*.pose.json")
    holdout_count: int = 25
    # A 50-image dataset must not lose half of itself to a holdout of 25.
    holdout_max_fraction: float = 0.1
    split_seed: int = 0
    max_pixels: int = 100_000_000
    min_side: int = 512
    # Folders of rejected images. Inside a source (the default is) they are part of
    # its walk; outside every source they are walked too, since naming one is a
    # deliberate choice (list it as a dep in dvc.yaml then). A missing one: no rejects.
    rejected: tuple[str, ...] = ("data/raw/rejected",)
    # A text file of rejected files anywhere in the sources, one path per line,
    # relative to the repo root; blank lines and `#` comments are skipped.
    rejected_list: str | None = None

    def validate(self) -> None:
        if not self.sources:
            raise ValueError("ingest.sources: expected at least one folder")
        if not self.caption_ext.startswith("."):
            raise ValueError(f"ingest.caption_ext: expected an extension like '.txt', got {self.caption_ext!r}")
        if self.tags_ext is not None and (not self.tags_ext.startswith(".")
                                          or self.tags_ext.lower() == self.caption_ext.lower()):
            raise ValueError(f"ingest.tags_ext: expected an extension like '.tags' other than caption_ext, or null; "
                             f"got {self.tags_ext!r}")
        for name in ("holdout_count", "max_pixels", "min_side"):
            if getattr(self, name) < 0:
                raise ValueError(f"ingest.{name}: expected >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.holdout_max_fraction < 1.0:
            raise ValueError("ingest.holdout_max_fraction: expected a fraction in [0, 1), "
                             f"got {self.holdout_max_fraction}")
        if self.rejected_list is not None and not self.rejected_list.strip():
            raise ValueError("ingest.rejected_list: expected a file path or null, got an empty string")
        for i, folder in enumerate(self.rejected):
            if not folder.strip():
                raise ValueError(f"ingest.rejected[{i}]: expected a folder, got an empty string")
            for src in self.sources:
                # A rejected folder holding a whole source would leave nothing approved there.
                if inside(abs_path(src), [abs_path(folder)]):
                    raise ValueError(f"ingest.rejected[{i}]: {folder} contains the source {src}; "
                                     "every image in it would be a reject")


def _read(path: Path) -> bytes:
    """The bytes of a regular file; ImageRejected with a rawfs reason when it is not one
    (any more), cannot be read, or went away since it was listed."""
    try:
        with rawfs.open_regular(path) as f:
            return f.read()
    except rawfs.Unusable as e:
        raise ImageRejected(e.code, e.detail) from None
    except OSError as e:
        raise ImageRejected(rawfs.UNREADABLE, f"cannot read it: {e}") from None


def _content_id(path: Path, known: dict[str, tuple], seen: dict[str, tuple]) -> tuple[str, int]:
    """(sha256, size) of a regular file, read once through one descriptor, or taken from `known`
    (the last run's ids) when its size, mtime, ctime and inode are the same: adding 10 images to
    70,000 then reads 10 files, not 70,000 (the trust DVC's own state database puts in a stat).
    Records what it found in `seen`."""
    try:
        with rawfs.open_regular(path) as f:
            st = os.fstat(f.fileno())
            size = st.st_size
            if size == 0:
                raise ImageRejected("empty", "zero-byte file")
            stamp = (size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
            hit = known.get(str(path))
            digest = hit[1] if hit is not None and hit[0] == stamp else hashlib.file_digest(f, "sha256").hexdigest()
            seen[str(path)] = (stamp, digest)
            return digest, size
    except rawfs.Unusable as e:
        raise ImageRejected(e.code, e.detail) from None
    except OSError as e:
        raise ImageRejected(rawfs.UNREADABLE, f"cannot read it: {e}") from None


def _read_ids(path: Path) -> dict[str, tuple]:
    """{path: ((size, mtime_ns, ctime_ns, inode), sha256)} from the last run; {} when unreadable."""
    import pyarrow.parquet as pq

    try:
        t = pq.read_table(path).to_pydict()
        return {p: ((s, m, c, i), d) for p, s, m, c, i, d in
                zip(t["path"], t["size"], t["mtime_ns"], t["ctime_ns"], t["inode"], t["sha256"])}
    except Exception:  # noqa: BLE001 — missing or damaged: every file is hashed, as on a first run
        return {}


def _write_ids(path: Path, seen: dict[str, tuple]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = sorted(seen)
    cols = list(zip(*(seen[n][0] for n in names))) if names else [(), (), (), ()]
    table = pa.table({"path": names, "size": pa.array(cols[0], pa.int64()), "mtime_ns": pa.array(cols[1], pa.int64()),
                      "ctime_ns": pa.array(cols[2], pa.int64()), "inode": pa.array(cols[3], pa.uint64()),
                      "sha256": [seen[n][1] for n in names]})
    atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def _read_caption(path: Path) -> str:
    try:
        data = _read(path)
    except ImageRejected as e:
        raise ImageRejected(e.code, f"caption: {e.detail}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ImageRejected("caption_not_utf8", f"caption is not valid UTF-8 ({e})") from None
    return text.removeprefix("\ufeff").strip()


def split_tags(text: str) -> list[str]:
    """"a, b\nc" → ["a", "b", "c"]: booru-style tag lists, one tag per comma or line, blanks dropped."""
    return [t.strip() for line in text.splitlines() for t in line.split(",") if t.strip()]


def _holdout(ids: list[str], p: IngestParams) -> set[str]:
    """The ids ranked lowest by a seeded hash of the content id.

    Depends only on content, so a renamed or moved file keeps its split. Added
    images can push a holdout sample into train only if they themselves rank
    lower — at most one moves per added image.
    """
    n = min(p.holdout_count, int(len(ids) * p.holdout_max_fraction))
    if n < p.holdout_count:
        log.info("holdout: %d of %d approved samples (holdout_count %d capped by holdout_max_fraction %.2f)",
                 n, len(ids), p.holdout_count, p.holdout_max_fraction)
    rank = sorted(ids, key=lambda i: hashlib.sha256(f"{p.split_seed}:{i}".encode()).hexdigest())
    return set(rank[:n])


def ingest(p: IngestParams, out_dir: Path = manifest.MANIFEST_DIR, store_dir: Path = STORE,
           workers: int | None = None) -> Report:
    candidates, quarantine = scan(p)
    odd = sorted({q["reason"] for q in quarantine} & _NOT_FILES)
    if odd and not rawfs.active():
        log.warning("ingest: entries that are not readable regular files (%s) are listed, but the "
                    "DVC of this environment does not skip them: `dvc repro` can fail or hang on them. "
                    "Run `make venv` (or `python -m tasks.core.rawfs install`)", ", ".join(odd))
    store = Store(store_dir, ".json")
    # min_side is applied to the recorded size below, so changing it re-probes nothing.
    probe_params = {"max_pixels": p.max_pixels}

    # Hash every candidate (or take its id from the last run); an unreadable, empty or vanished
    # file is quarantined here.
    by_path, known, seen = {}, _read_ids(store_dir / IDS_FILE), {}
    for c in candidates:
        try:
            c["id"], c["bytes"] = _content_id(c["file"], known, seen)
        except ImageRejected as e:
            quarantine.append(dict(path=c["path"], reason=e.code, detail=e.detail, id=None))
            continue
        c["key"] = item_key("ingest", VERSION, [c["id"]], probe_params)
        by_path[c["path"]] = c

    # The same bytes under two names are probed once, through the first name that reads.
    names: dict[str, list[str]] = {}
    for c in sorted(by_path.values(), key=lambda c: c["path"]):
        names.setdefault(c["key"], []).append(c["path"])
    # Names that went away or changed between the hashing and the probe: never recorded in
    # the store (it holds what the bytes of an id are, not what happened to one name).
    lost: dict[str, tuple[str, str]] = {}

    def probe(path: str, key: str) -> None:
        for name in names[key]:
            c = by_path[name]
            try:
                data = _read(c["file"])
            except ImageRejected as e:
                lost[name] = (e.code, e.detail)
                continue
            if hashlib.sha256(data).hexdigest() != c["id"]:
                lost[name] = ("changed", "its bytes changed while ingest read it; run ingest again")
                continue
            try:
                d = decode(data, p.max_pixels)
                rec = dict(ok=True, format=d.format, mode=d.mode, orientation=d.orientation,
                           width=d.image.width, height=d.image.height)
            except ImageRejected as e:
                rec = dict(ok=False, reason=e.code, detail=e.detail)
            store.write(key, lambda t: t.write_text(json.dumps(rec, sort_keys=True)))
            return

    report = run_items("ingest", [(paths[0], key) for key, paths in names.items()], store, probe, workers)
    for name, (code, detail) in sorted(lost.items()):
        quarantine.append(dict(path=name, reason=code, detail=detail, id=None))
        seen.pop(str(by_path[name]["file"]), None)
        del by_path[name]
    _write_ids(store_dir / IDS_FILE, seen)

    # Group identical content; the first path in sorted order is the sample,
    # the first approved one when the same bytes are also approved: the curator
    # kept the image, and a negative LoRA must not learn what the model should make.
    groups: dict[str, list[dict]] = {}
    for c in sorted(by_path.values(), key=lambda c: (c["rejected"], c["path"])):
        groups.setdefault(c["id"], []).append(c)
    rows, conflicts = [], 0
    for cid, group in groups.items():
        c, dups = group[0], group[1:]
        rejected_too = [d["path"] for d in dups if d["rejected"] and not c["rejected"]]
        probed = names[c["key"]][0]
        if probed in report.failures:  # the probe itself crashed on these bytes
            rec = dict(ok=False, reason="probe_error", detail=report.failures[probed])
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
            note = "; the image is approved there, so it is not a reject" if dup["path"] in rejected_too else ""
            quarantine.append(dict(path=dup["path"], reason="duplicate",
                                   detail=f"same bytes as {c['path']}{note}", id=cid))
        if rejected_too:
            conflicts += 1
            log.warning("ingest: %s is approved and rejected at once (same bytes as rejected %s); "
                        "kept as approved", c["path"], ", ".join(rejected_too))
        caption, caption_path = None, None
        if c["caption_file"] is not None:
            try:
                caption, caption_path = _read_caption(c["caption_file"]), c["caption_file"].as_posix()
            except ImageRejected as e:
                quarantine.append(dict(path=c["caption_file"].as_posix(), reason=e.code,
                                       detail=f"{e.detail}; {c['path']} is kept without a caption", id=cid))
        tags = None
        if c.get("tags_file") is not None:
            try:
                tags = split_tags(_read_caption(c["tags_file"]))
            except ImageRejected as e:
                quarantine.append(dict(path=c["tags_file"].as_posix(), reason=e.code.replace("caption", "tags"),
                                       detail=f"{e.detail}; {c['path']} is kept without tags", id=cid))
        rows.append(dict(id=cid, path=c["path"], source=c["source"], format=rec["format"],
                         width=rec["width"], height=rec["height"], mode=rec["mode"],
                         orientation=rec["orientation"], bytes=c["bytes"], caption=caption,
                         caption_path=caption_path, tags=tags, split="rejected" if c["rejected"] else "train",
                         duplicates=[d["path"] for d in dups]))

    # Drawn from the approved images only: rejects (often 10x as many) are no
    # validation target, and must not shift which approved image is held out.
    holdout = _holdout([r["id"] for r in rows if r["split"] != "rejected"], p)
    for r in rows:
        if r["id"] in holdout:
            r["split"] = "holdout"
    n_rejected = sum(r["split"] == "rejected" for r in rows)

    manifest.write_table(rows, manifest.INGEST, out_dir / "ingest.parquet", sort_by="id")
    manifest.write_table(quarantine, manifest.QUARANTINE, out_dir / "quarantine.parquet", sort_by="path")
    for q in sorted(quarantine, key=lambda q: q["path"]):
        log.warning("quarantined %s — %s: %s", q["path"], q["reason"], q["detail"])
    reasons: dict[str, int] = {}
    for q in quarantine:
        reasons[q["reason"]] = reasons.get(q["reason"], 0) + 1
    report.extra = {
        "files": len(candidates),
        "samples": len(rows),  # approved (train + holdout) and rejected
        "train": len(rows) - len(holdout) - n_rejected,
        "holdout": len(holdout),
        "rejected": n_rejected,
        "approved_and_rejected": conflicts,  # same bytes both ways; kept as approved
        "quarantined": len(quarantine),
        "with_caption": sum(r["caption"] is not None for r in rows),
        "quarantine_by_reason": dict(sorted(reasons.items())),
    }
    return report


def main(argv: list[str] | None = None) -> None:
    stage_main("ingest", IngestParams, ingest, __doc__, argv)


if __name__ == "__main__":
    main()
