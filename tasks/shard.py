"""Stage `shard`: every modality of a sample joined by its content id into
WebDataset tars, one set per split and bucket, plus two parquet tables.

    data/shards/{split}/{bucket}/shard-{n:06d}.tar   members: see tasks/data/shard_format.py
    data/shards/index.parquet    one row per approved sample of the bucket manifest (where, or why not)
    data/shards/shards.parquet   one row per shard (samples, bytes, sha256, content key)

Assignment is stable. A (split, bucket) group is a binary tree over the bits
of the content ids: a leaf is split in two while it holds more than
`max_samples` samples or `max_bytes` bytes, then, while the group has fewer
than min(`min_shards`, samples) shards, its largest leaf is split (empty leaves
are dropped, so no shard is empty). Shard n is the leaf's heap index
(1 << depth) - 1 + prefix: numbers are stable but not contiguous. A new sample
changes only its own leaf, so it rewrites one shard, or splits one into two
when the caps (or, in a small group, min_shards) say so; every other shard
keeps its name and bytes. A shard whose content key (its samples' metadata,
which names every upstream item key, + the format) is unchanged and whose file
is in place is not rewritten; shards no longer planned are deleted.

    python -m tasks.shard             # reads params.yaml:shard
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from models.hub import SetupError
from tasks import caption, embed_image, embed_pose, embed_text
from tasks.core import manifest
from tasks.data import shard_format as fmt
from tasks.bucket import STORE as BUCKET_STORE
from tasks.core.executors import default_workers
from tasks.core.stage import Report, stage_main
from tasks.core.store import TMP_SUFFIX, mark_write_once

log = logging.getLogger("niche.shard")

OUT = Path("data/shards")
PATCH = 16

INDEX = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("bucket", pa.string(), nullable=False),  # "WxH"
    pa.field("shard", pa.string()),  # relative to data/shards; null when excluded
    pa.field("offset", pa.int64()),  # byte offset of the sample's first member header in the tar
    pa.field("bytes", pa.int64()),  # bytes of all its members: headers, data, padding
    pa.field("error", pa.string()),  # why it was left out ("<modality>: <reason>"), null otherwise
])

SHARDS = pa.schema([
    pa.field("shard", pa.string(), nullable=False),  # relative to data/shards
    pa.field("split", pa.string(), nullable=False),
    pa.field("bucket", pa.string(), nullable=False),
    pa.field("samples", pa.int64(), nullable=False),
    pa.field("bytes", pa.int64(), nullable=False),  # size of the tar file
    pa.field("sha256", pa.string(), nullable=False),  # of the whole tar file
    pa.field("key", pa.string(), nullable=False),  # content key: unchanged key + file in place = not rewritten
])


@dataclass(frozen=True)
class ShardParams:
    max_samples: int = 1000  # samples per shard at most
    max_bytes: int = 1 << 30  # tar bytes per shard at most (a lone larger sample still gets a shard)
    min_shards: int = 4  # per split and bucket, when it has that many samples: loader workers x ranks
    patch_pool: int = 2  # 1: every DINOv3 patch; 2: 2x2 mean-pooled (4x fewer patch bytes)
    patch_dtype: Literal["int8", "float16"] = "int8"  # int8 (per-token symmetric scales) | float16

    def validate(self) -> None:
        for name in ("max_samples", "max_bytes", "min_shards"):
            if getattr(self, name) < 1:
                raise ValueError(f"shard.{name}: expected an integer >= 1, got {getattr(self, name)}")
        if self.patch_pool not in (1, 2) or isinstance(self.patch_pool, bool):
            raise ValueError(f"shard.patch_pool: expected 1 or 2, got {self.patch_pool!r}")
        if self.patch_dtype not in ("int8", "float16"):
            raise ValueError(f"shard.patch_dtype: expected 'int8' or 'float16', got {self.patch_dtype!r}")


@dataclass
class Planned:
    path: str  # relative to the output folder
    split: str
    bucket: str
    samples: list[fmt.Sample]
    offsets: list[int]
    sizes: list[dict[str, int]]  # per sample: data bytes per member
    nbytes: int  # of the closed tar
    key: str


# ---------------------------------------------------------------- inputs

def _rows(path: Path, schema: pa.Schema) -> dict[str, dict]:
    return {r["id"]: r for r in manifest.read_table(path, schema).to_pylist()}


def gather(in_dir: Path) -> tuple[list[dict], dict[str, fmt.Sample], dict[str, str]]:
    """(approved bucket rows, usable samples by id, reasons for the others by id)."""
    buckets = manifest.read_table(in_dir / "bucket.parquet", manifest.BUCKET).to_pylist()
    # Rejects (for the negative SDXL LoRA) must never be NanoDiT training data; the
    # conditioning stages skip them, so their absence there is no failure.
    buckets = [b for b in buckets if b["split"] != "rejected"]
    ingest = _rows(in_dir / "ingest.parquet", manifest.INGEST)
    tables = {"caption": _rows(in_dir / "caption.parquet", caption.SCHEMA),
              "embed_text": _rows(in_dir / "embed_text.parquet", embed_text.SCHEMA),
              "embed_image": _rows(in_dir / "embed_image.parquet", embed_image.SCHEMA),
              "embed_pose": _rows(in_dir / "embed_pose.parquet", embed_pose.SCHEMA)}
    stores = {"bucket": (str(BUCKET_STORE), ".png"), "embed_text": (str(embed_text.STORE), ".safetensors"),
              "embed_image": (str(embed_image.STORE), ".safetensors"),
              "embed_pose": (str(embed_pose.STORE), ".safetensors")}
    samples, errors = {}, {}
    for b in buckets:
        try:
            samples[b["id"]] = _sample(b, ingest, tables, stores)
        except _Missing as e:
            errors[b["id"]] = str(e)
    return buckets, samples, errors


class _Missing(Exception):
    """A modality of the sample is missing; the message starts with the modality."""


def _sample(b: dict, ingest: dict, tables: dict, stores: dict) -> fmt.Sample:
    sid = b["id"]
    if b["error"] is not None or b["key"] is None:
        raise _Missing(f"bucket: {b['error']}")
    if sid not in ingest:
        raise _Missing("ingest: not in ingest.parquet; run the stages again")
    rows = {}
    for stage, table in tables.items():
        r = table.get(sid)
        if r is None:
            raise _Missing(f"{stage}: no row in {stage}.parquet; run {stage} again")
        if r["error"] is not None or r["key"] is None:
            raise _Missing(f"{stage}: {r['error'] or 'no item'}")
        if stage == "caption" and not (r["text"] or "").strip():
            raise _Missing("caption: empty text")
        rows[stage] = r
    for stage in ("embed_image", "embed_pose"):
        if rows[stage]["bucket"] != b["bucket"]:
            raise _Missing(f"{stage}: made for bucket {rows[stage]['bucket']}, the sample is in "
                           f"{b['bucket']}; run {stage} again")
    png = fmt.ItemRef(*stores["bucket"], b["key"])
    try:
        png_bytes = png.store().size(png.key)
    except FileNotFoundError:
        raise _Missing(f"bucket: item {png} is missing; run bucket again") from None
    paths = {stage: fmt.ItemRef(*stores[stage], rows[stage]["key"]) for stage in stores if stage != "bucket"}
    shapes = {}
    for stage, path in paths.items():
        try:
            shapes[stage] = fmt.tensor_shapes(path)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise _Missing(f"{stage}: item {path} unreadable ({type(e).__name__}: {e}); "
                           f"run {stage} again") from None
    grid = (b["height"] // PATCH, b["width"] // PATCH)
    length = rows["embed_text"]["length"]
    hidden, cls, patches = (shapes["embed_text"].get("hidden"), shapes["embed_image"].get("cls"),
                            shapes["embed_image"].get("patches"))
    checks = {"embed_text": hidden is not None and len(hidden) == 2 and hidden[0] == length,
              "embed_image": cls is not None and patches is not None and len(cls) == 1
              and patches == (*grid, cls[0]),
              "embed_pose": shapes["embed_pose"].get("pose") == fmt.POSE_SHAPE}
    for stage, ok in checks.items():
        if not ok:
            raise _Missing(f"{stage}: item {paths[stage]} has shapes {shapes[stage]}, which do not fit "
                           f"a {b['bucket']} sample; run {stage} again")
    return fmt.Sample(
        id=sid, split=b["split"], bucket=b["bucket"], width=b["width"], height=b["height"],
        caption=rows["caption"]["text"], source=ingest[sid]["path"], n_people=rows["embed_pose"]["n_people"],
        t5_length=length, t5_dim=hidden[1], dino_dim=cls[0], grid=grid, image=png,
        image_bytes=png_bytes, text=paths["embed_text"], dino=paths["embed_image"], pose=paths["embed_pose"],
        keys=(("bucket", b["key"]), ("caption", rows["caption"]["key"]), ("embed_text", rows["embed_text"]["key"]),
              ("embed_image", rows["embed_image"]["key"]), ("embed_pose", rows["embed_pose"]["key"])))


# ---------------------------------------------------------------- plan

def assign(items: list[tuple[str, int]], max_samples: int, max_bytes: int,
           min_shards: int) -> dict[int, list[str]]:
    """{shard number: sorted ids} for one group's (id, tar bytes) items; see the module doc."""
    def split(leaf):
        depth, prefix, members = leaf
        kids = [(depth + 1, 2 * prefix + bit, [m for m in members if (m[0] >> (255 - depth)) & 1 == bit])
                for bit in (0, 1)]
        return [k for k in kids if k[2]]

    def capped(leaf):
        members = leaf[2]
        over = len(members) > max_samples or fmt.shard_size(sum(m[2] for m in members)) > max_bytes
        return [x for kid in split(leaf) for x in capped(kid)] if over and len(members) > 1 else [leaf]

    leaves = capped((0, 0, [(int(i, 16), i, n) for i, n in items])) if items else []
    while len(leaves) < min(min_shards, len(items)):
        # The largest leaf; ties go to the shallowest, then the lowest prefix.
        big = max(leaves, key=lambda leaf: (len(leaf[2]), -leaf[0], -leaf[1]))
        leaves.remove(big)
        leaves += split(big)
    return {(1 << d) - 1 + prefix: sorted(m[1] for m in members) for d, prefix, members in leaves}


