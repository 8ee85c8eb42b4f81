"""Stage `embed_image`: each bucketed image → DINOv3 CLS vector (D,) and patch
grid (H/16, W/16, D), float16, at the bucket's own resolution.

Batches never mix buckets (a batch is one tensor, one size). The key holds the
bucket item's key, which already names the image's content, size and filter.

    python -m tasks.embed_image       # reads params.yaml:embed_image
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
from PIL import Image

from models.encoders import dinov3
from models.hub import resolve, torch_device, torch_dtype
from tasks.core import manifest
from tasks.bucket import STORE as BUCKET_STORE
from tasks.core.executors import default_workers
from tasks.core.runner import run_batches, settle_rows
from tasks.core.stage import ItemError, Report, stage_main
from tasks.core.store import Store, item_key, write_tensors

log = logging.getLogger("niche.embed_image")

VERSION = 1  # bump when the arrays written for the same key would change
STORE = Path("data/derived/embed_image")
PATCH = 16  # the grid columns below assume the /16 models this stage is for; checked at load

SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("bucket", pa.string(), nullable=False),  # "WxH"
    pa.field("grid_h", pa.int32(), nullable=False),  # patch rows = height / 16
    pa.field("grid_w", pa.int32(), nullable=False),  # patch columns = width / 16
    pa.field("key", pa.string()),  # null when the item failed
    pa.field("file", pa.string()),  # path of the item in the store
    pa.field("error", pa.string()),  # why it failed, null when it did not
])


@dataclass(frozen=True)
class EmbedImageParams:
    model: str = dinov3.DEFAULT_MODEL  # hub id or local folder
    revision: str | None = None  # hub commit/branch; None: the cached snapshot
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    batch_size: int = 8  # images of one bucket per forward pass

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"embed_image.batch_size: expected a positive integer, got {self.batch_size}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"embed_image.dtype: expected auto, float32 or bfloat16, got {self.dtype!r}")
        if not self.model:
            raise ValueError("embed_image.model: expected a hub id or a local folder")


def load_bucketed(path: Path, width: int, height: int) -> np.ndarray:
    """The bucket stage's PNG as (H, W, 3) uint8, refusing anything but what it wrote."""
    if not path.is_file():
        raise ItemError(f"bucketed image {path} is missing; run the bucket stage again")
    try:
        with Image.open(path) as im:
            im.load()
            mode, size, arr = im.mode, im.size, np.asarray(im)
    except (OSError, ValueError) as e:
        raise ItemError(f"bucketed image {path} is unreadable ({e}); run the bucket stage again") from None
    if mode != "RGB" or size != (width, height):
        raise ItemError(f"bucketed image {path} is {mode} {size[0]}x{size[1]}, expected RGB {width}x{height}")
    return arr


def embed_image(p: EmbedImageParams, in_dir: Path = manifest.MANIFEST_DIR, out_dir: Path = manifest.MANIFEST_DIR,
                store_dir: Path = STORE, workers: int | None = None) -> Report:
    """`workers` threads decode a batch's PNGs; the model spreads itself over the cores."""
    p.validate()
    samples = manifest.read_table(in_dir / "bucket.parquet", manifest.BUCKET).to_pylist()
    # Rejects never reach the NanoDiT shards: their DINOv3 features would be wasted work.
    samples = [s for s in samples if s["split"] != "rejected"]
    resolved = resolve(p.model, "embed_image.model", p.revision, allow_patterns=dinov3.ALLOW_PATTERNS)
    device = torch_device()
    dtype = torch_dtype(p.dtype, device)
    dtype_name = str(dtype).removeprefix("torch.")  # the key holds what "auto" became
    store = Store(store_dir, ".safetensors")

    rows, upstream, by_id, work = [], {}, {}, []
    for s in samples:
        row = dict(id=s["id"], split=s["split"], bucket=s["bucket"], grid_h=s["height"] // PATCH,
                   grid_w=s["width"] // PATCH, key=None, file=None, error=None)
        rows.append(row)
        if s["error"] is not None or s["key"] is None:
            upstream[s["id"]] = f"no bucketed image ({s['error']})"
            continue
        key = item_key("embed_image", VERSION, [s["key"]], {"dtype": dtype_name}, model=resolved.key())
        row.update(key=key, file=store.relpath(key))
        by_id[s["id"]] = s
        work.append((s["id"], key))

    encoder = None

    def load(item_id: str) -> np.ndarray | ItemError:
        # PNG decoding releases the GIL: on a GPU it would otherwise be the bottleneck.
        s = by_id[item_id]
        try:
            return load_bucketed(BUCKET_STORE / s["file"], s["width"], s["height"])
        except ItemError as e:
            return e

    def compute_batch(batch: list[tuple[str, str]]) -> dict[str, str]:
        nonlocal encoder
        if encoder is None:  # loaded on the first missing item: a cached run never reads the weights
            loaded = dinov3.DINOv3Encoder(resolved.path, dtype, device)
            if loaded.patch_size != PATCH:
                raise RuntimeError(f"embed_image.model: patch size {loaded.patch_size}, expected {PATCH}")
            encoder = loaded
        errors, ok, images = {}, [], []
        for (item_id, key), img in zip(batch, pool.map(load, [i for i, _ in batch])):
            if isinstance(img, ItemError):
                errors[item_id] = str(img)
            else:
                images.append(img)
                ok.append((item_id, key))
        if not ok:
            return errors
        cls, patches = encoder.encode(np.stack(images))  # (B, D), (B, h, w, D)
        for j, (item_id, key) in enumerate(ok):
            c16, p16 = cls[j].astype(np.float16), patches[j].astype(np.float16)
            if not (np.isfinite(c16).all() and np.isfinite(p16).all()):
                errors[item_id] = "non-finite features (out of float16 range)"
                continue
            write_tensors(store, key, {"cls": c16, "patches": p16},
                          {"model": resolved.key(), "dtype": dtype_name, "bucket": by_id[item_id]["bucket"]})
        return errors

    # A fatal model problem (wrong patch size) fails every batch; run_batches then
    # raises with the reason, since a run where every item failed is not bad input.
    with ThreadPoolExecutor(max_workers=workers or default_workers()) as pool:
        report = run_batches("embed_image", work, store, compute_batch, p.batch_size,
                             group=lambda item_id: by_id[item_id]["bucket"])

    settle_rows(rows, upstream, report,
                lambda rs: manifest.write_table(rs, SCHEMA, out_dir / "embed_image.parquet", sort_by="id"))
    counts: dict[str, int] = {}
    for r in rows:
        if r["error"] is None:
            counts[r["bucket"]] = counts.get(r["bucket"], 0) + 1
    report.extra = {"per_bucket": dict(sorted(counts.items())), "no_image": len(upstream),
                    "tiny_model": resolved.tiny}
    return report


def main(argv: list[str] | None = None) -> None:
    stage_main("embed_image", EmbedImageParams, embed_image, __doc__, argv)


if __name__ == "__main__":
    main()
