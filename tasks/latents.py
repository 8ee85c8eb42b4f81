"""Stage `latents`: each bucketed image → its SDXL VAE latent distribution
(mean and std of the diagonal Gaussian, (4, H/8, W/8), float16, unscaled).

The SDXL trainer reads these instead of running the VAE every step. Each item
carries its sample's content id in its safetensors metadata, and the trainer
loads it through `read_latent(item, expect_id)`: a latent can never be paired
with another image's caption, as a cache indexed by loader position can be when
the loader shuffles (diffusers' advanced SDXL script with `--cache_latents`).

    python -m tasks.latents           # reads params.yaml:latents
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

from models.hub import ResolvedModel, SetupError, fingerprint, resolve, resolve_here
from models.sdxl import pipeline as sdxl
from tasks.bucket import bucket_store
from tasks.core import manifest
from tasks.core.executors import default_workers, model_executor
from tasks.core.images import BucketedImage, decode_bucketed, read_bucketed
from tasks.core.params import PARAMS_FILE
from tasks.core.runner import run_model, settle_rows
from tasks.core.stage import ItemError, Report, stage_main
from tasks.core.store import ItemRef, Store, item_key, tensor_bytes, tensors_from_bytes
from tasks.core.workers import Failed, Result, Worker, where

log = logging.getLogger("niche.latents")

VERSION = 1  # bump when the arrays written for the same key would change (e.g. the resize filter)
STORE = Path("data/derived/latents")
# Latent sides must be divisible by 8 for the SDXL UNet's down/up-sampling, and
# the VAE divides by 8: encoded pixel sides are multiples of 64.
MULTIPLE = 64
VAE_FACTOR = 8
# Only the VAE's weights (and the configs): with NICHE_ALLOW_DOWNLOAD=1 this stage
# must not fetch a 10 GB UNet it never runs. Covers a standalone VAE repo too.
VAE_ALLOW = ["*.json", "vae/diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors"]

SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("bucket", pa.string(), nullable=False),  # "WxH" of the bucket stage
    pa.field("width", pa.int32(), nullable=False),  # encoded pixel size (SDXL's target size)
    pa.field("height", pa.int32(), nullable=False),
    pa.field("latent_width", pa.int32(), nullable=False),  # width / 8
    pa.field("latent_height", pa.int32(), nullable=False),
    pa.field("orig_width", pa.int32()),  # the original image (ingest), null when not found there
    pa.field("orig_height", pa.int32()),
    pa.field("crop_left", pa.int32(), nullable=False),  # crop origin, in encoded pixels
    pa.field("crop_top", pa.int32(), nullable=False),
    pa.field("key", pa.string()),  # null when the item failed
    pa.field("file", pa.string()),  # path of the item in the store
    pa.field("error", pa.string()),  # why it failed, null when it did not
])


@dataclass(frozen=True)
class LatentsParams:
    model: str = sdxl.DEFAULT_MODEL  # SDXL diffusers folder or hub id, or a standalone VAE folder
    revision: str | None = None  # hub commit/branch; None: the cached snapshot
    dtype: Literal["float32", "bfloat16"] = "float32"  # the VAE's compute dtype; float16 overflows in the SDXL VAE
    image_scale: float = 1.0  # encode at this fraction of the bucket size (rounded to 64 px)
    batch_size: int = 4  # images of one bucket per forward pass
    device: Literal["auto", "cpu", "cuda"] = "auto"
    splits: tuple[str, ...] = ("train", "holdout", "rejected")  # manifest splits to encode

    def validate(self) -> None:
        if not self.model:
            raise ValueError("latents.model: expected a hub id or a local folder")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"latents.dtype: expected float32 or bfloat16, got {self.dtype!r} "
                             "(the SDXL VAE overflows to NaN in float16)")
        if not 0 < self.image_scale <= 1:
            raise ValueError(f"latents.image_scale: expected a number in (0, 1], got {self.image_scale}")
        if self.batch_size < 1:
            raise ValueError(f"latents.batch_size: expected a positive integer, got {self.batch_size}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"latents.device: expected auto, cpu or cuda, got {self.device!r}")
        if not self.splits or not all(self.splits) or len(set(self.splits)) != len(self.splits):
            raise ValueError(f"latents.splits: expected distinct, non-empty split names, got {list(self.splits)}")


class LatentMismatch(ValueError):
    """A latent file that does not belong to the sample it was paired with."""


def encoded_size(width: int, height: int, image_scale: float) -> tuple[int, int]:
    """The bucket size scaled and rounded (half up) to a multiple of 64, at least 64."""
    def side(n: int) -> int:
        return max(MULTIPLE, int(n * image_scale / MULTIPLE + 0.5) * MULTIPLE)
    return side(width), side(height)


def vae_key(r: ResolvedModel) -> str:
    """The VAE's part of the key. For a local SDXL folder only vae/ is fingerprinted:
    a new UNet or text encoder in the same folder does not change a single latent.
    A hub snapshot's commit names the VAE's weights already."""
    if r.revision.startswith("local-") and (r.path / "vae" / "config.json").is_file():
        return f"{r.id}/vae@local-{fingerprint(r.path / 'vae')}"
    return r.key()


def check_device(device: str) -> None:
    """On the worker: `cuda` where torch sees none is refused, never computed on the CPU instead."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise SetupError(f"latents.device: 'cuda', but torch sees no CUDA device on {where()}; "
                         "set it to auto or cpu")


