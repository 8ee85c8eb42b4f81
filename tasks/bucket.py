"""Stage `bucket`: each sample resized to cover its nearest aspect bucket and
centre-cropped, stored as lossless uint8 RGB PNG in the per-sample store.

The key holds the content id, the chosen bucket and the filter, not the whole
bucket list: adding a bucket recomputes only the images that move to it.

    python -m tasks.bucket            # reads params.yaml:bucket
"""
from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from PIL import Image

from tasks.core import manifest
from tasks.core.executors import model_executor
from tasks.core.images import decode
from tasks.core.params import PARAMS_FILE
from tasks.core.runner import run_items, run_model
from tasks.core.stage import ItemError, Report, stage_main
from tasks.core.store import Store, item_key
from tasks.core.workers import Failed, Result, Worker

VERSION = 1  # bump when the pixels written for the same key would change
STORE = Path("data/derived/bucket")
# Level 1 is ~5x faster than 6 and the files are only a little larger; the
# level does not change pixels, so it is not part of the key.
PNG_LEVEL = 1
RAY_BATCH = 16  # raw images per batch sent to a Ray actor (CPU work: batches only save round trips)


def bucket_store(root: Path = STORE) -> Store:
    """The bucketed images, by key: what caption, embed_image, embed_pose, latents and shard read."""
    return Store(root, ".png")

FILTERS = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "hamming": Image.Resampling.HAMMING,
    "box": Image.Resampling.BOX,
    "nearest": Image.Resampling.NEAREST,
}

DEFAULT_BUCKETS = ((1024, 1024), (1216, 832), (832, 1216), (1280, 768),
                   (768, 1280), (1344, 704), (704, 1344))


@dataclass(frozen=True)
class BucketParams:
    buckets: tuple[tuple[int, int], ...] = DEFAULT_BUCKETS  # (width, height)
    resample: Literal["lanczos", "bicubic", "bilinear", "hamming", "box", "nearest"] = "lanczos"

    def validate(self) -> None:
        if not self.buckets:
            raise ValueError("bucket.buckets: expected at least one [width, height]")
        for i, (w, h) in enumerate(self.buckets):
            if w <= 0 or h <= 0 or w % 16 or h % 16:
                # Every later stage patches at 16 px (DINOv3/16, the DiT's patch).
                raise ValueError(f"bucket.buckets[{i}]: expected positive multiples of 16, got {w}x{h}")
        if len(set(self.buckets)) != len(self.buckets):
            raise ValueError("bucket.buckets: duplicate entries")


def nearest_bucket(width: int, height: int, buckets) -> tuple[int, int]:
    """The bucket closest in log aspect ratio (so 2:1 and 1:2 are equally far from 1:1)."""
    ar = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - ar))


def cover_crop(width: int, height: int, bw: int, bh: int) -> tuple[float, float, float]:
    """(scale, left, top): scale to cover the bucket, crop the centre.

    Returned as the source-space crop origin so any source point maps to the
    bucket as (x - left) * scale — later stages and tests map keypoints with it.
    """
    scale = max(bw / width, bh / height)
    # Clamped at 0: on the covered axis the exact answer is 0, and float error
    # can make it -1e-14, which PIL refuses as a crop box.
    return scale, max(0.0, (width - bw / scale) / 2.0), max(0.0, (height - bh / scale) / 2.0)


def render(image: Image.Image, bw: int, bh: int, resample: str) -> Image.Image:
    scale, left, top = cover_crop(image.width, image.height, bw, bh)
    box = (left, top, min(image.width, left + bw / scale), min(image.height, top + bh / scale))
    # Resampling straight from the crop box (not resize-then-crop) keeps the
    # filter's support at the crop edges and avoids a second rounding.
    return image.resize((bw, bh), FILTERS[resample], box=box)


@dataclass(frozen=True)
class RawImage:
    """One sample's original file as it travels to a worker: its bytes (read and checked against
    the content id on the driver), its path for messages, its size (ingest's) and its bucket."""

    path: str
    data: bytes
    width: int
    height: int
    bucket_w: int
    bucket_h: int