def plan(samples: dict[str, fmt.Sample], p: ShardParams) -> list[Planned]:
    sizes = {i: fmt.member_sizes(s, p.patch_pool, p.patch_dtype) for i, s in samples.items()}
    tar_bytes = {i: sum(fmt.tar_size(n) for n in sz.values()) for i, sz in sizes.items()}
    groups: dict[tuple[str, str], list[str]] = {}
    for i, s in samples.items():
        groups.setdefault((s.split, s.bucket), []).append(i)
    out = []
    for (split, bucket), ids in sorted(groups.items()):
        shards = assign([(i, tar_bytes[i]) for i in ids], p.max_samples, p.max_bytes, p.min_shards)
        for n, members in sorted(shards.items()):
            offsets = np.cumsum([0] + [tar_bytes[i] for i in members]).tolist()
            doc = {"format": fmt.FORMAT, "patch_pool": p.patch_pool, "patch_dtype": p.patch_dtype,
                   "samples": [[i, hashlib.sha256(fmt.sample_json(samples[i], p.patch_pool, p.patch_dtype))
                                .hexdigest()] for i in members]}
            key = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
            out.append(Planned(path=f"{split}/{bucket}/shard-{n:06d}.tar", split=split, bucket=bucket,
                               samples=[samples[i] for i in members], offsets=offsets[:-1],
                               sizes=[sizes[i] for i in members], nbytes=fmt.shard_size(offsets[-1]), key=key))
    return out