def load_image(img: BucketedImage, encode: tuple[int, int]) -> np.ndarray:
    """The bucket stage's PNG (bytes read by the driver), checked to be what it wrote, resized to
    `encode` → (H, W, 3) uint8; ItemError naming the file otherwise."""
    arr = decode_bucketed(img)
    if (img.width, img.height) == encode:
        return arr
    return np.asarray(Image.fromarray(arr).resize(encode, Image.Resampling.LANCZOS))


@dataclass(frozen=True)
class LatentInput:
    """What a LatentWorker gets per item: the bucketed PNG and what its metadata says."""

    id: str  # the sample's content id, written into the item: the trainer checks it
    bucket: str  # "WxH" of the bucket stage
    width: int  # encoded pixel size
    height: int
    image: BucketedImage


class LatentWorker(Worker):
    """The SDXL VAE on whichever machine runs it: bucketed PNG bytes in, safetensors bytes out.
    Picklable until setup(): settings only."""

    def __init__(self, model: ResolvedModel, vae_key: str, dtype: str, device: str, threads: int):
        self.model, self.vae_key, self.dtype, self.device, self.threads = model, vae_key, dtype, device, threads
        self.vae = None

    def setup(self) -> str:
        import torch

        check_device(self.device)
        here = resolve_here(self.model, "latents.model", VAE_ALLOW)
        self.vae = sdxl.load_vae(here, "latents.model", getattr(torch, self.dtype), self.device)
        return f"SDXL VAE {self.vae_key}, {self.dtype} on {self.device} ({where()})"

    def run(self, inputs: list[LatentInput]) -> list[Result]:
        import torch

        # PNG decoding and resizing release the GIL: on a GPU they would otherwise be the bottleneck.
        with ThreadPoolExecutor(max_workers=self.threads) as pool:
            images = list(pool.map(_load, inputs))
        out: list[Result] = [x if isinstance(x, Failed) else b"" for x in images]
        ok = [j for j, x in enumerate(images) if not isinstance(x, Failed)]
        if not ok:
            return out
        # NCHW contiguous: a permuted (channels-last) view takes another conv kernel on CPUs,
        # whose latents differ by ~1e-2 from the same image encoded the usual way.
        x = torch.from_numpy(np.stack([images[j] for j in ok])).permute(0, 3, 1, 2).contiguous()
        x = x.to(device=self.device, dtype=torch.float32)
        x = (x / 127.5 - 1.0).to(getattr(torch, self.dtype))  # [-1, 1], as SDXL's VAE was trained
        with torch.inference_mode():
            dist = self.vae.encode(x).latent_dist
            mean, std = dist.mean.float().cpu().numpy(), dist.std.float().cpu().numpy()
        for n, j in enumerate(ok):
            item = inputs[j]
            # Contiguous copies: `mean` is a channel slice of the VAE's moments, and
            # safetensors (0.8) writes a strided array's memory, not its values.
            m16, s16 = np.ascontiguousarray(mean[n], np.float16), np.ascontiguousarray(std[n], np.float16)
            if not (np.isfinite(m16).all() and np.isfinite(s16).all()):
                out[j] = Failed("non-finite latent (VAE overflow, or out of float16 range)")
                continue
            meta = {"id": item.id, "bucket": item.bucket, "width": str(item.width), "height": str(item.height),
                    "vae": self.vae_key, "dtype": self.dtype,
                    "scaling_factor": repr(float(self.vae.config.scaling_factor))}
            out[j] = tensor_bytes({"mean": m16, "std": s16}, meta)
        return out


def _load(item: LatentInput) -> np.ndarray | Failed:
    try:
        return load_image(item.image, (item.width, item.height))
    except ItemError as e:
        return Failed(str(e))