def read_raw(path: Path, item_id: str) -> bytes:
    """The original file's bytes, the very ones ingest hashed into `item_id`; else ItemError."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ItemError(f"{path} is missing since ingest; run ingest again") from None
    except OSError as e:
        raise ItemError(f"{path} is unreadable ({e})") from None
    if hashlib.sha256(data).hexdigest() != item_id:
        raise ItemError(f"{path} changed since ingest (sha256 differs); run ingest again")
    return data


def bucket_png(raw: RawImage, resample: str) -> bytes:
    """The bucketed PNG file's bytes: one function for every executor, so the bytes are equal."""
    # Ingest checked these very bytes against its pixel limit.
    img = decode(raw.data, max_pixels=raw.width * raw.height).image
    out = render(img, raw.bucket_w, raw.bucket_h, resample)
    buf = io.BytesIO()
    out.save(buf, format="PNG", compress_level=PNG_LEVEL)
    return buf.getvalue()


class BucketWorker(Worker):
    """bucket's per-item work for a Ray actor: raw file bytes in, PNG bytes out. No model."""

    def __init__(self, resample: str):
        self.resample = resample

    def run(self, inputs: list[RawImage]) -> list[Result]:
        out: list[Result] = []
        for raw in inputs:
            try:
                out.append(bucket_png(raw, self.resample))
            except Exception as e:  # noqa: BLE001 — per item, worded as run_items words it
                out.append(Failed(str(e) if isinstance(e, ItemError) else f"{type(e).__name__}: {e}"))
        return out


def bucket(p: BucketParams, in_dir: Path = manifest.MANIFEST_DIR, out_dir: Path = manifest.MANIFEST_DIR,
           store_dir: Path = STORE, workers: int | None = None, params_file: Path = PARAMS_FILE) -> Report:
    """`workers` threads here; with params.yaml's `executor` on Ray, actors on the cluster instead."""
    # Every split, rejects included: the SDXL latents stage needs them for the negative LoRA.
    samples = manifest.read_table(in_dir / "ingest.parquet", manifest.INGEST).to_pylist()
    store = bucket_store(store_dir)
    by_id, rows, work = {}, [], []
    for s in samples:
        bw, bh = nearest_bucket(s["width"], s["height"], p.buckets)
        scale, left, top = cover_crop(s["width"], s["height"], bw, bh)
        key = item_key("bucket", VERSION, [s["id"]], {"size": [bw, bh], "resample": p.resample})
        by_id[s["id"]] = (s, bw, bh)
        work.append((s["id"], key))
        rows.append(dict(id=s["id"], split=s["split"], bucket=f"{bw}x{bh}", width=bw, height=bh,
                         scale=scale, left=left, top=top, key=key, file=store.relpath(key), error=None))

    def read_input(item_id: str) -> RawImage:
        s, bw, bh = by_id[item_id]
        return RawImage(s["path"], read_raw(Path(s["path"]), item_id), s["width"], s["height"], bw, bh)

    def compute(item_id: str, key: str) -> None:
        store.write_bytes(key, bucket_png(read_input(item_id), p.resample))

    # bucket holds no GPU: on Ray its actors take CPUs only, unless gpus_per_actor says otherwise.
    with model_executor(params_file, gpu=False) as executor:
        if executor.name == "ray":
            report = run_model("bucket", work, store, BucketWorker(p.resample), read_input, RAY_BATCH,
                               executor=executor)
        else:
            report = run_items("bucket", work, store, compute, workers)
    for r in rows:
        if r["id"] in report.failures:
            r.update(key=None, file=None, error=report.failures[r["id"]])
    manifest.write_table(rows, manifest.BUCKET, out_dir / "bucket.parquet", sort_by="id")
    counts: dict[str, int] = {}
    for r in rows:
        if r["error"] is None:
            counts[r["bucket"]] = counts.get(r["bucket"], 0) + 1
    report.extra = {"per_bucket": dict(sorted(counts.items())),
                    "rejected": sum(r["split"] == "rejected" and r["error"] is None for r in rows)}
    return report


def main(argv: list[str] | None = None) -> None:
    stage_main("bucket", BucketParams, bucket, __doc__, argv)


if __name__ == "__main__":
    main()