def shard(p: ShardParams, in_dir: Path = manifest.MANIFEST_DIR, out_dir: Path = OUT,
          workers: int | None = None) -> Report:
    t0 = time.perf_counter()
    p.validate()
    buckets, samples, errors = gather(in_dir)
    for b in buckets:
        gh, gw = b["height"] // PATCH, b["width"] // PATCH
        if b["id"] in samples and (gh % p.patch_pool or gw % p.patch_pool):
            raise SetupError(f"shard.patch_pool: {p.patch_pool} does not divide the {gw}x{gh} DINOv3 grid of "
                             f"bucket {b['bucket']}; use patch_pool 1, or buckets that are multiples of "
                             f"{PATCH * p.patch_pool}")
    for sid, err in sorted(errors.items()):
        log.warning("shard: %s left out: %s", sid, err)
    planned = plan(samples, p)

    for tmp in out_dir.rglob(f".*{TMP_SUFFIX}") if out_dir.is_dir() else []:
        tmp.unlink(missing_ok=True)  # left by a killed run; never visible as a shard
    # Every tar and table here is written to a temporary file and renamed, never written into:
    # DVC need not copy the shards (5.9 GB at 70,000 small images) before this stage re-runs.
    mark_write_once(out_dir)
    prev_path = out_dir / "shards.parquet"
    prev = {r["shard"]: r for r in pq.read_table(prev_path).to_pylist()} if prev_path.is_file() else {}
    shard_rows, todo = {}, []
    for sh in planned:
        old, f = prev.get(sh.path), out_dir / sh.path
        if old and old.get("key") == sh.key and f.is_file() and f.stat().st_size == sh.nbytes == old["bytes"]:
            shard_rows[sh.path] = old
        else:
            todo.append(sh)
    if todo:
        # Until they are written, the shards to rewrite are not in the table: a run
        # killed half-way cannot leave a file the next run would take as done.
        _write_shards_table(list(shard_rows.values()), out_dir)
    def write(sh: Planned) -> dict:
        digest = fmt.write_tar(out_dir / sh.path, sh, p.patch_pool, p.patch_dtype)
        return dict(shard=sh.path, split=sh.split, bucket=sh.bucket, samples=len(sh.samples),
                    bytes=sh.nbytes, sha256=digest, key=sh.key)

    with ThreadPoolExecutor(max_workers=workers or default_workers()) as pool:
        for row in tqdm(pool.map(write, todo), total=len(todo), desc="shard", unit="shard", disable=None,
                        leave=False):
            shard_rows[row["shard"]] = row

    index = {b["id"]: dict(id=b["id"], split=b["split"], bucket=b["bucket"], shard=None, offset=None,
                           bytes=None, error=errors.get(b["id"])) for b in buckets}
    for sh in planned:
        for s, offset, sizes in zip(sh.samples, sh.offsets, sh.sizes):
            index[s.id].update(shard=sh.path, offset=offset, bytes=sum(map(fmt.tar_size, sizes.values())))
    _write_shards_table(list(shard_rows.values()), out_dir)
    manifest.write_table(list(index.values()), INDEX, out_dir / "index.parquet", sort_by="id")
    deleted = _delete_others({sh.path for sh in planned}, out_dir)

    written = {sh.path for sh in todo}
    report = Report(stage="shard", total=len(buckets), failed=len(errors), failures=errors,
                    computed=sum(len(sh.samples) for sh in todo),
                    reused=sum(len(sh.samples) for sh in planned if sh.path not in written))
    report.extra = {"samples": len(samples), **_counts(planned, errors),
                    "shards": {"total": len(planned), "written": len(todo), "unchanged": len(planned) - len(todo),
                               "deleted": deleted},
                    **fmt.bytes_report(planned, p.patch_pool, p.patch_dtype)}
    report.seconds = time.perf_counter() - t0
    log.info("shard: %d samples in %d shards (%d written, %d unchanged, %d deleted), %d left out; "
             "%.2f MB per sample at 1 MP (prx-tg format: %.2f MB)", len(samples), len(planned), len(todo),
             len(planned) - len(todo), deleted, len(errors), report.extra["total_1mp_mb"],
             report.extra["prx_tg_1mp_mb"])
    return report