def latents(p: LatentsParams, in_dir: Path = manifest.MANIFEST_DIR, out_dir: Path = manifest.MANIFEST_DIR,
            store_dir: Path = STORE, workers: int | None = None, params_file: Path = PARAMS_FILE) -> Report:
    """`workers` threads decode and resize a batch's PNGs; the VAE spreads itself over the cores;
    where it runs (this process or a Ray cluster) is params.yaml's `executor`."""
    p.validate()
    samples = [s for s in manifest.read_table(in_dir / "bucket.parquet", manifest.BUCKET).to_pylist()
               if s["split"] in p.splits]
    originals = {s["id"]: (s["width"], s["height"]) for s in
                 manifest.read_table(in_dir / "ingest.parquet", manifest.INGEST).to_pylist()}
    resolved = resolve(p.model, "latents.model", p.revision, allow_patterns=VAE_ALLOW)
    vkey = vae_key(resolved)
    store = latents_store(store_dir)

    rows, upstream, by_id, work = [], {}, {}, []
    for s in samples:
        w, h = encoded_size(s["width"], s["height"], p.image_scale)
        fx, fy = w / s["width"], h / s["height"]  # bucket pixels -> encoded pixels
        orig = originals.get(s["id"], (None, None))
        row = dict(id=s["id"], split=s["split"], bucket=s["bucket"], width=w, height=h,
                   latent_width=w // VAE_FACTOR, latent_height=h // VAE_FACTOR,
                   orig_width=orig[0], orig_height=orig[1],
                   # bucket_xy = (src_xy - (left, top)) * scale, so the crop origin is
                   # (left, top) * scale in the resized-to-cover image; then to encoded pixels.
                   crop_left=round(s["left"] * s["scale"] * fx), crop_top=round(s["top"] * s["scale"] * fy),
                   key=None, file=None, error=None)
        rows.append(row)
        if s["error"] is not None or s["key"] is None:
            upstream[s["id"]] = f"no bucketed image ({s['error']})"
            continue
        if orig[0] is None:
            upstream[s["id"]] = "not in ingest.parquet (no original size for SDXL); run ingest and bucket again"
            continue
        key = item_key("latents", VERSION, [s["id"], s["key"]],
                       {"bucket": s["bucket"], "size": [w, h], "dtype": p.dtype}, model=vkey)
        row.update(key=key, file=store.relpath(key))
        by_id[s["id"]] = row | {"bucket_key": s["key"], "bucket_size": (s["width"], s["height"])}
        work.append((s["id"], key))

    images = bucket_store()

    def read_input(item_id: str) -> LatentInput:
        r = by_id[item_id]
        return LatentInput(item_id, r["bucket"], r["width"], r["height"],
                           read_bucketed(images, r["bucket_key"], *r["bucket_size"]))

    # A fatal VAE problem (or a missing CUDA) raises in the worker's setup: one error for the stage.
    with model_executor(params_file) as executor:
        # The device is in no key (the dtype is), so a fully cached run asks no cluster for it.
        missing = any(not store.has(k) for _, k in work)
        device = executor.device() if p.device == "auto" and missing else p.device
        worker = LatentWorker(resolved, vkey, p.dtype, device, workers or default_workers())
        report = run_model("latents", work, store, worker, read_input, p.batch_size, executor=executor,
                           group=lambda item_id: by_id[item_id]["bucket"])

    settle_rows(rows, upstream, report,
                lambda rs: manifest.write_table(rs, SCHEMA, out_dir / "latents.parquet", sort_by="id"))
    sizes: dict[str, int] = {}
    splits: dict[str, int] = {}
    for r in rows:
        if r["error"] is None:
            size = f"{r['width']}x{r['height']}"
            sizes[size] = sizes.get(size, 0) + 1
            splits[r["split"]] = splits.get(r["split"], 0) + 1
    report.extra = {"per_size": dict(sorted(sizes.items())), "per_split": dict(sorted(splits.items())),
                    "no_image": len(upstream), "tiny_model": resolved.tiny,
                    # Which items failed and why, where `dvc metrics show` and the flow see them.
                    "failures": dict(sorted(report.failures.items()))}
    return report


def latents_store(root: Path = STORE) -> Store:
    """The latents, by key: what the SDXL trainers read (tasks/sdxl/data.py)."""
    return Store(root, ".safetensors")


def read_latent(item: ItemRef, expect_id: str) -> dict:
    """One latent item: {"mean", "std": float16 (4, h, w) arrays, "meta": its metadata}.

    Raises LatentMismatch when the item was computed for another sample than
    `expect_id` — the check that keeps a latent with its own caption. The meta
    holds id, bucket, width and height (encoded pixels), vae, dtype and
    scaling_factor (the trainer multiplies samples of the latent by it).
    """
    try:
        blob = item.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"latent {item} (sample {expect_id}) is missing; run the latents stage again") from None
    arrays, meta = tensors_from_bytes(blob, f"latent {item}")
    got = meta.get("id")
    if got != expect_id:
        raise LatentMismatch(f"latent {item} belongs to sample {got}, not to {expect_id}: "
                             "the latents table and the store disagree; run the latents stage again")
    out = {name: arrays[name] for name in ("mean", "std")}
    meta.update(width=int(meta["width"]), height=int(meta["height"]),
                scaling_factor=float(meta["scaling_factor"]))
    return {**out, "meta": meta}


def main(argv: list[str] | None = None) -> None:
    stage_main("latents", LatentsParams, latents, __doc__, argv)


if __name__ == "__main__":
    main()
