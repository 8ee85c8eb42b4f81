"""What the curation page shows: the candidates (data/manifest/candidates.parquet) and the
dataset as it is on disk now (data/raw), each joined with its decisions; and the hit rate.

The dataset view is the folder, not only the last ingest: an image just kept shows at once
(as "not ingested yet"), a quarantined file shows with ingest's reason, a rejected one under
data/raw/rejected/. A file materialised from a candidate is that candidate's item, so
rejecting it later in the dataset view is the same item's decision, never a second one that
the first would undo at the next materialisation.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import pyarrow.parquet as pq

from tasks.core.manifest import MANIFEST_DIR
from tasks.core.stage import METRICS_DIR, details_path
from tasks.core.store import atomic_write_json
from tasks.curate.decisions import DecisionLog, ItemState
from tasks.curate.materialise import RAW, REJECTED, places
from tasks.curate.tables import CANDIDATES_STORE, CANDIDATES_TABLE

log = logging.getLogger("niche.curate")

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", (text or "").lower()).strip("-")[:n].strip("-") or "candidate"


def candidate_name(row: dict) -> str:
    """The file name (no extension) a candidate gets in data/raw: readable, unique by its key."""
    return f"{slug(row.get('word') or row['prompt'])}-{row['id'][:12]}"


def _read(path: Path) -> list[dict]:
    try:
        return pq.read_table(path).to_pylist()
    except FileNotFoundError:
        return []
    except Exception as e:  # noqa: BLE001 — a half-written or foreign table: show the rest
        log.warning("curate: cannot read %s: %s", path, e)
        return []


def candidates(root: Path, state: dict[str, ItemState]) -> list[dict]:
    """Every rendered candidate, in the table's order (prompt, then seed), with its decision."""
    rows = [r for r in _read(root / CANDIDATES_TABLE) if r.get("key") and r.get("file")]
    rows.sort(key=lambda r: (r.get("word") or "", r["prompt"], r["seed"]))
    out = []
    for r in rows:
        item = f"cand:{r['id']}"
        file = (CANDIDATES_STORE / r["file"]).as_posix()
        s = state.get(item)
        out.append({
            "item": item, "view": "candidates", "file": file, "prompt": r["prompt"], "seed": r["seed"],
            "word": r.get("word"), "template": r.get("template"), "generator": r["generator"],
            "checkpoint": r["checkpoint"], "width": r.get("width"), "height": r.get("height"),
            "status": s.status if s else "new", "set": s.dest if s else None,
            "caption": s.caption if s and s.caption is not None else r["prompt"],
            "info": {"file": file, "name": candidate_name(r), "prompt": r["prompt"], "seed": r["seed"],
                     "word": r.get("word"), "template": r.get("template"), "generator": r["generator"],
                     "checkpoint": r["checkpoint"]},
        })
    return out


def _sidecar(path: Path, ext: str) -> str | None:
    try:
        return path.with_suffix(ext).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def dataset(root: Path, state: dict[str, ItemState], caption_ext: str = ".txt") -> list[dict]:
    """Every image under data/raw (and every quarantined file), with ingest's split, the
    quarantine reason and the sidecar caption."""
    root = Path(root)
    ingested = {r["path"]: r for r in _read(root / MANIFEST_DIR / "ingest.parquet")}
    quarantined = {r["path"]: r for r in _read(root / MANIFEST_DIR / "quarantine.parquet")}
    # Where decided items are now: their file is their item, whatever folder it moved to.
    owner: dict[str, ItemState] = {}
    for s in state.values():
        try:
            target = places(s).target
        except (KeyError, ValueError):
            continue
        if target is not None:
            owner[target.as_posix()] = s
    paths = set(quarantined)
    base = root / RAW
    if base.is_dir():
        for p in base.rglob("*"):
            rel = p.relative_to(root)
            if any(part.startswith(".") for part in rel.parts) or p.suffix.lower() not in IMAGE_EXTS:
                continue
            if p.is_file():
                paths.add(rel.as_posix())
    out = []
    for path in sorted(paths):
        s = owner.get(path)
        ing, bad = ingested.get(path), quarantined.get(path)
        in_rejected = Path(path).is_relative_to(REJECTED)
        item = s.item if s else f"raw:{path}"
        sidecar = _sidecar(root / path, caption_ext)
        info = dict(s.info) if s else {}
        if not item.startswith("cand:"):
            info.setdefault("origin", path)
            if not s or "caption_before" not in s.info:
                info["caption_before"] = sidecar
        out.append({
            "item": item, "view": "dataset", "file": path, "path": path,
            "split": ing["split"] if ing else ("rejected" if in_rejected else None),
            "ingested": ing is not None, "reason": bad["reason"] if bad else None,
            "detail": bad["detail"] if bad else None,
            "status": s.status if s else ("reject" if in_rejected else "new"),
            "set": s.dest if s else None, "caption": sidecar or "",
            "prompt": info.get("prompt"), "seed": info.get("seed"), "generator": info.get("generator"),
            "word": info.get("word"), "template": info.get("template"), "info": info,
        })
    return out


def hit_rate(state: dict[str, ItemState], rows: list[dict]) -> dict:
    """kept / seen, where seen = kept + rejected (a candidate skipped is not counted), overall and
    per generator, template and word: which template wastes the curator's time. Decided
    candidates count from the log (their generator and template were recorded with the
    decision), so earlier rounds count after the table moved on to a new checkpoint; the
    current table's undecided candidates count as undecided."""
    by: dict[str, dict[str, dict[str, int]]] = {"generator": {}, "template": {}, "word": {}}
    total = {"kept": 0, "rejected": 0, "undecided": 0}

    def count(info: dict, k: str) -> None:
        total[k] += 1
        for dim in by:
            c = by[dim].setdefault(str(info.get(dim) or "-"), {"kept": 0, "rejected": 0, "undecided": 0})
            c[k] += 1

    decided = set()
    for item, s in state.items():
        if item.startswith("cand:") and s.status in ("keep", "reject"):
            decided.add(item)
            count(s.info, "kept" if s.status == "keep" else "rejected")
    for r in rows:
        if r["item"] not in decided:
            count(r, "undecided")

    def rate(c: dict) -> dict:
        seen = c["kept"] + c["rejected"]
        return {**c, "seen": seen, "hit_rate": round(c["kept"] / seen, 4) if seen else None}

    return {"overall": rate(total), **{dim: {k: rate(c) for k, c in sorted(v.items())} for dim, v in by.items()}}


def write_stats(root: Path) -> dict:
    """The hit rate as a DVC metric, metrics/curate.json (overall: kept, rejected, seen,
    undecided, hit_rate), and its details beside it (per generator, template and word)."""
    root = Path(root)
    dlog = DecisionLog.at(root)
    try:
        state = dlog.state()
        stats = hit_rate(state, candidates(root, state))
    finally:
        dlog.close()
    overall = stats["overall"]
    metric = METRICS_DIR / "curate.json"
    atomic_write_json(root / details_path(metric), stats)
    atomic_write_json(root / metric, {k: overall[k] for k in ("kept", "rejected", "seen", "undecided", "hit_rate")})
    return stats
