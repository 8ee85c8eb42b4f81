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

from models.encoders import dinov3
from models.hub import ResolvedModel, SetupError, resolve, resolve_here, torch_dtype
from tasks.bucket import bucket_store
from tasks.core import manifest
from tasks.core.executors import default_workers, model_executor
from tasks.core.images import BucketedImage, decode_bucketed, read_bucketed
from tasks.core.params import PARAMS_FILE
from tasks.core.runner import run_model, settle_rows
from tasks.core.stage import ItemError, Report, stage_main
from tasks.core.store import Store, item_key, tensor_bytes
from tasks.core.workers import Failed, Result, Worker, check_device

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


class ImageWorker(Worker):
    """DINOv3 on whichever machine runs it: bucketed PNG bytes in, safetensors bytes out."""

    def __init__(self, model: ResolvedModel, dtype: str, device: str, threads: int):
        self.model, self.dtype, self.device, self.threads = model, dtype, device, threads
        self.encoder = None

    def setup(self) -> str:
        check_device(self.device)
        here = resolve_here(self.model, "embed_image.model", dinov3.ALLOW_PATTERNS)
        encoder = dinov3.DINOv3Encoder(here.path, torch_dtype(self.dtype, self.device), self.device)
        if encoder.patch_size != PATCH:
            raise SetupError(f"embed_image.model: patch size {encoder.patch_size}, expected {PATCH}")
        self.encoder = encoder
        return f"DINOv3 {self.model.key()}, {self.dtype} on {self.device}"

    def run(self, images: list[BucketedImage]) -> list[Result]:
        # PNG decoding releases the GIL: on a GPU it would otherwise be the bottleneck.
        with ThreadPoolExecutor(max_workers=self.threads) as pool:
            decoded = list(pool.map(_decode, images))
        out: list[Result] = [d if isinstance(d, Failed) else b"" for d in decoded]
        ok = [j for j, d in enumerate(decoded) if not isinstance(d, Failed)]
        if not ok:
            return out
        cls, patches = self.encoder.encode(np.stack([decoded[j] for j in ok]))  # (B, D), (B, h, w, D)
        for n, j in enumerate(ok):
            c16, p16 = cls[n].astype(np.float16), patches[n].astype(np.float16)
            if not (np.isfinite(c16).all() and np.isfinite(p16).all()):
                out[j] = Failed("non-finite features (out of float16 range)")
                continue
            bucket = f"{images[j].width}x{images[j].height}"
            out[j] = tensor_bytes({"cls": c16, "patches": p16},
                                  {"model": self.model.key(), "dtype": self.dtype, "bucket": bucket})
        return out


def _decode(img: BucketedImage) -> np.ndarray | Failed:
    try:
        return decode_bucketed(img)
    except ItemError as e:
        return Failed(str(e))


def embed_image(p: EmbedImageParams, in_dir: Path = manifest.MANIFEST_DIR, out_dir: Path = manifest.MANIFEST_DIR,
                store_dir: Path = STORE, workers: int | None = None, params_file: Path = PARAMS_FILE) -> Report:
    """`workers` threads decode a batch's PNGs; the model spreads itself over the cores; where
    it runs (this process or a Ray cluster) is params.yaml's `executor`."""
    p.validate()
    samples = manifest.read_table(in_dir / "bucket.parquet", manifest.BUCKET).to_pylist()
    # Rejects never reach the NanoDiT shards: their DINOv3 features would be wasted work.
    samples = [s for s in samples if s["split"] != "rejected"]
    resolved = resolve(p.model, "embed_image.model", p.revision, allow_patterns=dinov3.ALLOW_PATTERNS)
    with model_executor(params_file) as executor:
        return _embed(p, samples, resolved, executor, out_dir, Store(store_dir, ".safetensors"), workers)


def _embed(p: EmbedImageParams, samples: list[dict], resolved: ResolvedModel, executor, out_dir: Path,
           store: Store, workers: int | None) -> Report:
    device = executor.device()
    dtype_name = str(torch_dtype(p.dtype, device)).removeprefix("torch.")  # what "auto" became

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

    images = bucket_store()

    def read_input(item_id: str) -> BucketedImage:
        s = by_id[item_id]
        return read_bucketed(images, s["key"], s["width"], s["height"])

    worker = ImageWorker(resolved, dtype_name, device, workers or default_workers())
    report = run_model("embed_image", work, store, worker, read_input, p.batch_size, executor=executor,
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