def _counts(planned: list[Planned], errors: dict[str, str]) -> dict:
    by_reason: dict[str, int] = {}
    for err in errors.values():
        by_reason[err.split(":", 1)[0]] = by_reason.get(err.split(":", 1)[0], 0) + 1
    groups: dict[str, dict[str, int]] = {}
    for sh in planned:
        g = groups.setdefault(f"{sh.split}/{sh.bucket}", {"samples": 0, "shards": 0})
        g["samples"] += len(sh.samples)
        g["shards"] += 1
    return {"excluded": len(errors), "excluded_by": dict(sorted(by_reason.items())),
            "per_group": dict(sorted(groups.items()))}


def _write_shards_table(rows: list[dict], out_dir: Path) -> None:
    manifest.write_table(rows, SHARDS, out_dir / "shards.parquet", sort_by="shard")


def _delete_others(keep: set[str], out_dir: Path) -> int:
    """Delete the shards no longer in the plan (the stage owns out_dir) and emptied folders."""
    n = 0
    for f in sorted(out_dir.glob("*/*/shard-*.tar")):
        if f.relative_to(out_dir).as_posix() not in keep:
            f.unlink()
            n += 1
    for split in [d for d in out_dir.iterdir() if d.is_dir()] if out_dir.is_dir() else []:
        for d in [split, *split.iterdir()][::-1]:
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
    return n


def main(argv: list[str] | None = None) -> None:
    stage_main("shard", ShardParams, shard, __doc__, argv)


if __name__ == "__main__":
    main()
